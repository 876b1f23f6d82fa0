"""The digit family of the dimension ladder: three sizes of the same class-conditional digits."""
import json
import os

import pytest
import torch

from free_kernels.demo import data


@pytest.fixture(scope="module")
def have_mnist():
    try:
        data.find_mnist()
    except FileNotFoundError as e:
        pytest.skip(f"MNIST data directory not found (set FREE_KERNELS_MNIST): {e}")


def test_space_to_depth_round_trip_and_tiles():
    canvas = torch.randn(3, 1, 64, 64)
    x = data.to_model_layout(canvas, "mosaic")
    assert x.shape == (3, 4, 32, 32)
    # channel 2 * dy + dx holds canvas pixel (2i + dy, 2j + dx)
    assert torch.equal(x[:, 1], canvas[:, 0, 0::2, 1::2]) and torch.equal(x[:, 2], canvas[:, 0, 1::2, 0::2])
    assert torch.equal(data.to_canvas(x, "mosaic"), canvas)
    tiles = data.digit_tiles(x, "mosaic")
    assert tiles.shape == (12, 1, 16, 16)
    # tile 1 of sample 0 is the top-right quadrant, 2x2-averaged
    want = torch.nn.functional.avg_pool2d(canvas[:1, :, :32, 32:], 2)
    assert torch.allclose(tiles[1:2], want)
    assert data.digit_tiles(torch.zeros(2, 1, 32, 32), "digits32").shape == (2, 1, 16, 16)
    assert data.digit_tiles(torch.zeros(2, 1, 16, 16), "digits16").shape == (2, 1, 16, 16)


def test_unknown_dataset_is_named():
    with pytest.raises(ValueError, match="unknown dataset 'mosaik'"):
        data.dataset_spec("mosaik")


@pytest.mark.parametrize("name,shape", [("digits16", (1, 16, 16)), ("digits32", (1, 32, 32)),
                                        ("mosaic", (4, 32, 32))])
def test_family_shapes_d_and_determinism(have_mnist, name, shape):
    fam = data.DigitFamily(name)
    x, y = fam.batch(6, torch.Generator().manual_seed(3))
    assert tuple(x.shape[1:]) == shape and y.shape == (6,)
    assert int(torch.tensor(shape).prod()) == {"digits16": 256, "digits32": 1024, "mosaic": 4096}[name]
    assert x.min() >= -1 and x.max() <= 1
    x2, y2 = fam.batch(6, torch.Generator().manual_seed(3))
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_mosaic_holds_four_different_instances_of_its_label(have_mnist):
    fam = data.DigitFamily("mosaic")
    x, y = fam.batch(32, torch.Generator().manual_seed(0))
    tiles = data.to_canvas(x, "mosaic").reshape(32, 2, 32, 2, 32).permute(0, 1, 3, 2, 4).reshape(32, 4, 32 * 32)
    flat = fam.images.reshape(len(fam), -1)
    for n in range(32):
        found = []
        for q in range(4):
            match = (flat == tiles[n, q]).all(dim=1).nonzero().flatten()
            assert len(match) >= 1
            found.append(int(match[0]))
            assert int(fam.labels[match[0]]) == int(y[n])
        assert len(set(found)) == 4  # four different instances


def test_train_target_mosaic_writes_its_dataset_and_refuses_another(have_mnist, tmp_path, capsys):
    from free_kernels.demo import train_target

    out = str(tmp_path / "run")
    train_target.main(["--dataset", "mosaic", "--out", out, "--steps", "2", "--batch-size", "4",
                       "--save-every", "1", "--config", json.dumps(dict(hidden_size=32, depth=1, num_heads=2))])
    rec = json.load(open(os.path.join(out, "demo_dit.json")))
    assert rec["dataset"] == "mosaic" and rec["config"]["in_channels"] == 4 and rec["config"]["input_size"] == 32
    with pytest.raises(SystemExit, match="trains --dataset mosaic, not digits32"):
        train_target.main(["--dataset", "digits32", "--out", out, "--steps", "3", "--batch-size", "4"])
    with pytest.raises(SystemExit, match="do not match --dataset mosaic"):
        train_target.main(["--dataset", "mosaic", "--out", str(tmp_path / "b"), "--steps", "1",
                           "--config", json.dumps(dict(in_channels=1))])
