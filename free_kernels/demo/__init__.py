"""The embedded demo: a small class-conditional DiT trained on MNIST digits, its drafter and a digit classifier.

Files live in ``free_kernels/demo/assets`` (see MODEL_CARD.md there).  The
scripts that made them are ``python -m free_kernels.demo.train_target``,
``python -m free_kernels.demo.train_classifier`` and ``free-train-drafter``.
"""
from __future__ import annotations

import json
import os

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
TARGET_FILE = os.path.join(ASSETS, "demo_dit.safetensors")
DRAFTER_FILE = os.path.join(ASSETS, "demo_drafter.safetensors")
CLASSIFIER_FILE = os.path.join(ASSETS, "digit_classifier.safetensors")
MOSAIC_TARGET_FILE = os.path.join(ASSETS, "mosaic_dit.safetensors")
MOSAIC_DRAFTER_FILE = os.path.join(ASSETS, "mosaic_drafter.safetensors")

# the embedded demos: name -> (dataset of free_kernels.demo.data.DATASETS, target file, drafter file)
#   digits  16x16x1 digits, 16 tokens, D = 256
#   mosaic  64x64 canvases of four instances of one digit, fed as 4x32x32 (DiT-XL/2-256's latent shape), 64 tokens,
#           D = 4096
DEMOS = {
    "digits": ("digits16", "TARGET_FILE", "DRAFTER_FILE"),
    "mosaic": ("mosaic", "MOSAIC_TARGET_FILE", "MOSAIC_DRAFTER_FILE"),
}


def demo_assets(name: str):
    """(dataset, target file, drafter file) of the embedded demo ``name`` (a key of ``DEMOS``)."""
    if name not in DEMOS:
        raise ValueError(f"unknown demo {name!r}; choose one of {', '.join(DEMOS)}")
    dataset, target, drafter = DEMOS[name]
    return dataset, globals()[target], globals()[drafter]


def demo_files(name: str):
    """(target, drafter) files of the embedded demo or ladder rung ``name`` when they ship, else None."""
    for demo, (dataset, _, _) in DEMOS.items():
        if name in (demo, dataset):
            _, target, drafter = demo_assets(demo)
            if os.path.isfile(target) and os.path.isfile(drafter):
                return target, drafter
    return None

# the demo DiT: 16x16 single-channel digits, patch 4 -> 16 tokens (sized for 2-core CPU training)
DEMO_CONFIG = dict(input_size=16, patch_size=4, in_channels=1, hidden_size=128, depth=6, num_heads=4,
                   num_classes=10, learn_sigma=True, class_dropout_prob=0.1)


def load_target(path: str = TARGET_FILE, device="cpu"):
    """The demo DiT (config from the .json beside the weights)."""
    from safetensors.torch import load_file

    from ..models.dit import DiT, load_state_dict_strict

    if not os.path.isfile(path):
        raise FileNotFoundError(f"demo target checkpoint {path!r} not found")
    cfg_path = path[: -len(".safetensors")] + ".json" if path.endswith(".safetensors") else path + ".json"
    cfg = dict(DEMO_CONFIG)
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            cfg.update(json.load(f).get("config", {}))
    model = DiT(**cfg)
    load_state_dict_strict(model, load_file(path))
    return model.to(device).eval()


def load_demo(name: str = "digits", device="cpu"):
    """An embedded demo, ready to sample: a dict with ``target``, ``drafter`` (attached to it), ``dataset``,
    ``cfg_scale`` and ``guidance_channels`` (the drafter's training settings, which the baseline must share to
    compare like with like) and ``to_canvas`` (the model's layout -> pictures, e.g. a mosaic's 4x32x32 -> 64x64).

        demo = free_kernels.demo.load_demo("mosaic")
        sampler = free_kernels.FreeSampler(demo["target"], demo["drafter"], free_kernels.create_diffusion("250"))
    """
    from ..models.drafter import FeatureDrafter
    from .data import to_canvas

    dataset, target_file, drafter_file = demo_assets(name)
    for f in (target_file, drafter_file):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"demo {name!r}: {f!r} not found (the package was installed without its assets)")
    target = load_target(target_file, device)
    drafter = FeatureDrafter.load(drafter_file, target=target, map_location=device).eval()
    extra = drafter.extra
    return dict(target=target, drafter=drafter, dataset=dataset, cfg_scale=float(extra.get("cfg_scale", 1.0)),
                guidance_channels=int(extra.get("guidance_channels", 3)),
                to_canvas=lambda x: to_canvas(x, dataset))
