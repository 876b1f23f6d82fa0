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
