"""One drafter for every respacing: the stride conditioning, old drafter files, the folded inference path."""
from __future__ import annotations

import json

import pytest
import torch

from free_kernels import ops
from free_kernels.models import DiT, FeatureDrafter


def _target():
    torch.manual_seed(0)
    m = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=2, num_classes=3,
            learn_sigma=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.05))
    return m.eval()


def _inputs(B=3):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(B, 16, 32, generator=g)
    x = torch.randn(B, 2, 8, 8, generator=g)
    t = torch.tensor([999, 500, 20][:B])
    y = torch.tensor([0, 3, 1][:B])
    return h, x, t, y


def _old_forward(d, target, h, x, t, y):
    """The drafter before the stride conditioning, written out."""
    e = target.embed_tokens(x)
    c = target.embed_condition(t, y)
    h = d.fuse(torch.cat([h, e], dim=-1))
    for blk in d.blocks:
        h = blk(h, c)
    return h


def _drafter(target, stride=False):
    d = FeatureDrafter.for_target(target, depth=2, init="random", generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        d.stride_proj.weight.zero_()
        if stride:
            d.stride_proj.weight.normal_(std=0.5, generator=torch.Generator().manual_seed(4))
    return d


@pytest.mark.parametrize("fast", [False, True])
def test_zero_stride_conditioning_is_the_old_drafter_bit_for_bit(fast):
    target = _target()
    d = _drafter(target)
    d.fast_inference = fast
    h, x, t, y = _inputs()
    with torch.no_grad():
        ref = _old_forward(d, target, h, x, t, y)
        plain = d(h, x, t, y)
        both = d(h, x, t, y, t_next=t - 20, c=target.embed_condition(t, y))
    assert torch.equal(plain, both)
    if fast:  # the folded path: the same function up to float rounding
        torch.testing.assert_close(plain, ref, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(plain, ref)
    # through the protocol op (as the sampler calls it)
    with torch.no_grad():
        via = ops.drafter_forward(d, h, x, t, y, t_next=t - 4, c=target.embed_condition(t, y))
    assert torch.equal(via, plain)


def test_stride_conditioning_changes_the_draft_and_fast_path_matches():
    target = _target()
    d = _drafter(target, stride=True)
    h, x, t, y = _inputs()
    c = target.embed_condition(t, y)
    with torch.no_grad():
        a = d(h, x, t, y, t_next=t - 1, c=c)
        b = d(h, x, t, y, t_next=t - 20, c=c)
        none = d(h, x, t, y, c=c)
        d.fast_inference = False
        a_ref = d(h, x, t, y, t_next=t - 1, c=c)
        none_ref = d(h, x, t, y)
    assert not torch.allclose(a, b) and not torch.allclose(a, none)
    torch.testing.assert_close(a, a_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(none, none_ref, rtol=1e-5, atol=1e-5)
    # the module path (training) gets gradients into the stride projection
    d.fast_inference = True
    out = d(h, x, t, y, t_next=t - 20, c=c)
    out.square().mean().backward()
    assert d.stride_proj.weight.grad is not None and d.stride_proj.weight.grad.abs().sum() > 0


def test_inference_path_follows_weight_updates():
    target = _target()
    d = _drafter(target)
    h, x, t, y = _inputs()
    with torch.no_grad():
        before = d(h, x, t, y, t_next=t - 4)
        d.stride_proj.weight.normal_(std=0.5, generator=torch.Generator().manual_seed(5))
        d.fuse.bias.add_(0.1)
        new = d(h, x, t, y, t_next=t - 4)
        d.fast_inference = False
        ref = d(h, x, t, y, t_next=t - 4)
    assert (new - before).abs().max() > 1e-2  # not the cached folded weights of the old parameters
    torch.testing.assert_close(new, ref, rtol=1e-4, atol=1e-4)


def test_drafter_file_without_stride_weights_loads_with_them_zero(tmp_path):
    from safetensors.torch import load_file, save_file

    target = _target()
    d = _drafter(target)
    path = str(tmp_path / "old")
    d.save(path, extra=dict(note="old"))
    # rewrite as a file from before the stride conditioning: no stride weights, no config key
    state = {k: v for k, v in load_file(path + ".safetensors").items() if not k.startswith("stride_proj")}
    cfg = json.load(open(path + ".json"))
    cfg.pop("stride_conditioning")
    save_file(state, path + ".safetensors")  # no metadata: the config comes from the .json
    json.dump(cfg, open(path + ".json", "w"))
    old = FeatureDrafter.load(path, target=target)
    assert torch.equal(old.stride_proj.weight, torch.zeros_like(old.stride_proj.weight))
    assert "absent" in old.extra["stride_conditioning"] and old.extra["note"] == "old"
    h, x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(old(h, x, t, y, t_next=t - 20), d(h, x, t, y))
    # a new file round-trips its stride weights
    s = _drafter(target, stride=True)
    s.save(str(tmp_path / "new"))
    back = FeatureDrafter.load(str(tmp_path / "new"), target=target)
    assert torch.equal(back.stride_proj.weight, s.stride_proj.weight) and "stride_conditioning" not in back.extra
    assert FeatureDrafter.read_config(str(tmp_path / "new"))["stride_conditioning"] is True


@pytest.mark.parametrize("fast", [False, True])
def test_wrong_parent_features_are_named_on_both_paths(fast):
    target = _target()
    d = _drafter(target)
    d.fast_inference = fast
    h, x, t, y = _inputs()
    with torch.no_grad(), pytest.raises(ValueError, match=r"h_prev has shape \(3, 15, 32\), expected \(3, 16, 32\)"):
        d(h[:, :15], x, t, y, t_next=t - 4)


def test_inference_path_skips_the_patch_embedding(monkeypatch):
    """The folded path has the patch embedding inside its fusion GEMM; it must not compute it again."""
    target = _target()
    d = _drafter(target)
    h, x, t, y = _inputs()
    calls = []
    conv = target.x_embedder.proj
    monkeypatch.setattr(conv, "forward", lambda inp, _f=conv.forward: calls.append(1) or _f(inp))
    with torch.no_grad():
        d(h, x, t, y, t_next=t - 4)
        assert calls == []
        d.fast_inference = False
        d(h, x, t, y, t_next=t - 4)
    assert calls == [1]


def test_draft_condition_is_the_targets_conditioning_from_a_table():
    target = _target()
    d = _drafter(target)
    _, _, t, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(d.draft_condition(t, y), target.embed_condition(t, y), rtol=1e-5, atol=1e-5)
        assert d._t_table[1].shape == (1000, 32)
        # the table follows the target's weights
        target.t_embedder.mlp[2].bias.add_(0.5)
        torch.testing.assert_close(d.draft_condition(t, y), target.embed_condition(t, y), rtol=1e-5, atol=1e-5)
        # outside the table's timesteps: the target's own embedder
        for far in (torch.tensor([1500, 3, 7]), torch.tensor([3, -1, 7])):
            torch.testing.assert_close(d.draft_condition(far, y), target.embed_condition(far, y))
        # the label part follows the target's embedding table too
        target.y_embedder.embedding_table.weight.mul_(1.5)
        torch.testing.assert_close(d.draft_condition(t, y), target.embed_condition(t, y), rtol=1e-5, atol=1e-5)
    # with autograd (training) the target's embedder runs, so gradients reach it
    c = d.draft_condition(t, y)
    assert c.requires_grad and c.grad_fn is not None


def test_sampler_draft_steps_use_the_drafters_condition(monkeypatch):
    import free_kernels as fk

    target = _target()
    d = _drafter(target)
    calls = []
    orig = FeatureDrafter.draft_condition

    def spy(self, t, y):
        calls.append(t.shape[0])
        return orig(self, t, y)

    monkeypatch.setattr(FeatureDrafter, "draft_condition", spy)
    s = fk.FreeSampler(target, d, fk.create_diffusion("10", learn_sigma=True), draft_length=3)
    _, st = s.sample(torch.randn(2, 2, 8, 8), torch.tensor([0, 1]), cfg_scale=2.0,
                     generator=torch.Generator().manual_seed(0))
    assert len(calls) == st.drafter_calls and set(calls) <= {2, 4}  # G * rows drafting
