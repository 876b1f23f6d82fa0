"""Old name of ``free-train-drafter``'s module, kept so that existing imports and commands work::

    from free_kernels.train import run, main, generate_trajectories, expected_steps, ...
    python -m free_kernels.train --out runs/drafter

The code lives in :mod:`free_kernels.cli.train_drafter` (the command-line tools are in
:mod:`free_kernels.cli`); importing this name gives that module itself (one module object under
two names, so its attributes, and any patch of them, are shared).
"""
import sys

from .cli import train_drafter as _train_drafter

if __name__ == "__main__":  # python -m free_kernels.train: run the command, do not rename __main__
    raise SystemExit(_train_drafter.main())

sys.modules[__name__] = _train_drafter
