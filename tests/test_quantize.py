import copy

import pytest
import torch
import torch.nn as nn

import lmforge.quantize as qz
from lmforge.common import LmforgeError
from lmforge.models.transformer import GPT, get_config
from lmforge.quantize import (
    QuantLinear,
    linear_memory_bytes,
    model_memory_bytes,
    pack_int4,
    quantize_model,
    unpack_int4,
)
from lmforge.train.checkpoint import load_model, save_quantized


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def linear(k=256, n=384, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


@pytest.fixture(params=[True, False], ids=["kernel", "fallback"])
def kernels(request, monkeypatch):
    """Run a test on the fused CPU kernels (when this build has them) and on the dequantize fallback."""
    if request.param:
        if not (qz.kernel_available(8) and qz.kernel_available(4)):
            pytest.skip("this torch build lacks the fused CPU kernels")
    else:
        monkeypatch.setattr(qz, "kernel_available", lambda bits: False)
    return request.param


# ----------------------------------------------------------------------------- single layers


@pytest.mark.parametrize("bits,group_size,tol", [(8, None, 0.01), (4, 64, 0.08), (4, 32, 0.075)])
def test_quantlinear_close_to_float(kernels, bits, group_size, tol):
    lin = linear()
    q = QuantLinear.from_linear(lin, bits, group_size)
    assert q.use_kernel == kernels
    x = torch.randn(2, 5, 256)
    with torch.no_grad():
        ref, y = lin(x), q(x)
        assert y.shape == ref.shape and y.dtype == torch.float32
        assert rel_err(y, ref) < tol
        yb = q(x.bfloat16())  # bf16 activations, as under autocast
        assert yb.dtype == torch.bfloat16 and rel_err(yb, ref) < tol + 0.01
        xl = torch.randn(80, 256)  # a prompt's worth of rows (int8 on CPU: the dense path)
        assert rel_err(q(xl), lin(xl)) < tol


def test_smaller_groups_are_more_accurate():
    lin = linear(bias=False)
    w = lin.weight
    errs = [rel_err(QuantLinear.from_linear(lin, 4, g).dequantize(), w) for g in (32, 64, 128)]
    assert errs[0] < errs[1] < errs[2]


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32), (4, 64)])
def test_dequantized_weights_within_half_a_step(bits, group_size):
    lin = linear(bias=False)
    w = lin.weight.detach()
    q = QuantLinear.from_linear(lin, bits, group_size)
    err = (q.dequantize() - w).abs()
    if bits == 8:
        step = q.scales[:, None]
    else:
        step = q.scales_and_zeros[..., 0].t().repeat_interleave(group_size, dim=1)  # [N, K]
    assert (err <= step / 2 * (1 + 1e-4) + 1e-7).all()


