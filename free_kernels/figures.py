"""Pictures of a sampling run that tell its story without the console (matplotlib: the ``plot`` extra).

* :func:`sample_sheet`: the samples of every method, upscaled so that each image is at least
  :data:`MIN_TILE_PX` pixels, one block per method under a caption with its name, wall time and speed-up.
  The tiles' pixels are the images' own (nearest-neighbour upscaling, no resampling), and the PNG records
  where each tile is (:func:`read_tiles` reads them back).
* :func:`acceptance_plot`: the accepted fraction of drafts along the schedule per method, the planner's
  predicted acceptance, and the draft length it chose (second axis).

Inputs are plain data (images per method, labels, timings, per-index arrays), so any model's run can use
them: ``to_canvas`` maps images in the model's layout (n, C, H, W) to displayable ones (n, 1 or 3, h, w) in
[-1, 1] (default :func:`default_canvas`; a model that stores a 64x64 picture as 4 x 32 x 32 by
space-to-depth passes its depth-to-space).  Bad input is refused with a one-line ``ValueError`` naming the
argument before anything is drawn; files are written atomically.

Sheet geometry (pixels): tiles of ``tile_px`` (``ceil(MIN_TILE_PX / image size)`` times the image size)
with :data:`GAP` between them, ``columns`` per row; each method's block is a :data:`CAPTION_PX` caption above
its rows, blocks :data:`BLOCK_GAP` apart, :data:`MARGIN` around everything; the width is at least
:data:`MIN_WIDTH` and wide enough for the longest caption.  :func:`sheet_size` gives the size.
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["SheetRow", "acceptance_plot", "default_canvas", "read_tiles", "sample_sheet", "sheet_size"]

MIN_TILE_PX = 96
GAP = 4
CAPTION_PX = 24
BLOCK_GAP = 8
MARGIN = 8
MIN_WIDTH = 420
DPI = 100
PLOT_SIZE = (900, 480)   # acceptance plot, pixels
CAPTION_FONT = dict(fontsize=10.5, family="DejaVu Sans")
TILES_KEY = "free_kernels:tiles"


@dataclass
class SheetRow:
    """One method's block of the sheet: its label, its images (n, C, H, W) in the model's layout, and what the
    caption says besides the label (wall seconds, speed-up over the baseline, a note)."""

    label: str
    images: object
    wall_s: Optional[float] = None
    speedup: Optional[float] = None
    note: Optional[str] = None

    def caption(self) -> str:
        parts = [self.label]
        if self.wall_s is not None:
            parts.append(f"{self.wall_s:.2f} s")
        if self.speedup is not None:
            parts.append(f"{self.speedup:.2f}x")
        text = "  \u00b7  ".join(parts)
        return f"{text}  ({self.note})" if self.note else text


def default_canvas(x):
    """Images (n, C, H, W) in [-1, 1] -> displayable (n, 1 or 3, H, W): 1 or 3 channels as they are; other
    channel counts (latents) as their first 3 (or 1) channels, min-max scaled per image to [-1, 1]."""
    import torch

    x = torch.as_tensor(x).detach().float().cpu()
    C = x.shape[1]
    if C in (1, 3):
        return x
    x = x[:, :3] if C >= 3 else x[:, :1]
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-8) * 2 - 1


def _bad(msg: str):
    raise ValueError(msg)


def _finite_number(v, name: str, minimum: float = 0.0) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating))
                          or not math.isfinite(float(v)) or float(v) < minimum):
        _bad(f"{name} must be a finite number >= {minimum:g} or None, got {v!r}")


def _png_path(path, name: str) -> str:
    if not isinstance(path, (str, os.PathLike)) or not str(path).lower().endswith(".png"):
        _bad(f"{name} must be a path ending in .png, got {path!r}")
    if os.path.isdir(path):
        _bad(f"{name} {str(path)!r} is a directory, expected a file path")
    return str(path)


def _canvas(rows: Sequence[SheetRow], to_canvas: Optional[Callable]) -> List[np.ndarray]:
    """Each row's images as uint8 (n, h, w, 3), every row the same h, w."""
    conv = to_canvas or default_canvas
    out, shape = [], None
    for k, r in enumerate(rows):
        x = getattr(r.images, "shape", None)
        if x is None or len(x) != 4 or x[0] < 1:
            _bad(f"rows[{k}].images must be an (n, C, H, W) array with n >= 1, got shape {x}")
        try:
            y = conv(r.images)
            y = np.asarray(y.detach().cpu() if hasattr(y, "detach") else y, dtype=np.float64)
        except ValueError:
            raise
        except Exception as e:
            _bad(f"to_canvas failed on rows[{k}].images: {type(e).__name__}: {e}")
        if y.ndim != 4 or y.shape[0] != x[0] or y.shape[1] not in (1, 3) or min(y.shape[2:]) < 1:
            _bad(f"to_canvas must return (n, 1 or 3, h, w) for rows[{k}] (n = {x[0]}), got shape {y.shape}")
        if not np.all(np.isfinite(y)):
            _bad(f"rows[{k}].images contain NaN or Inf")
        if shape is not None and y.shape[2:] != shape:
            _bad(f"rows[{k}] pictures are {y.shape[2:]}, the others {shape}: one picture size per sheet")
        shape = y.shape[2:]
        u8 = np.clip(np.round((y + 1.0) * 127.5), 0, 255).astype(np.uint8)
        if u8.shape[1] == 1:
            u8 = np.repeat(u8, 3, axis=1)
        out.append(u8.transpose(0, 2, 3, 1))
    return out


