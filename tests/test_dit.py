"""Foundation tests of the DiT target model: configs, checkpoint layout, forward semantics, CFG.

Expected values come from docs/official-behaviour.md ("Model configurations",
"Checkpoint keys", "Model forward", "Classifier-free guidance") via
``tests/_oracle.py`` (the official key -> shape table, a float64 forward pass,
the sin-cos tables) or from hand computations in the test.
"""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import _oracle as O  # noqa: E402

from free_kernels.models.dit import (  # noqa: E402
    DiT,
    DiT_models,
    create_model,
    find_model,
    get_2d_sincos_pos_embed,
    load_state_dict_strict,
    timestep_embedding,
)

# docs/official-behaviour.md, "Model configurations": name -> (depth, hidden, heads, head dim)
DOC_CONFIGS = {"S": (12, 384, 6, 64), "B": (12, 768, 12, 64), "L": (24, 1024, 16, 64), "XL": (28, 1152, 16, 72)}
ALL_NAMES = [f"DiT-{s}/{p}" for s in DOC_CONFIGS for p in (2, 4, 8)]


def _parse(name):
    size, patch = name[len("DiT-"):].split("/")
    return DOC_CONFIGS[size], int(patch)


def small_dit(seed=0, input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10, **kw):
    """A small DiT with every weight re-drawn (a fresh adaLN-Zero DiT outputs zeros)."""
    torch.manual_seed(seed)
    m = DiT(input_size=input_size, patch_size=patch_size, hidden_size=hidden_size, depth=depth,
            num_heads=num_heads, num_classes=num_classes, **kw)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name != "pos_embed":
                p.normal_(0.0, 0.2)
    return m.eval()


def _inputs(m, B=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, m.in_channels, m.input_size, m.input_size, generator=g)
    t = torch.tensor([999, 0, 500, 37, 250, 1, 998, 640][:B])
    y = torch.tensor([3, m.num_classes, 0, 7, 1, 2, 9, 5][:B])
    return x, t, y


