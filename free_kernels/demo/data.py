"""MNIST (IDX format) loading for the demo; the data is read from disk, never shipped."""
from __future__ import annotations

import gzip
import os
from typing import Optional, Tuple

import numpy as np
import torch
from torch.nn import functional as F

DEFAULT_DIRS = (
    os.environ.get("FREE_KERNELS_MNIST", ""),
    os.path.join(os.getcwd(), "..", "shared", "data", "mnist"),
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data", "mnist"),
)


def find_mnist(path: Optional[str] = None) -> str:
    cands = [path] if path else [d for d in DEFAULT_DIRS if d]
    for d in cands:
        if d and os.path.isfile(os.path.join(d, "t10k-images-idx3-ubyte.gz")):
            return os.path.abspath(d)
    raise FileNotFoundError(
        f"MNIST IDX files (t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) not found in {cands}; "
        f"pass --data DIR or set FREE_KERNELS_MNIST"
    )


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    ndim = magic & 0xFF
    if (magic >> 8) != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {dims} values, found {data.size}")
    return data.reshape(dims)


def load_mnist(path: Optional[str] = None, size: int = 32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] padded to ``size`` x ``size`` (N, 1, size, size) and labels (N,).

    ``size`` >= 28 pads the 28x28 digits; 14 <= size < 28 first averages 2x2
    pixels (14x14 digits) and then pads.
    """
    d = find_mnist(path)
    imgs = _read_idx(os.path.join(d, "t10k-images-idx3-ubyte.gz"))
    labels = _read_idx(os.path.join(d, "t10k-labels-idx1-ubyte.gz"))
    x = torch.from_numpy(imgs.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
    if size < 28:
        x = torch.nn.functional.avg_pool2d(x, 2)
    pad = size - x.shape[-1]
    if pad < 0:
        raise ValueError(f"size {size} is smaller than the digits ({x.shape[-1]} pixels)")
    x = torch.nn.functional.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), value=-1.0)
    return x, torch.from_numpy(labels.astype(np.int64))


# ---------------------------------------------------------------------------------------------
# One data family at three sizes (the dimension ladder): the same MNIST digits, class-conditional,
# with D = C * H * W output elements per sample of 256, 1024 and 4096.
# Every rung is patchified to 16 tokens (patch 4, 8, 8), so only D changes along the ladder.
#   digits16  16x16x1: 2x2-averaged 14x14 digits padded to 16 (the embedded demo),      D = 256
#   digits32  32x32x1: full-resolution 28x28 digits padded to 32,                         D = 1024
#   mosaic    64x64 canvas = 2 x 2 grid of four different instances of the same digit (each
#             28 padded to 32), fed to the DiT as 4 x 32 x 32 by a fixed space-to-depth
#             (pixel_unshuffle by 2: channel 2 * dy + dx holds canvas pixel (2i + dy, 2j + dx)),
#             the latent shape of DiT-XL/2 at 256 px,                                     D = 4096
DATASETS = {
    "digits16": dict(input_size=16, in_channels=1, patch_size=4, canvas=16),
    "digits32": dict(input_size=32, in_channels=1, patch_size=8, canvas=32),
    "mosaic": dict(input_size=32, in_channels=4, patch_size=8, canvas=64, hidden_size=256, depth=4),
}
# The mosaic's tokens carry p * p * C = 256 values each: at the demo's width (128) the eps prediction
# cannot pass them through (measured: loss stuck at 0.54, eps MSE ~0.5 at every timestep), so that
# rung is 256 wide and 4 deep (about the training cost of 64 tokens at width 128 per step).
MODEL_KEYS = ("input_size", "in_channels", "patch_size", "hidden_size", "depth")


def dataset_spec(name: str) -> dict:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return dict(DATASETS[name])


def to_model_layout(canvas: torch.Tensor, name: str) -> torch.Tensor:
    """(N, 1, canvas, canvas) images -> the DiT's (N, C, input_size, input_size) layout."""
    return F.pixel_unshuffle(canvas, 2) if name == "mosaic" else canvas


def to_canvas(x: torch.Tensor, name: str) -> torch.Tensor:
    """The DiT's layout -> (N, 1, canvas, canvas) pictures (the inverse of ``to_model_layout``)."""
    return F.pixel_shuffle(x, 2) if name == "mosaic" else x


def digit_tiles(x: torch.Tensor, name: str) -> torch.Tensor:
    """Samples in the DiT's layout -> every digit they show as a 16x16 tile (the classifier's input).

    digits16: one tile per sample; digits32: one, 2x2-averaged; mosaic: four (row-major quadrants).
    """
    c = to_canvas(x, name)
    if name == "digits16":
        return c
    if name == "mosaic":
        n = c.shape[0]
        c = c.reshape(n, 1, 2, 32, 2, 32).permute(0, 2, 4, 1, 3, 5).reshape(n * 4, 1, 32, 32)
    return F.avg_pool2d(c, 2)


class DigitFamily:
    """Class-conditional batches of one ladder rung, drawn from a seeded generator (resumable).

    ``batch(n, generator)`` returns (x in the DiT's layout, labels).  A mosaic's four digits are
    four different MNIST instances of its label.
    """

    def __init__(self, name: str, data: Optional[str] = None):
        self.name = name
        spec = dataset_spec(name)
        x, y = load_mnist(data, size=16 if name == "digits16" else 32)
        self.images, self.labels = x, y
        if name == "mosaic":
            order = torch.argsort(y, stable=True)
            self.by_class = x[order]
            counts = torch.bincount(y, minlength=10)
            self.counts = counts
            self.offsets = torch.cumsum(counts, 0) - counts
        self.input_size, self.in_channels = spec["input_size"], spec["in_channels"]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batch(self, n: int, generator: torch.Generator):
        idx = torch.randint(0, len(self), (n,), generator=generator)
        y = self.labels[idx]
        if self.name != "mosaic":
            return self.images[idx], y
        # four distinct instances of class y: the 4 smallest of uniform keys over that class's members
        cmax = int(self.counts.max())
        keys = torch.rand(n, cmax, generator=generator)
        keys[torch.arange(cmax).unsqueeze(0) >= self.counts[y].unsqueeze(1)] = 2.0
        pick = keys.topk(4, dim=1, largest=False).indices + self.offsets[y].unsqueeze(1)  # (n, 4)
        tiles = self.by_class[pick.reshape(-1)].reshape(n, 2, 2, 32, 32)
        canvas = tiles.permute(0, 1, 3, 2, 4).reshape(n, 1, 64, 64)
        return to_model_layout(canvas, self.name), y


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> uint8 (clamped)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(x: torch.Tensor, path: str, nrow: int = 10, pad: int = 2) -> None:
    """Write a PNG grid of [-1, 1] images (N, C, H, W) with C in {1, 3}."""
    from PIL import Image

    x = to_uint8(x.detach().cpu())
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    nr = (n + ncol - 1) // ncol
    grid = torch.full((c, nr * (h + pad) + pad, ncol * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[:, :, 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