def _check_rows(rows, columns) -> None:
    if not isinstance(rows, (list, tuple)) or not rows or not all(isinstance(r, SheetRow) for r in rows):
        _bad(f"rows must be a non-empty list of SheetRow, got {type(rows).__name__}")
    if isinstance(columns, bool) or not isinstance(columns, (int, np.integer)) or columns < 1:
        _bad(f"columns must be an int >= 1, got {columns!r}")
    for k, r in enumerate(rows):
        if not isinstance(r.label, str) or not r.label.strip() or "\n" in r.label:
            _bad(f"rows[{k}].label must be a non-empty one-line string, got {r.label!r}")
        _finite_number(r.wall_s, f"rows[{k}].wall_s")
        _finite_number(r.speedup, f"rows[{k}].speedup")


def tile_px(h: int, w: int) -> Tuple[int, int]:
    """The tile size of (h, w) pictures: upscaled by the smallest integer that makes the larger side >= MIN_TILE_PX."""
    k = max(1, math.ceil(MIN_TILE_PX / max(h, w)))
    return h * k, w * k


def caption_width(captions: Sequence[str]) -> int:
    """Pixels the longest of ``captions`` takes in the sheet's caption font (measured by matplotlib)."""
    if not captions:
        return 0
    fig = _figure(100, 100)
    renderer = fig.canvas.get_renderer()
    return int(math.ceil(max(fig.text(0, 0, c, **CAPTION_FONT).get_window_extent(renderer).width for c in captions)))