# ------------------------------------------------------------------ configs
def test_config_registry_is_the_documented_twelve():
    assert sorted(DiT_models) == sorted(ALL_NAMES)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_config_builds_with_official_keys_and_shapes(name):
    (depth, hidden, heads, head_dim), p = _parse(name)
    with torch.device("meta"):                      # structure only: no memory, no init cost
        m = DiT_models[name](input_size=32)
    assert (m.depth, m.hidden_size, m.num_heads, m.patch_size) == (depth, hidden, heads, p)
    assert m.blocks[0].attn.head_dim == head_dim and hidden // heads == head_dim
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    want = O.expected_dit_keys(depth, hidden, p, tokens=(32 // p) ** 2)
    assert got.keys() == want.keys(), (sorted(set(got) ^ set(want)))[:6]
    assert got == want


@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-S/4", "DiT-S/8"])
def test_small_configs_build_and_run(name):
    torch.manual_seed(0)
    m = DiT_models[name](input_size=16).eval()
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        out = m(x, torch.tensor([10, 900]), torch.tensor([1, 1000]))
    assert out.shape == (2, 8, 16, 16)
    assert torch.count_nonzero(out) == 0            # adaLN-Zero: a fresh DiT outputs exactly zero


def test_dit_xl2_full_size_count_forward_and_strict_round_trip():
    """The one full-size build: parameter count, a CPU forward, and a strict load of a doc-built state dict."""
    torch.manual_seed(0)
    m = DiT_models["DiT-XL/2"](input_size=32).eval()
    table = O.expected_dit_keys(28, 1152, 2, tokens=256)
    n_params = sum(p.numel() for p in m.parameters())
    assert n_params == sum(math.prod(s) for s in table.values())
    assert 674e6 < n_params < 676e6                 # "~675M parameters"
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == table
    assert not m.pos_embed.requires_grad

    x = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        h, c = m.forward_features(x, torch.tensor([999]), torch.tensor([207]))
        out = m.forward_head(h, c)
    assert h.shape == (1, 256, 1152) and c.shape == (1, 1152) and bool(torch.isfinite(h).all())
    assert out.shape == (1, 8, 32, 32) and torch.count_nonzero(out) == 0

    # a state dict written from the documented table (one distinct constant per key; stride-0
    # tensors, so no extra memory), wrapped under "ema" as train.py saves it, loaded strictly
    sd = {k: torch.tensor(float(i + 1)).expand(shape) for i, (k, shape) in enumerate(sorted(table.items()))}
    const = {k: float(i + 1) for i, k in enumerate(sorted(table))}
    load_state_dict_strict(m, {"ema": sd})
    for k, v in m.state_dict().items():
        assert v.reshape(-1)[0].item() == const[k] and v.reshape(-1)[-1].item() == const[k], k


# ------------------------------------------------------ forward vs oracle
@pytest.mark.parametrize("cfg", [
    dict(input_size=8, patch_size=2, hidden_size=32, num_heads=2),
    dict(input_size=8, patch_size=4, hidden_size=144, num_heads=2),   # head dim 72, as DiT-XL
    dict(input_size=12, patch_size=2, hidden_size=48, num_heads=4, learn_sigma=False),
])
def test_forward_matches_float64_oracle(cfg):
    m = small_dit(**cfg)
    x, t, y = _inputs(m)
    with torch.no_grad():
        out = m(x, t, y)
    ref = O.dit_forward(m.state_dict(), x, t, y, patch=m.patch_size, heads=m.num_heads, depth=m.depth)
    assert out.shape == ref.shape == (4, m.out_channels, m.input_size, m.input_size)
    assert ref.abs().mean() > 0.1
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # a non-contiguous input gives the same result
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not xt.is_contiguous()
    with torch.no_grad():
        assert torch.equal(m(xt, t, y), out)


def test_forward_oracle_catches_a_wrong_layout():
    """Negative control: swapping two heads' q rows changes the output well beyond the tolerance."""
    m = small_dit()
    x, t, y = _inputs(m)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    w = sd["blocks.0.attn.qkv.weight"]
    w[:16], w[16:32] = w[16:32].clone(), w[:16].clone()
    ref = O.dit_forward(sd, x, t, y, patch=2, heads=2, depth=2)
    with torch.no_grad():
        out = m(x, t, y)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_forward_is_head_of_features_exactly():
    m = small_dit()
    x, t, y = _inputs(m)
    with torch.no_grad():
        full = m(x, t, y)
        h, c = m.forward_features(x, t, y)
        assert h.shape == (4, 16, 32) and c.shape == (4, 32)
        assert torch.equal(full, m.forward_head(h, c))


# --------------------------------------------------------------------- CFG
def _cfg_batch(m):
    g = torch.Generator().manual_seed(7)
    z = torch.randn(3, 4, m.input_size, m.input_size, generator=g)
    y = torch.tensor([1, 5, 9, m.num_classes, m.num_classes, m.num_classes])
    t = torch.tensor([500, 20, 999, 500, 20, 999])
    return z, y, t


@pytest.mark.parametrize("scale", [4.0, 1.5, 1.0])
def test_forward_with_cfg_guides_only_the_first_three_channels_by_default(scale):
    m = small_dit()
    z, y, t = _cfg_batch(m)
    with torch.no_grad():
        raw = m(torch.cat([z, z]), t, y)                                 # (6, 8, S, S): [cond; uncond]
        # the second half of x is ignored: the model runs the first half twice
        got = m.forward_with_cfg(torch.cat([z, torch.randn_like(z) * 50]), t, y, scale)
        got4 = m.forward_with_cfg(torch.cat([z, z]), t, y, scale, guidance_channels=4)
    cond, unc = raw[:3], raw[3:]
    guided = unc + scale * (cond - unc)
    for half in (slice(0, 3), slice(3, 6)):
        torch.testing.assert_close(got[half, :3], guided[:, :3], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got4[half, :4], guided[:, :4], rtol=1e-6, atol=1e-6)
    # eps channel 3 (official rule) and the variance channels stay each half's own
    assert torch.equal(got[:, 3:], raw[:, 3:])
    assert torch.equal(got4[:, 4:], raw[:, 4:])
    if scale == 1.0:
        torch.testing.assert_close(got[:3, :3], cond[:, :3], rtol=0, atol=1e-6)
        torch.testing.assert_close(got[3:, :3], cond[:, :3], rtol=0, atol=1e-6)
    else:
        assert not torch.allclose(got[:, 3], got4[:, 3])      # channel 3 really differs between the rules


def test_forward_with_cfg_rejects_odd_batch_and_bad_channel_count():
    m = small_dit()
    x = torch.randn(3, 4, 8, 8)
    with pytest.raises(ValueError, match="even"):
        m.forward_with_cfg(x, torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3]), 4.0)
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError):
        m.forward_with_cfg(x, torch.tensor([1, 1]), torch.tensor([1, 10]), 4.0, guidance_channels=5)


