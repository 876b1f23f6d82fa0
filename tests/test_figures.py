"""The pictures of a run: the labelled sample sheet and the acceptance-by-timestep plot."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402

from free_kernels import figures as F  # noqa: E402


def _rows(n=3, C=1, S=16):
    g = torch.Generator().manual_seed(0)
    return [F.SheetRow("baseline (ancestral)", torch.rand(n, C, S, S, generator=g) * 2 - 1, 9.8, 1.0),
            F.SheetRow("FREE (exact, auto L)", torch.rand(n, C, S, S, generator=g) * 2 - 1, 6.9, 1.42,
                       "calibration 0.4 s"),
            F.SheetRow("FREE (exact, L = 6)", torch.rand(n + 2, C, S, S, generator=g) * 2 - 1, 12.1, 0.81)]


def test_sheet_is_upscaled_labelled_and_of_the_documented_size(tmp_path):
    rows = _rows()
    path = tmp_path / "sheet.png"
    info = F.sample_sheet(path, rows, columns=3)
    assert info["tile"] == (96, 96)                               # 16 px pictures upscaled 6x
    assert info["grid_rows"] == {"baseline (ancestral)": [0], "FREE (exact, auto L)": [1],
                                 "FREE (exact, L = 6)": [2, 3]}
    w_tiles = 2 * F.MARGIN + 3 * 96 + 2 * F.GAP
    h = 2 * F.MARGIN + 2 * F.BLOCK_GAP + 3 * F.CAPTION_PX + 4 * 96 + 1 * F.GAP
    width = max(F.MIN_WIDTH, w_tiles, 2 * F.MARGIN + F.caption_width([r.caption() for r in rows]) + 4)
    assert info["size"] == (width, h) == F.sheet_size([3, 3, 5], 3, (96, 96), [r.caption() for r in rows])
    with Image.open(path) as im:
        assert im.size == (width, h) and im.mode == "RGB"
    tiles = F.read_tiles(path)
    assert tiles.shape == (11, 96, 96, 3)
    # the pictures' own pixels, nearest-neighbour upscaled (no resampling)
    x = rows[2].images[4, 0].numpy()
    want = np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)
    assert np.array_equal(tiles[10][::6, ::6, 0], want) and np.array_equal(tiles[10][5::6, 5::6, 1], want)
    cap = rows[1].caption()
    assert "1.42x" in cap and "6.90 s" in cap and "FREE (exact, auto L)" in cap
    # the captions are drawn: the band above each block is not blank
    with Image.open(path) as im:
        band = np.asarray(im)[F.MARGIN:F.MARGIN + F.CAPTION_PX, F.MARGIN:F.MARGIN + 200]
    assert band.min() < 128
    # the same data give the same bytes (no timestamps in the PNG)
    again = tmp_path / "again.png"
    F.sample_sheet(again, rows, columns=3)
    assert again.read_bytes() == path.read_bytes()


def test_sheet_takes_a_to_canvas_for_other_layouts(tmp_path):
    """A 64x64 picture stored as 4 x 32 x 32 by space-to-depth, shown through its depth-to-space."""
    x = torch.rand(2, 4, 32, 32) * 2 - 1
    info = F.sample_sheet(tmp_path / "m.png", [F.SheetRow("mosaic", x, 1.0, None)], columns=2,
                          to_canvas=lambda z: torch.nn.functional.pixel_shuffle(z, 2))
    assert info["tile"] == (128, 128)                             # 64 px upscaled 2x
    assert F.read_tiles(tmp_path / "m.png").shape == (2, 128, 128, 3)
    latent = F.sample_sheet(tmp_path / "l.png", [F.SheetRow("latent", torch.randn(1, 4, 8, 8))], columns=1)
    assert latent["tile"] == (96, 96)                             # default: first 3 channels, min-max scaled


def _one_line_error(fn, match):
    with pytest.raises(ValueError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def test_sheet_refuses_bad_input_in_one_line(tmp_path):
    p = tmp_path / "s.png"
    ok = _rows()
    _one_line_error(lambda: F.sample_sheet(tmp_path / "s.jpg", ok, 3), "path must be a path ending in .png")
    _one_line_error(lambda: F.sample_sheet(p, [], 3), "rows must be a non-empty list")
    _one_line_error(lambda: F.sample_sheet(p, ok, 0), "columns must be an int >= 1")
    _one_line_error(lambda: F.sample_sheet(p, [F.SheetRow("", ok[0].images)], 3), r"rows\[0\].label")
    _one_line_error(lambda: F.sample_sheet(p, [F.SheetRow("a", ok[0].images, wall_s=float("nan"))], 3),
                    r"rows\[0\].wall_s")
    _one_line_error(lambda: F.sample_sheet(p, [F.SheetRow("a", torch.zeros(3, 16, 16))], 3), r"rows\[0\].images")
    _one_line_error(lambda: F.sample_sheet(p, [F.SheetRow("a", torch.full((1, 1, 4, 4), float("nan")))], 3),
                    "NaN or Inf")
    _one_line_error(lambda: F.sample_sheet(p, [ok[0], F.SheetRow("b", torch.zeros(1, 1, 8, 8))], 3),
                    "one picture size per sheet")
    _one_line_error(lambda: F.sample_sheet(p, ok, 3, to_canvas=lambda z: z[:, 0]), "to_canvas must return")
    _one_line_error(lambda: F.sample_sheet(p, ok, 3, to_canvas=lambda z: 1 / 0), "to_canvas failed")
    os.makedirs(tmp_path / "d.png")
    _one_line_error(lambda: F.sample_sheet(tmp_path / "d.png", ok, 3), "is a directory")
    assert not p.exists()


def _plot_args(N=40):
    rng = np.random.default_rng(0)
    pro = rng.integers(0, 3, N)
    acc = np.minimum(pro, rng.integers(0, 3, N))
    return dict(measured={"FREE (exact, auto L)": (acc, pro), "FREE (exact, L = 6)": (acc, pro + 1)},
                predicted=np.linspace(0.4, 0.9, N), chosen_L=[None] * 3 + list(rng.integers(0, 8, N - 3)))


def test_acceptance_plot_is_written_at_its_size(tmp_path):
    path = tmp_path / "acc.png"
    assert F.acceptance_plot(path, 40, **_plot_args()) == F.PLOT_SIZE
    with Image.open(path) as im:
        assert im.size == F.PLOT_SIZE
        assert np.asarray(im).std() > 10  # something is drawn
    assert F.acceptance_plot(tmp_path / "only.png", 40, {"L = 2": ([0] * 40, [0] * 40)}) == F.PLOT_SIZE


def test_acceptance_plot_refuses_bad_input_in_one_line(tmp_path):
    p = tmp_path / "a.png"
    a = _plot_args()
    _one_line_error(lambda: F.acceptance_plot(p, 0, **a), "num_steps must be an int >= 1")
    _one_line_error(lambda: F.acceptance_plot(p, 39, **a), "must have num_steps = 39 entries")
    _one_line_error(lambda: F.acceptance_plot(p, 40, {"x": ([1] * 40, [0] * 40)}), "more drafts accepted than judged")
    _one_line_error(lambda: F.acceptance_plot(p, 40, {"x": ([0] * 40,)}), r"measured\['x'\] must be")
    _one_line_error(lambda: F.acceptance_plot(p, 40, {"x": ([0] * 39 + [float("nan")], [0] * 40)}), "finite")
    _one_line_error(lambda: F.acceptance_plot(p, 40, a["measured"], predicted=[1.5] * 40), r"predicted must lie in")
    _one_line_error(lambda: F.acceptance_plot(p, 40, a["measured"], chosen_L=[-1] * 40), "chosen_L must lie in")
    _one_line_error(lambda: F.acceptance_plot(p, 40, a["measured"], chosen_L=["x"] * 40), "chosen_L must be")
    _one_line_error(lambda: F.acceptance_plot(p, 40, "auto"), "measured must be a dict")
    assert not p.exists()
