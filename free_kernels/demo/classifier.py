"""A small CNN that recognises the demo's 16x16 digits; its feature layer backs the offline metrics.

The network sees (N, 1, 16, 16) images in [-1, 1] -- the format of
``load_mnist(size=16)`` and of the demo DiT's samples -- and has three 3x3
conv layers, a ``feature_dim``-wide penultimate layer (the space in which
:mod:`free_kernels.demo.metrics` measures Frechet distances) and a linear
read-out to the 10 digit classes.

The shipped weights (``assets/digit_classifier.safetensors`` + ``.json``) were
made by ``python -m free_kernels.demo.train_classifier``.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from . import CLASSIFIER_FILE

DEFAULT_CLASSIFIER_CONFIG = dict(input_size=16, channels=(32, 64, 64), feature_dim=64, num_classes=10)


class DigitClassifier(nn.Module):
    """conv(c0) -> pool -> conv(c1) -> pool -> conv(c2) -> flatten -> fc(feature_dim) -> ReLU -> fc(num_classes).

    ReLU after every conv; ``features`` is the fc(feature_dim) output before its ReLU.
    """

    def __init__(self, input_size: int = 16, channels=(32, 64, 64), feature_dim: int = 64,
                 num_classes: int = 10, dropout: float = 0.2):
        super().__init__()
        if input_size % 4:
            raise ValueError(f"input_size must be a multiple of 4 (two 2x2 poolings), got {input_size}")
        c0, c1, c2 = (int(c) for c in channels)
        self.input_size = int(input_size)
        self.channels = (c0, c1, c2)
        self.feature_dim = int(feature_dim)
        self.num_classes = int(num_classes)
        self.conv1 = nn.Conv2d(1, c0, 3, padding=1)
        self.conv2 = nn.Conv2d(c0, c1, 3, padding=1)
        self.conv3 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * (input_size // 4) ** 2, feature_dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def config(self) -> dict:
        return dict(input_size=self.input_size, channels=list(self.channels), feature_dim=self.feature_dim,
                    num_classes=self.num_classes)

    def _check(self, x: torch.Tensor) -> None:
        s = self.input_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, s, s):
            raise ValueError(f"DigitClassifier expects (N, 1, {s}, {s}) images in [-1, 1], got {tuple(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate pre-activations (N, feature_dim): the space of the Frechet distance.

        Taken before the ReLU so that no dimension is constant (a unit the ReLU
        silences on every real digit would otherwise add nothing to the FD).
        """
        self._check(x)
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.relu(self.conv3(h))
        return self.fc(h.flatten(1))

    def logits_from_features(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(F.relu(f)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes)."""
        return self.logits_from_features(self.features(x))

    def fingerprint(self) -> str:
        """A short hash of the config and weights (keys the cached reference statistics)."""
        h = hashlib.sha256(json.dumps(self.config(), sort_keys=True).encode())
        for k, v in sorted(self.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def config_path(path: str) -> str:
    """The .json that sits beside a .safetensors weight file."""
    return path[: -len(".safetensors")] + ".json" if path.endswith(".safetensors") else path + ".json"


def load_classifier(path: str = CLASSIFIER_FILE, device="cpu") -> DigitClassifier:
    """The digit classifier at ``path`` (config from the .json beside it), in eval mode."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"digit classifier weights {path!r} not found; make them with "
            f"`python -m free_kernels.demo.train_classifier --out DIR` and pass DIR/digit_classifier.safetensors")
    cfg = dict(DEFAULT_CLASSIFIER_CONFIG)
    cfg_file = config_path(path)
    if os.path.isfile(cfg_file):
        try:
            with open(cfg_file) as f:
                record = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"digit classifier config {cfg_file!r} is not valid JSON: {e}") from e
        unknown = set(record.get("config", {})) - set(DEFAULT_CLASSIFIER_CONFIG)
        if unknown:
            raise ValueError(f"digit classifier config {cfg_file!r} has unknown keys {sorted(unknown)}; "
                             f"expected a subset of {sorted(DEFAULT_CLASSIFIER_CONFIG)}")
        cfg.update(record.get("config", {}))
    model = DigitClassifier(**cfg)
    state = load_file(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"digit classifier weights {path!r} do not match the config {cfg} "
            f"(from {cfg_file if os.path.isfile(cfg_file) else 'defaults: no .json beside the weights'}): "
            f"missing {missing}, unexpected {unexpected}, shape mismatches {shapes}")
    model.load_state_dict(state)
    return model.to(device).eval()


@torch.no_grad()
def extract(model: DigitClassifier, x: torch.Tensor, batch_size: int = 1000, clamp: bool = True,
            device: Optional[torch.device] = None):
    """(features (N, F) float32 on CPU, logits (N, C) float32 on CPU) for images ``x`` in batches.

    ``clamp`` clips the images to [-1, 1] first, as a sampler's saved images would be.
    """
    was_training = model.training
    model.eval()
    dev = device or next(model.parameters()).device
    feats, logits = [], []
    try:
        for i in range(0, x.shape[0], batch_size):
            xb = x[i: i + batch_size].to(dev, torch.float32)
            if clamp:
                xb = xb.clamp(-1, 1)
            f = model.features(xb)
            feats.append(f.cpu())
            logits.append(model.logits_from_features(f).cpu())
    finally:
        model.train(was_training)
    if not feats:
        return torch.zeros(0, model.feature_dim), torch.zeros(0, model.num_classes)
    return torch.cat(feats), torch.cat(logits)