# ----------------------------------------------------------- embeddings
def test_timestep_embedding_layout_and_frequencies_by_hand():
    t = torch.tensor([0.0, 1.0, 4.0, 500.5, 999.0])
    emb = timestep_embedding(t, 256)
    assert emb.shape == (5, 256) and emb.dtype == torch.float32
    k = torch.arange(128, dtype=torch.float64)
    f = torch.exp(-math.log(10000.0) * k / 128)
    assert f[0] == 1.0 and abs(f[64].item() - 0.01) < 1e-15          # 10000^(-1/2)
    arg = t.double()[:, None] * f[None]
    torch.testing.assert_close(emb[:, :128].double(), torch.cos(arg), rtol=0, atol=1e-4)   # [cos | sin]
    torch.testing.assert_close(emb[:, 128:].double(), torch.sin(arg), rtol=0, atol=1e-4)
    assert torch.equal(emb[0, :128], torch.ones(128)) and torch.equal(emb[0, 128:], torch.zeros(128))
    torch.testing.assert_close(emb.double(), O.timestep_sinusoid(t, 256), rtol=0, atol=1e-4)
    # the embedder feeds exactly this sinusoid into Linear, SiLU, Linear
    m = small_dit()
    te = m.t_embedder
    with torch.no_grad():
        want = te.mlp[2](torch.nn.functional.silu(te.mlp[0](timestep_embedding(t, 256))))
        assert torch.equal(te(t), want)


def test_pos_embed_is_2d_sincos_by_hand():
    G, H = 4, 16
    table = get_2d_sincos_pos_embed(H, G)
    assert table.shape == (G * G, H)
    ref = O.sincos_2d(H, G)
    torch.testing.assert_close(torch.from_numpy(table).double(), ref, rtol=0, atol=1e-12)
    # spelled out for token (row 2, column 3): first half is the COLUMN, second half the ROW
    n = 2 * G + 3
    w = [1.0, 10000 ** (-1 / 4), 10000 ** (-2 / 4), 10000 ** (-3 / 4)]
    expect = [math.sin(3 * v) for v in w] + [math.cos(3 * v) for v in w] + \
             [math.sin(2 * v) for v in w] + [math.cos(2 * v) for v in w]
    assert table[n].tolist() == pytest.approx(expect, abs=1e-12)
    # the model's (non-trainable) parameter holds it, in fp32
    m = DiT(input_size=8, patch_size=2, hidden_size=H, depth=1, num_heads=2, num_classes=10)
    assert m.pos_embed.shape == (1, G * G, H) and not m.pos_embed.requires_grad
    torch.testing.assert_close(m.pos_embed[0].double(), ref, rtol=0, atol=1e-6)


