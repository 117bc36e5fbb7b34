import pytest
import torch

from lmforge.common import LmforgeError
from lmforge.models.transformer import GPT, GPTConfig, get_config

VARIANTS = {
    "modern-gqa": dict(pos="rope", norm="rms", mlp="swiglu", n_kv_head=2, qk_norm=True),
    "mqa": dict(pos="rope", norm="rms", mlp="relu2", n_kv_head=1),
    "classic": dict(pos="learned", norm="layer", mlp="gelu", tie_embeddings=True, bias=True),
}


def tiny(**kw) -> GPTConfig:
    base = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
    base.update(kw)
    return GPTConfig(**base)


@pytest.mark.parametrize("name", VARIANTS)
def test_causal_future_tokens_never_change_past_logits(name):
    torch.manual_seed(0)
    model = GPT(tiny(**VARIANTS[name])).eval()
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))  # change every token from position 12 on
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])  # the later positions do see the change


@pytest.mark.parametrize("name", VARIANTS)
def test_overfits_one_batch(name):
    torch.manual_seed(0)
    model = GPT(tiny(**VARIANTS[name]))
    x = torch.randint(0, 97, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(300):
        loss = model(x[:, :-1], x[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 4.0  # ~ln(97) at init
    assert loss.item() < 0.05


def test_gqa_shapes_and_kv_parameter_saving():
    full = GPT(tiny(n_kv_head=None))
    gqa = GPT(tiny(n_kv_head=2))
    mqa = GPT(tiny(n_kv_head=1))
    k = lambda m: m.layers[0].self_attn.k_proj.weight.shape  # noqa: E731
    assert k(full) == (32, 32) and k(gqa) == (16, 32) and k(mqa) == (8, 32)
    assert full.num_params() > gqa.num_params() > mqa.num_params()
    assert gqa(torch.randint(0, 97, (1, 5))).shape == (1, 5, 97)


def test_gpt2_classic_matches_published_parameter_count():
    # GPT-2 small (vocab 50257, context 1024) has 124,439,808 parameters (tied head counted once).
    with torch.device("meta"):
        model = GPT(get_config("gpt2-classic", vocab_size=50257))
    assert model.num_params() == 124_439_808


def test_flops_per_token_counts_matmuls_and_attention():
    cfg = tiny()
    m = GPT(cfg)
    linear = sum(p.numel() for n, p in m.named_parameters() if p.dim() == 2 and "embed" not in n)
    linear += cfg.vocab_size * cfg.n_embd if cfg.tie_embeddings else 0
    expected = 6 * linear + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    assert m.flops_per_token() == pytest.approx(expected)


def test_swiglu_hidden_keeps_parameter_budget():
    c = tiny(n_embd=96, mlp="swiglu")
    assert c.hidden_dim % 64 == 0
    assert abs(3 * c.hidden_dim - 8 * 96) <= 3 * 64


@pytest.mark.parametrize("kw,msg", [
    (dict(n_embd=30, n_head=4), "divisible"),
    (dict(n_kv_head=3), "multiple"),
    (dict(mlp="tanh"), "mlp"),
    (dict(pos="alibi"), "pos"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_invalid_configs_raise_clear_errors(kw, msg):
    with pytest.raises(LmforgeError, match=msg):
        tiny(**kw)


def test_context_longer_than_window_is_an_error():
    m = GPT(tiny(block_size=8))
    with pytest.raises(LmforgeError, match="context window"):
        m(torch.zeros(1, 9, dtype=torch.long))


def test_unknown_preset():
    with pytest.raises(LmforgeError, match="unknown transformer preset"):
        get_config("gpt-5")


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    m = GPT(tiny(**VARIANTS["modern-gqa"])).eval()
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        ref = m(x, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m(x, x)
    assert abs(ref.item() - low.item()) < 0.05


def test_attention_dropout_is_its_own_knob():
    """attn_dropout=0 with dropout>0 drops out the residual branches but never the attention weights;
    None keeps nanoGPT's single knob. Checked by what SDPA receives, and by its effect: with residual
    dropout alone two training passes differ, with both knobs at 0 they agree."""
    import torch.nn.functional as F

    seen = []
    real = F.scaled_dot_product_attention

    def spy(*a, dropout_p=0.0, **kw):
        seen.append(dropout_p)
        return real(*a, dropout_p=dropout_p, **kw)

    x = torch.randint(0, 97, (2, 16))
    for cfg, want in ((tiny(dropout=0.2), 0.2), (tiny(dropout=0.2, attn_dropout=0.0), 0.0),
                      (tiny(dropout=0.0, attn_dropout=0.3), 0.3)):
        seen.clear()
        model = GPT(cfg).train()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(F, "scaled_dot_product_attention", spy)
            model(x)
        assert seen and all(p == want for p in seen), (cfg, seen)
    model = GPT(tiny(dropout=0.2, attn_dropout=0.0)).train()
    assert not torch.equal(model(x), model(x))  # the residual dropout is on
    model = GPT(tiny(dropout=0.0, attn_dropout=0.0)).train()
    assert torch.equal(model(x), model(x))
    with pytest.raises(LmforgeError, match="attn_dropout"):
        tiny(attn_dropout=1.0)
