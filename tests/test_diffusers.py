"""diffusers' DiTTransformer2DModel as a FREE target, checked against diffusers itself.

Exact (torch.equal) claims: adapter forward vs diffusers ``.sample``; forward ==
forward_head(forward_features); the CFG rule vs a hand computation; the weight
round trip; official <-> stock reconversion.  Approximate claims carry the
tolerance measured for them (see the module docstring of
free_kernels.models.diffusers_convert).
"""
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DiTTransformer2DModel  # noqa: E402

from free_kernels.models.dit import DiT  # noqa: E402
from free_kernels.models.diffusers_adapter import DiffusersDiTTarget  # noqa: E402
from free_kernels.models.diffusers_convert import (  # noqa: E402
    convert_diffusers_to_dit,
    convert_dit_to_diffusers,
    set_timestep_semantics,
)

CFG = dict(
    num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2,
    sample_size=8, patch_size=2, num_embeds_ada_norm=10,
)
STD = 0.1  # every weight ~ N(0, STD^2): outputs of max ~3, nothing zero-initialised left


def _make(shared: bool = True, norm_eps: float = 1e-5, seed: int = 1) -> DiTTransformer2DModel:
    m = DiTTransformer2DModel(**CFG, norm_eps=norm_eps)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in m.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * STD)
        if shared:  # what converted hub checkpoints look like
            ref = m.transformer_blocks[0].norm1.emb.state_dict()
            for b in m.transformer_blocks[1:]:
                b.norm1.emb.load_state_dict(ref)
    return m.eval()


def _inputs(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    t[0], t[1] = 0, 999
    y = torch.randint(0, 10, (B,), generator=g)
    y[-1] = 10  # null class
    return x, t, y


def _sample(m, x, t, y):
    with torch.no_grad():
        return m(x, timestep=t, class_labels=y).sample


@pytest.fixture(scope="module")
def shared_model():
    return _make(shared=True)


@pytest.fixture(scope="module")
def unshared_model():
    return _make(shared=False, seed=2)


# ------------------------------------------------------------------- adapter
@pytest.mark.parametrize("which", ["shared", "unshared"])
def test_adapter_forward_is_bit_identical_to_diffusers(which, shared_model, unshared_model):
    m = shared_model if which == "shared" else unshared_model
    a = DiffusersDiTTarget(m)
    assert a.shares_condition_embedding() == (which == "shared")
    x, t, y = _inputs()
    ref = _sample(m, x, t, y)
    assert ref.abs().max() > 0.5  # not the adaLN-Zero all-zeros function
    with torch.no_grad():
        out = a(x, t, y)
        h, c = a.forward_features(x, t, y)
        split = a.forward_head(h, c)
    assert out.shape == (6, 8, 8, 8)
    assert torch.equal(out, ref)  # exact, not "close"
    assert torch.equal(split, out)
    assert h.shape == (6, 16, 64) and c.shape == (6, 64)


def test_adapter_attributes(shared_model):
    a = DiffusersDiTTarget(shared_model)
    assert (a.in_channels, a.out_channels, a.learn_sigma, a.patch_size) == (4, 8, True, 2)
    assert (a.hidden_size, a.input_size, a.num_classes, a.num_heads, a.depth) == (64, 8, 10, 2, 2)
    assert DiffusersDiTTarget(a).model is shared_model  # re-wrapping unwraps


def test_embeddings_match_diffusers_modules(unshared_model):
    m = unshared_model
    a = DiffusersDiTTarget(m)
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(a.embed_tokens(x), m.pos_embed(x))
        c = a.embed_condition(t, y)
        assert torch.equal(c, m.transformer_blocks[0].norm1.emb(t, y, hidden_dtype=torch.float32))
        assert torch.equal(a.forward_features(x, t, y)[1], c)
        per_block = a.block_conditions(t, y)
    assert per_block.shape == (2, 6, 64)
    assert torch.equal(per_block[0], c)
    assert not torch.equal(per_block[1], c)  # unshared embedders really differ


def test_cfg_guides_all_four_channels_by_default(shared_model):
    a = DiffusersDiTTarget(shared_model)
    x, t, _ = _inputs(B=4)
    x = torch.cat([x[:2], torch.randn(2, 4, 8, 8)])  # second half is ignored, as in the official code
    t = torch.cat([t[:2], t[:2]])
    y = torch.tensor([3, 7, 10, 10])
    s = 4.0
    with torch.no_grad():
        out4 = a.forward_with_cfg(x, t, y, s)
        out3 = a.forward_with_cfg(x, t, y, s, guidance_channels=3)
    raw = _sample(shared_model, torch.cat([x[:2], x[:2]]), t, y)
    # DiTPipeline's rule, written out by hand
    cond, uncond = raw[:2], raw[2:]
    guided = uncond[:, :4] + s * (cond[:, :4] - uncond[:, :4])
    want4 = torch.cat([torch.cat([guided, cond[:, 4:]], 1), torch.cat([guided, uncond[:, 4:]], 1)])
    assert torch.equal(out4, want4)
    # official rule: channel 3 stays each half's own
    assert torch.equal(out3[:, :3], want4[:, :3])
    assert torch.equal(out3[:, 3:], raw[:, 3:])
    with pytest.raises(ValueError, match="doubled batch"):
        a.forward_with_cfg(x[:3], t[:3], y[:3], s)


def test_bf16_adapter_is_bit_identical(shared_model):
    import copy

    m = copy.deepcopy(shared_model).to(torch.bfloat16)
    a = DiffusersDiTTarget(m)
    x, t, y = _inputs(B=2)
    x = x.bfloat16()
    with torch.no_grad():
        out = a(x, t, y)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, _sample(m, x, t, y))