def test_int4_packing_round_trips_exactly():
    codes = torch.randint(0, 16, (48, 96), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (48, 48) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    if qz.kernel_available(4):  # the kernel's private layout, recovered by probing
        assert torch.equal(qz._from_kernel_layout(qz._to_kernel_layout(codes), 48, 96), codes)


def test_state_dict_uses_the_plain_layout_on_every_path(monkeypatch):
    lin = linear(bias=False)
    fast = QuantLinear.from_linear(lin, 4, 32)
    monkeypatch.setattr(qz, "kernel_available", lambda bits: False)
    slow = QuantLinear.from_linear(lin, 4, 32)
    sd = fast.state_dict()
    assert sd.keys() == slow.state_dict().keys() == {"qweight", "scales_and_zeros"}
    assert all(torch.equal(sd[k], slow.state_dict()[k]) for k in sd)
    # ...and a plain state dict loads into a kernel-layout layer.
    monkeypatch.undo()
    other = QuantLinear(256, 384, 4, 32)
    other.load_state_dict(sd)
    x = torch.randn(3, 256)
    with torch.no_grad():
        assert torch.equal(other(x), fast(x))
        assert rel_err(other(x), slow(x)) < 0.01  # bf16 kernel vs fp32 fallback


@pytest.mark.parametrize("bits", [8, 4])
def test_switching_to_the_fallback_keeps_the_weights(monkeypatch, bits):
    """What happens when a layer leaves the CPU: the int4 codes return to the plain layout."""
    q = QuantLinear.from_linear(linear(), bits, 32)
    before = q.state_dict()
    x = torch.randn(3, 256)
    with torch.no_grad():
        fast = q(x)
        monkeypatch.setattr(qz, "kernel_available", lambda bits: False)
        q.select_path()
        assert not q.use_kernel and not q.kernel_layout
        assert rel_err(q(x), fast) < 0.01
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def test_bad_settings_are_user_errors():
    with pytest.raises(LmforgeError, match="group size"):
        QuantLinear.from_linear(linear(k=96), 4, 64)
    with pytest.raises(LmforgeError, match="bits"):
        QuantLinear(64, 64, bits=3)


# ----------------------------------------------------------------------------- whole models


def tiny_gpt(**overrides):
    torch.manual_seed(0)
    return GPT(get_config("tiny", **overrides)).eval()


def corr(a, b):
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


def test_quantized_gpt_logits_and_memory():
    model = tiny_gpt()
    # Random init gives near-uniform logits; a larger spread makes the comparison meaningful.
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    idx = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        ref = model(idx)
        q8 = quantize_model(copy.deepcopy(model), bits=8)
        q4 = quantize_model(copy.deepcopy(model), bits=4, group_size=32)
        q4_body = quantize_model(copy.deepcopy(model), bits=4, group_size=64, include_lm_head=False)
        assert corr(q8(idx), ref) > 0.999
        assert corr(q4(idx), ref) > 0.99
        assert corr(q4_body(idx), ref) > 0.99
    assert isinstance(q4.lm_head, QuantLinear) and isinstance(q4_body.lm_head, nn.Linear)
    assert not any(isinstance(m, nn.Linear) for m in q8.modules())
    lin = linear_memory_bytes(model)
    assert linear_memory_bytes(q8) < 0.3 * lin  # 1 byte per weight + 4 per row
    assert linear_memory_bytes(q4) < 0.2 * lin  # 0.5 byte per weight + 8 per 32 weights
    assert model_memory_bytes(q4) < model_memory_bytes(q8) < model_memory_bytes(model)


def test_tied_head_gets_a_quantized_copy_and_bias_is_kept(tmp_path):
    """The head reads the whole table at every token: it is quantized, the float table stays for lookups."""
    model = tiny_gpt(mlp="gelu", norm="layer", pos="learned", tie_embeddings=True, bias=True)
    idx = torch.randint(0, 512, (1, 16))
    q = quantize_model(copy.deepcopy(model), bits=4, group_size=32)
    assert isinstance(q.lm_head, QuantLinear) and q.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(q.embed_tokens.weight, model.embed_tokens.weight)
    assert q.layers[0].mlp.up_proj.bias is not None
    with torch.no_grad():
        assert corr(q(idx), model(idx)) > 0.99
        loaded, state = load_model(save_quantized(q, tmp_path / "q"))
        assert torch.equal(loaded(idx), q(idx))
    assert state["quantization"] == {"bits": 4, "group_size": 32, "include_lm_head": True}
    body_only = quantize_model(copy.deepcopy(model), bits=8, include_lm_head=False)
    assert isinstance(body_only.lm_head, nn.Linear) and body_only.lm_head.weight is body_only.embed_tokens.weight


def test_int8_single_token_path_quantizes_activations_within_its_tolerance(kernels):
    """One token (decode at batch 1) runs int8 x int8 through fbgemm: the activations are rounded to
    int8 too, so it is a little further from the float layer than the weight-only paths, and it
    agrees with them to that rounding."""
    lin = linear(768, 1024)
    q = QuantLinear.from_linear(lin, 8)
    if "fbgemm" in torch.backends.quantized.supported_engines:
        assert q._packed is not None
    with torch.no_grad():
        x = torch.randn(1, 768) * 3
        one = q(x)
        weight_only = nn.functional.linear(x, q.dequantize())
        # The activations' rounding: one scale for the token's 768 values, 255 levels (Gaussian data:
        # ~1.3%; a wrong scale, layout or sign would be O(1)).
        assert rel_err(one, weight_only) < 0.02
        assert rel_err(one, lin(x)) < 0.025
        assert torch.equal(q(x.expand(2, 768))[0], q(torch.cat([x, x]))[0])  # batches stay weight-only
        assert rel_err(q(torch.cat([x, x]))[0], weight_only[0]) < 0.02  # bf16 activations: ~1%


def test_int8_layers_that_read_one_token_are_one_product():
    """q/k/v (or gate/up) through `project`: one fbgemm product over the stacked codes for a single
    token, the same numbers as each layer's own; several rows, or a member on another path, run each
    layer on its own."""
    from lmforge.models.transformer import project

    layers = [QuantLinear.from_linear(linear(768, n, bias=b, seed=n), 8) for n, b in ((512, True), (128, False),
                                                                                      (128, True))]
    if any(m._packed is None for m in layers):
        pytest.skip("this torch build has no fbgemm")
    with torch.no_grad():
        x = torch.randn(1, 1, 768) * 3
        got = project(x, *layers)
        assert layers[0]._fused_sizes == [512, 128, 128]
        for g, m in zip(got, layers):
            torch.testing.assert_close(g, m(x), rtol=1e-5, atol=1e-5)
        layers[1].bias = torch.ones(128)  # a new bias is read at every call, not packed
        torch.testing.assert_close(project(x, *layers)[1], layers[1](x))
        two = torch.randn(1, 2, 768)
        assert all(torch.equal(g, m(two)) for g, m in zip(project(two, *layers), layers))
        mixed = [layers[0], QuantLinear.from_linear(linear(768, 128), 4, 64)]
        assert all(torch.equal(g, m(x)) for g, m in zip(project(x, *mixed), mixed))


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 64)])
def test_save_load_round_trip(tmp_path, bits, group_size):
    model = quantize_model(tiny_gpt(), bits=bits, group_size=group_size)
    folder = save_quantized(model, tmp_path / "out", step=7, state={"note": "x"}, files={"a.txt": b"hi"})
    assert folder.name == "step_000007" and (folder / "a.txt").read_bytes() == b"hi"
    loaded, state = load_model(tmp_path / "out")
    assert state["quantization"]["bits"] == bits and state["note"] == "x"
    idx = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    assert model_memory_bytes(loaded) == model_memory_bytes(model)


