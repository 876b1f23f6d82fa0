"""MNIST (IDX format) loading for the demo; the data is read from disk, never shipped."""
from __future__ import annotations

import gzip
import os
from typing import Optional, Tuple

import numpy as np
import torch

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