def test_label_embedding_has_null_row_and_dropout_follows_train_mode():
    m = small_dit(num_classes=10)
    assert m.y_embedder.embedding_table.weight.shape == (11, 32)
    assert DiT(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=10,
               class_dropout_prob=0.0).y_embedder.embedding_table.weight.shape == (10, 32)   # no null row
    # official: labels are dropped to the null class only in train() mode
    m1 = small_dit(num_classes=10, class_dropout_prob=1.0)
    x, t, y = _inputs(m1)
    y = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        ev = m1.eval()(x, t, y)
        null = m1(x, t, torch.full_like(y, 10))
        tr = m1.train()(x, t, y)
    assert not torch.allclose(ev, null)
    assert torch.equal(tr, null)


# ------------------------------------------------------------------- errors
def test_clear_errors_for_bad_inputs():
    m = small_dit()
    x, t, y = _inputs(m)
    with pytest.raises(ValueError, match="shape"):
        m(torch.randn(4, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match="shape"):
        m(torch.randn(4, 4, 8, 9), t, y)
    with pytest.raises(ValueError, match="shape"):
        m(torch.randn(4, 4, 8), t, y)
    with pytest.raises(TypeError, match="floating"):
        m(torch.zeros(4, 4, 8, 8, dtype=torch.int64), t, y)
    with pytest.raises(TypeError, match="integer"):
        m(x, t, y.float())
    with pytest.raises(ValueError, match="t must"):
        m(x, t[:3], y)
    with pytest.raises(ValueError, match="y must"):
        m(x, t, y[:2])
    bad = x.clone()
    bad[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        m(bad, t, y)
    with pytest.raises(KeyError, match="DiT-XL/2"):            # the message lists the valid names
        create_model("DiT-XXL/2")
    assert isinstance(create_model("DiT-S/8", input_size=8), DiT)


# ------------------------------------------------------------------ loading
def test_find_model_reads_pt_ema_and_safetensors(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    m = small_dit()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    torch.save(sd, tmp_path / "plain.pt")
    torch.save({"model": {k: v * 0 for k, v in sd.items()}, "ema": sd, "opt": {}, "args": None},
               tmp_path / "train.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    x, t, y = _inputs(m)
    with torch.no_grad():
        want = m(x, t, y)
    for name in ("plain.pt", "train.pt", "w.safetensors"):
        got = find_model(str(tmp_path / name))
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd), name
        fresh = DiT(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10).eval()
        load_state_dict_strict(fresh, got)
        with torch.no_grad():
            assert torch.equal(fresh(x, t, y), want), name
        fresh2 = DiT(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10).eval()
        fresh2.load_state_dict(got, strict=True)         # the official sample.py call
        with torch.no_grad():
            assert torch.equal(fresh2(x, t, y), want), name
    # an "ema"-wrapped dict also loads directly
    fresh = DiT(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10).eval()
    load_state_dict_strict(fresh, {"ema": sd})
    assert all(torch.equal(fresh.state_dict()[k], sd[k]) for k in sd)
    with pytest.raises(FileNotFoundError):
        find_model(str(tmp_path / "missing.pt"))


def test_load_state_dict_strict_names_missing_extra_and_misshaped_keys():
    m = small_dit()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    missing = dict(sd)
    del missing["blocks.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"missing keys \(1\).*blocks\.1\.mlp\.fc2\.bias"):
        load_state_dict_strict(m, missing)
    extra = dict(sd, **{"blocks.2.attn.qkv.weight": torch.zeros(96, 32)})
    with pytest.raises(ValueError, match=r"unexpected keys \(1\).*blocks\.2\.attn\.qkv\.weight"):
        load_state_dict_strict(m, extra)
    shaped = dict(sd, **{"y_embedder.embedding_table.weight": torch.zeros(10, 32)})   # no null row
    with pytest.raises(ValueError, match=r"shape mismatches \(1\).*y_embedder.*\(10, 32\).*\(11, 32\)"):
        load_state_dict_strict(m, shaped)
    # nothing was modified by the failed loads
    assert all(torch.equal(m.state_dict()[k], sd[k]) for k in sd)
