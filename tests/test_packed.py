"""oneDNN-packed linear layers for CPU inference (lmforge/inference/packed.py)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.inference.packed import PackedLinear, pack_linears
from lmforge.models.transformer import GPT, GPTConfig, project


def packed_model(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 40, bias=False)).to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pack_linears(model)
    return model, before


def reference(model, x):
    h = F.gelu(F.linear(x, model[0].weight, model[0].bias))
    return F.linear(h, model[2].weight)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_packed_layers_compute_what_linear_computes(dtype, tol):
    model, before = packed_model(dtype)
    if not isinstance(model[0], PackedLinear):
        pytest.skip("this torch build has no oneDNN")
    assert isinstance(model[0], nn.Linear)  # still found by everything that looks for linear layers
    assert model.state_dict().keys() == before.keys()
    for rows in (1, 3, 40):
        x = torch.randn(rows, 64).to(dtype)
        with torch.inference_mode():
            got = model(x)
        assert model[0]._packed is not None and model[2]._packed is not None  # the packed path ran
        want = reference(model, x)
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * float(want.abs().max()))


def test_a_changed_weight_is_repacked_and_gradients_take_the_plain_path():
    model, _ = packed_model()
    x = torch.randn(2, 64)
    with torch.inference_mode():
        model(x)
    old = model[0]._packed
    with torch.no_grad():
        model[0].weight.mul_(-2.0)  # trained in between (an in-place update, as optimizers do)
    with torch.inference_mode():
        got = model(x)
    assert model[0]._packed is not old
    torch.testing.assert_close(got, reference(model, x), rtol=1e-5, atol=1e-5)
    out = model(x)  # gradients on: F.linear, so they reach the weights
    out.sum().backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


def test_a_packed_model_can_be_copied():
    """The packed copy is an opaque oneDNN tensor, which cannot be deep-copied; a copy packs its own."""
    model, _ = packed_model()
    with torch.inference_mode():
        model(torch.randn(1, 64))
    clone = copy.deepcopy(model)
    assert clone[0]._packed is None
    with torch.inference_mode():
        x = torch.randn(1, 64)
        torch.testing.assert_close(clone(x), model(x))


class ThreeHeads(nn.Module):
    """Three projections of one input, as q/k/v are (widths differ, as with grouped-query attention)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(1)
        self.q, self.k, self.v = nn.Linear(64, 96), nn.Linear(64, 32, bias=False), nn.Linear(64, 32)
        self.to(dtype)

    def forward(self, x):
        return project(x, self.q, self.k, self.v)

    def reference(self, x):
        return [F.linear(x, m.weight, m.bias) for m in (self.q, self.k, self.v)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_layers_that_read_one_input_are_packed_as_one_matrix(dtype, tol):
    heads = pack_linears(ThreeHeads(dtype))
    if not isinstance(heads.q, PackedLinear):
        pytest.skip("this torch build has no oneDNN")
    for rows in (1, 5):
        x = torch.randn(rows, 64).to(dtype)
        with torch.inference_mode():
            got = heads(x)
        assert heads.q._packed_sizes == [96, 32, 32]  # one stacked product ...
        assert heads.k._packed is None and heads.v._packed is None  # ... not three
        for g, w in zip(got, heads.reference(x)):
            torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol * float(w.abs().max()))
    with torch.no_grad():
        heads.v.bias.add_(1.0)  # any member's change repacks the stack
    with torch.inference_mode():
        got = heads(x)
    torch.testing.assert_close(got[2].float(), heads.reference(x)[2].float(), rtol=tol, atol=tol * 4)


def test_a_group_with_an_unpacked_member_runs_each_layer_on_its_own():
    heads = pack_linears(ThreeHeads())
    heads.k.__class__ = nn.Linear  # e.g. replaced by a quantized or LoRA layer
    x = torch.randn(2, 64)
    with torch.inference_mode():
        got = heads(x)
    assert heads.q._packed_sizes in (None, [96])  # packed alone, if at all
    for g, w in zip(got, heads.reference(x)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    out = ThreeHeads()(x)  # plain layers, gradients on: [layer(x) ...]
    assert all(t.requires_grad for t in out)


def test_the_transformer_computes_the_same_with_fused_projections():
    cfg = GPTConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16, mlp="swiglu")
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 64, (2, 9))
    with torch.inference_mode():
        want = model(idx)
        pack_linears(model)
        got = model(idx)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    if isinstance(attn.q_proj, PackedLinear):
        assert attn.q_proj._packed_sizes == [32, 16, 16] and mlp.gate_proj._packed_sizes == [cfg.hidden_dim] * 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