def sheet_size(counts: Sequence[int], columns: int, tile: Tuple[int, int],
               captions: Sequence[str] = ()) -> Tuple[int, int]:
    """(width, height) in pixels of a sheet with ``counts[m]`` pictures in method m's block (and these
    captions: the sheet is at least as wide as the longest plus the margins)."""
    th, tw = tile
    width = max(MIN_WIDTH, 2 * MARGIN + columns * tw + (columns - 1) * GAP, 2 * MARGIN + caption_width(captions) + 4)
    height = 2 * MARGIN + (len(counts) - 1) * BLOCK_GAP
    for n in counts:
        r = -(-int(n) // columns)
        height += CAPTION_PX + r * th + (r - 1) * GAP
    return width, height


def _figure(width: int, height: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # a hair over the size, so that the canvas never rounds a pixel away
    fig = Figure(figsize=((width + 1e-3) / DPI, (height + 1e-3) / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _png_bytes(fig, size: Tuple[int, int], text: Optional[Dict[str, str]] = None) -> bytes:
    """The figure rendered to an RGB PNG of exactly ``size`` (PIL: no timestamps, the same bytes every time)."""
    from PIL import Image, PngImagePlugin

    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    w, h = size
    if rgba.shape[0] < h or rgba.shape[1] < w:  # pragma: no cover - a canvas that rounded down
        raise RuntimeError(f"matplotlib drew {rgba.shape[1]}x{rgba.shape[0]} for a {w}x{h} figure")
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgba[:h, :w, :3])).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _write(path: str, data: bytes) -> None:
    from ._checks import atomic_write

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: f.write(data))


def sample_sheet(path, rows: Sequence[SheetRow], columns: int, to_canvas: Optional[Callable] = None) -> dict:
    """Write the labelled sheet of ``rows`` to ``path`` (a .png); returns ``size`` (width, height), ``tile``
    (height, width of one upscaled picture) and ``grid_rows`` ({label: tile-row indices of its block})."""
    path = _png_path(path, "path")
    _check_rows(rows, columns)
    if to_canvas is not None and not callable(to_canvas):
        _bad(f"to_canvas must be callable, got {type(to_canvas).__name__}")
    pics = _canvas(rows, to_canvas)
    h, w = pics[0].shape[1:3]
    th, tw = tile_px(h, w)
    k = th // h
    width, height = sheet_size([p.shape[0] for p in pics], columns, (th, tw), [r.caption() for r in rows])
    sheet = np.full((height, width, 3), 255, dtype=np.uint8)
    fig = _figure(width, height)
    boxes, grid_rows, y, tile_row = [], {}, MARGIN, 0
    for r, p in zip(rows, pics):
        fig.text(MARGIN / width, 1.0 - (y + CAPTION_PX / 2) / height, r.caption(), ha="left", va="center",
                 **CAPTION_FONT)
        y += CAPTION_PX
        n = p.shape[0]
        nr = -(-n // columns)
        grid_rows.setdefault(r.label, [])
        for i in range(n):
            rr, c = divmod(i, columns)
            x0, y0 = MARGIN + c * (tw + GAP), y + rr * (th + GAP)
            sheet[y0:y0 + th, x0:x0 + tw] = np.repeat(np.repeat(p[i], k, axis=0), k, axis=1)
            boxes.append([int(x0), int(y0), int(tw), int(th)])
        grid_rows[r.label] += list(range(tile_row, tile_row + nr))
        tile_row += nr
        y += nr * th + (nr - 1) * GAP + BLOCK_GAP
    fig.figimage(sheet, xo=0, yo=0, origin="upper", zorder=0)
    _write(path, _png_bytes(fig, (width, height), {TILES_KEY: json.dumps(boxes)}))
    return dict(size=(width, height), tile=(th, tw), grid_rows=grid_rows)


def read_tiles(path) -> np.ndarray:
    """The upscaled pictures of a sheet written by :func:`sample_sheet`, in order: uint8 (n, th, tw, 3)."""
    from PIL import Image

    with Image.open(path) as im:
        boxes = json.loads(im.info.get(TILES_KEY, "null") or "null")
        if not isinstance(boxes, list):
            _bad(f"{str(path)!r} is not a sample sheet (no {TILES_KEY} record)")
        arr = np.asarray(im.convert("RGB"))
    return np.stack([arr[y:y + h, x:x + w] for x, y, w, h in boxes])


def _per_index(v, n: int, name: str, lo: float = 0.0, hi: Optional[float] = None, allow_none: bool = False):
    try:
        a = np.array([np.nan if (allow_none and x is None) else x for x in v], dtype=np.float64)
    except (TypeError, ValueError):
        _bad(f"{name} must be a sequence of {n} numbers{' or None' if allow_none else ''}")
    if a.shape != (n,):
        _bad(f"{name} must have num_steps = {n} entries, got {a.shape[0] if a.ndim == 1 else a.shape}")
    known = a[np.isfinite(a)]
    if (not allow_none and known.size != n) or np.isinf(a).any():
        _bad(f"{name} must hold finite numbers{' or None' if allow_none else ''}")
    if known.size and (known.min() < lo or (hi is not None and known.max() > hi)):
        _bad(f"{name} must lie in [{lo:g}, {'inf' if hi is None else f'{hi:g}'}], got {known.min():g}..{known.max():g}")
    return a


def _pooled(acc: np.ndarray, pro: np.ndarray, w: int) -> np.ndarray:
    """Accepted / judged over indices i - w .. i + w (NaN where nothing was judged)."""
    c_acc = np.concatenate([[0.0], np.cumsum(acc)])
    c_pro = np.concatenate([[0.0], np.cumsum(pro)])
    i = np.arange(len(acc))
    hi, lo = np.minimum(i + w + 1, len(acc)), np.maximum(i - w, 0)
    a, p = c_acc[hi] - c_acc[lo], c_pro[hi] - c_pro[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(p > 0, a / np.maximum(p, 1e-300), np.nan)


def acceptance_plot(path, num_steps: int, measured: Dict[str, Tuple[Sequence[float], Sequence[float]]],
                    predicted: Optional[Sequence[float]] = None, chosen_L: Optional[Sequence] = None,
                    title: Optional[str] = None) -> Tuple[int, int]:
    """Write the acceptance-by-timestep plot to ``path`` (a .png of :data:`PLOT_SIZE`); returns its size.

    Every per-index array is indexed by the respaced index i = 0..num_steps - 1 (as ``FreeStats`` counts:
    i = num_steps - 1 is the first step, from x_T); the x axis is the sampling step num_steps - i.
    ``measured``: {label: (accepted, judged) drafts per index}, drawn pooled over neighbouring steps
    (+-num_steps // 50) with the per-step fractions as dots; ``predicted``: the planner's predicted acceptance
    per index; ``chosen_L``: the mean draft length it chose for the samples at each index (None: none there).
    """
    path = _png_path(path, "path")
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        _bad(f"num_steps must be an int >= 1, got {num_steps!r}")
    N = int(num_steps)
    if not isinstance(measured, dict) or not all(isinstance(k, str) for k in measured):
        _bad(f"measured must be a dict of label -> (accepted, judged), got {type(measured).__name__}")
    series = {}
    for label, pair in measured.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            _bad(f"measured[{label!r}] must be an (accepted, judged) pair of per-index counts")
        acc = _per_index(pair[0], N, f"measured[{label!r}] accepted")
        pro = _per_index(pair[1], N, f"measured[{label!r}] judged")
        if np.any(acc > pro):
            _bad(f"measured[{label!r}]: more drafts accepted than judged at some index")
        series[label] = (acc, pro)
    pred = None if predicted is None else _per_index(predicted, N, "predicted", 0.0, 1.0)
    Ls = None if chosen_L is None else _per_index(chosen_L, N, "chosen_L", 0.0, None, allow_none=True)
    if title is not None and (not isinstance(title, str) or "\n" in title):
        _bad(f"title must be a one-line string, got {title!r}")

    width, height = PLOT_SIZE
    fig = _figure(width, height)
    ax = fig.add_axes((0.07, 0.24, 0.84, 0.68))
    step = N - np.arange(N)                       # sampling step of index i (1 = the first, from x_T)
    order = np.argsort(step)
    w = max(1, N // 50)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    handles = []
    for k, (label, (acc, pro)) in enumerate(series.items()):
        col = colors[k % len(colors)]
        with np.errstate(invalid="ignore", divide="ignore"):
            raw = np.where(pro > 0, acc / np.maximum(pro, 1e-300), np.nan)
        ax.plot(step[order], raw[order], ".", color=col, alpha=0.25, markersize=3)
        (h,) = ax.plot(step[order], _pooled(acc, pro, w)[order], "-", color=col, lw=1.8,
                       label=f"{label}: accepted fraction (measured)")
        handles.append(h)
    if pred is not None:
        (h,) = ax.plot(step[order], pred[order], "--", color="black", lw=1.4, label="planner's predicted acceptance")
        handles.append(h)
    ax.set_xlim(0.5, N + 0.5)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("sampling step (1 = the first, from x_T; noise decreases to the right)")
    ax.set_ylabel("drafts accepted")
    ax.grid(alpha=0.3)
    if Ls is not None:
        ax2 = ax.twinx()
        (h,) = ax2.plot(step[order], Ls[order], drawstyle="steps-mid", color="tab:gray", lw=1.2, alpha=0.9,
                        label="planner's draft length L (right axis)")
        top = np.nanmax(Ls) if np.isfinite(Ls).any() else 1.0
        ax2.set_ylim(-0.1, max(1.0, float(top)) * 1.1 + 0.1)
        ax2.set_ylabel("draft length L chosen")
        handles.append(h)
    if handles:  # under the plot, where it hides no data
        fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8.5,
                   frameon=False)
    ax.set_title(title or f"Draft acceptance along the schedule ({N} steps)", fontsize=11)
    _write(path, _png_bytes(fig, (width, height)))
    return width, height
