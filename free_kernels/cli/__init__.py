"""The command-line tools of free_kernels.

* ``free-sample`` (:mod:`free_kernels.cli.sample`): baseline vs exact FREE on one grid, with timings;
* ``free-train-drafter`` (:mod:`free_kernels.cli.train_drafter`): drafter distillation;
* :mod:`free_kernels.cli.common`: what they share with each other, with the official-script twins in
  ``python/`` and with ``bench/``: the target / drafter loader, argument checks, seeding and the
  baseline sampling call.
"""