def test_clear_errors_for_bad_inputs(shared_model):
    a = DiffusersDiTTarget(shared_model)
    x, t, y = _inputs(B=2)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 4, 8, 8\)"):
        a(torch.randn(2, 4, 16, 16), t, y)
    with pytest.raises(ValueError, match="x must have shape"):
        a(torch.randn(2, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match="x must have shape"):
        a(torch.randn(4, 8, 8), t, y)
    with pytest.raises(TypeError, match="floating-point"):
        a(x.long(), t, y)
    with pytest.raises(ValueError, match="t must be a 1-D tensor of 2"):
        a(x, t[:1], y)
    with pytest.raises(ValueError, match="y must be a 1-D tensor of 2"):
        a(x, t, y[None])
    with pytest.raises(TypeError, match="integer tensor"):
        a(x, t, y.float())
    with pytest.raises(ValueError, match="NaN"):
        a(torch.full_like(x, float("nan")), t, y)
    with pytest.raises(ValueError, match=r"h must have shape \(B, N, 64\)"):
        a.forward_head(torch.randn(2, 16, 32), torch.randn(2, 64))
    with pytest.raises(ValueError, match=r"c must have shape \(2, 64\)"):
        a.forward_head(torch.randn(2, 16, 64), torch.randn(3, 64))
    with pytest.raises(TypeError, match="DiTTransformer2DModel"):
        DiffusersDiTTarget(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- conversion
def test_conversion_state_dict_round_trip_is_exact(shared_model):
    kw, sd = convert_diffusers_to_dit(shared_model)
    assert kw == dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                      mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=True)
    dit = DiT(**kw)
    dit.load_state_dict(sd, strict=True)
    # the same conversion from a bare state dict (+ the two numbers it cannot hold)
    kw2, sd2 = convert_diffusers_to_dit(shared_model.state_dict(), num_heads=2, input_size=8)
    assert kw2 == kw and sd2.keys() == sd.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    for semantics in ("official", "diffusers"):
        back = convert_dit_to_diffusers(dit, semantics=semantics)
        kw3, sd3 = convert_diffusers_to_dit(back)
        assert kw3 == kw and all(torch.equal(sd[k], sd3[k]) for k in sd)
    # diffusers -> ours -> diffusers("diffusers" semantics) reproduces the original model exactly
    back = convert_dit_to_diffusers(dit, semantics="diffusers")
    x, t, y = _inputs()
    assert torch.equal(_sample(back, x, t, y), _sample(shared_model, x, t, y))


def test_converted_dit_matches_official_semantics_to_fp32_rounding(shared_model):
    kw, sd = convert_diffusers_to_dit(shared_model)
    dit = DiT(**kw).eval()
    dit.load_state_dict(sd, strict=True)
    back = convert_dit_to_diffusers(dit, semantics="official")
    x, t, y = _inputs()
    with torch.no_grad():
        ours = dit(x, t, y)
    theirs = _sample(back, x, t, y)
    scale = ours.abs().max().item()
    assert scale > 0.5
    # measured max |diff| ~7e-7 on outputs of max ~3 (split vs fused qkv, SDPA vs reference attention)
    assert (ours - theirs).abs().max().item() <= 1e-5 * scale
    # features too, through the adapter, so a drafter trained on one side transfers
    with torch.no_grad():
        h_ours, c_ours = dit.forward_features(x, t, y)
        h_th, c_th = DiffusersDiTTarget(back).forward_features(x, t, y)
    assert torch.equal(c_ours, c_th)  # measured: same ops, same bits
    assert (h_ours - h_th).abs().max() <= 1e-5 * h_ours.abs().max()


def test_converted_dit_differs_from_stock_diffusers_as_measured(shared_model):
    """Stock diffusers (timestep freqs /127, MLP LayerNorm eps 1e-5) is a different function."""
    kw, sd = convert_diffusers_to_dit(shared_model)
    dit = DiT(**kw).eval()
    dit.load_state_dict(sd, strict=True)
    x, t, y = _inputs()
    with torch.no_grad():
        ours = dit(x, t, y)
    stock = _sample(shared_model, x, t, y)
    full = (ours - stock).abs().max().item()
    # measured: ~1.4 on outputs of max ~3 -- the timestep frequencies dominate
    assert 0.05 < full < 5.0
    import copy

    m = copy.deepcopy(shared_model)
    set_timestep_semantics(m, "official")  # leaves only the eps 1e-5 vs 1e-6 difference
    eps_only = (ours - _sample(m, x, t, y)).abs().max().item()
    assert 1e-7 < eps_only < 1e-4  # measured ~1.5e-5
    set_timestep_semantics(m, "diffusers")
    assert torch.equal(_sample(m, x, t, y), stock)  # the switch is reversible


def test_conversion_errors(unshared_model, shared_model):
    with pytest.raises(ValueError, match="conditioning embedders different"):
        convert_diffusers_to_dit(unshared_model)
    kw, sd = convert_diffusers_to_dit(unshared_model, unshared_embeddings="first")
    assert torch.equal(sd["t_embedder.mlp.0.weight"],
                       unshared_model.transformer_blocks[0].norm1.emb.timestep_embedder.linear_1.weight)
    with pytest.raises(ValueError, match="num_heads= and input_size="):
        convert_diffusers_to_dit(shared_model.state_dict())
    bad = dict(shared_model.state_dict())
    bad.pop("transformer_blocks.1.attn1.to_k.bias")
    with pytest.raises(ValueError, match="missing"):
        convert_diffusers_to_dit(bad, num_heads=2, input_size=8)
    with pytest.raises(TypeError, match="DiTTransformer2DModel"):
        convert_diffusers_to_dit(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="semantics"):
        set_timestep_semantics(shared_model, "both")


def test_dit_without_null_row_and_bad_mlp_ratio():
    torch.manual_seed(0)
    dit = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=2,
              class_dropout_prob=0.0, num_classes=10).eval()
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn_like(p) * STD)
    m = convert_dit_to_diffusers(dit)  # official semantics
    table = m.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    assert table.shape == (11, 64) and torch.equal(table[10], torch.zeros(64))  # padded null row
    x, t, y = _inputs()
    y[-1] = 9  # no null class in this model
    with torch.no_grad():
        ours = dit(x, t, y)
    assert (ours - _sample(m, x, t, y)).abs().max() <= 1e-5 * ours.abs().max()
    with pytest.raises(ValueError, match="MLP ratio of 4"):
        convert_dit_to_diffusers(DiT(input_size=8, patch_size=2, hidden_size=64, depth=1, num_heads=2,
                                     mlp_ratio=2.0, num_classes=10))
