"""oneDNN-packed linear layers for CPU inference (lmforge/inference/packed.py)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.inference.packed import PackedLinear, pack_linears


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