# ----------------------------------------------------------------------------- a trained model


def test_trained_model_bits_per_byte(tiny_data, tmp_path):
    """Validation bits per byte through training's own evaluation code: fp32 vs int8 vs int4."""
    from lmforge.data.loader import TokenSplit
    from lmforge.stages.pretrain import NextTokenTask, PretrainOptions, load_data_tokenizer, pretrain
    from lmforge.train.checkpoint import quantize_checkpoint
    from lmforge.train.loop import TrainConfig

    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=100, eval_every=0, log_every=50, warmup_steps=5,
                      dtype="fp32", progress=False, lr=3e-3, compile="off")
    opts = PretrainOptions(data_dir=str(tiny_data), preset="tiny", batch_size=8, eval_tokens=8192,
                           model_overrides=dict(n_layer=2, n_head=2, n_kv_head=2, n_embd=64, block_size=64))
    res = pretrain(opts, cfg)
    model = res["model"].eval()
    tok, _ = load_data_tokenizer(tiny_data)
    task = NextTokenTask(TokenSplit(tiny_data, "train", tokenizer=tok), TokenSplit(tiny_data, "val", tokenizer=tok),
                         torch.tensor(tok.token_byte_lengths(), dtype=torch.long), batch_size=8, seq_len=64,
                         seed=0, device="cpu", eval_tokens=8192)

    def bpb(m):
        with torch.no_grad():
            return task.evaluate(m)["bpb"]

    fp = bpb(model)
    assert fp == pytest.approx(res["val_bpb"], rel=1e-5) and fp < 4.0  # it learned something
    b8 = bpb(quantize_model(copy.deepcopy(model), bits=8))
    b4 = bpb(quantize_model(copy.deepcopy(model), bits=4, group_size=32))
    print(f"val bpb: fp32 {fp:.4f}, int8 {b8:.4f}, int4 g32 {b4:.4f}")
    assert abs(b8 / fp - 1) < 0.01, (fp, b8)
    assert abs(b4 / fp - 1) < 0.05, (fp, b4)
    # The checkpoint route gives the same model, and keeps the tokenizer and its fingerprint.
    out = quantize_checkpoint(tmp_path / "run", tmp_path / "int4", bits=4, group_size=32)
    loaded, state = load_model(out)
    assert bpb(loaded) == pytest.approx(b4, rel=1e-6)
    assert (out / "tokenizer.json").is_file() and state["tokenizer_fingerprint"] == tok.fingerprint
