"""Tests for lmforge.inference.engine: the KV-cached, batched engine must reproduce the plain loop exactly."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from lmforge.common import LmforgeError
from lmforge.inference.engine import Completion, Engine
from lmforge.inference.sampling import apply_repetition_penalty, generate, sample_next
from lmforge.models.transformer import GPT, GPTConfig, get_config
from lmforge.tokenizer import Tokenizer

VOCAB = 97
BLOCK = 48
# Tiny versions of the preset shapes. A larger init_std than training's makes random models'
# logits peaked enough that greedy continuations vary and are far from ties.
SHAPES = {
    "cpu": dict(preset="cpu"),  # RoPE, RMSNorm, SwiGLU, GQA (4 query heads, 2 KV heads), QK-norm
    "mqa": dict(preset="cpu", n_kv_head=1, qk_norm=False, mlp="relu2"),
    "gpt2-classic": dict(preset="gpt2-classic"),  # learned positions, LayerNorm with biases, tied head
}


@functools.cache
def model_for(name: str) -> GPT:
    kw = dict(SHAPES[name])
    cfg = get_config(kw.pop("preset"), vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=4, n_embd=32,
                     init_std=0.2, **kw)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    if model.wpe is not None:
        # With a tied head, a random model mostly predicts the token it was fed, so greedy output is
        # one repeated token; stronger positions vary it (and make wrong positions show).
        with torch.no_grad():
            model.wpe.weight.mul_(5.0)
    return model


def rand_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPTS = [rand_ids(7, 1), rand_ids(2, 2), rand_ids(13, 3)]


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("name", SHAPES)
def test_cached_logits_match_the_full_forward_at_every_step(name):
    """Prefill of right-padded prompts, then decode steps at each row's own position: every step's
    logits equal the uncached forward of that row alone, in a batch and alone."""
    model = model_for(name)
    steps = 10
    seqs = [p + rand_ids(steps, 10 + i) for i, p in enumerate(PROMPTS)]
    with torch.no_grad():
        want = [model(torch.tensor([s]))[0] for s in seqs]  # (len, vocab) per row
        for batch in ([0, 1, 2], [0], [1], [2]):
            lens = [len(PROMPTS[b]) for b in batch]
            cache = model.new_cache(len(batch), max(lens) + steps)
            idx = torch.tensor([PROMPTS[b] + [0] * (max(lens) - n) for b, n in zip(batch, lens)])
            logits = model.prefill(idx, cache, torch.tensor(lens) - 1)
            for k in range(steps + 1):
                for j, b in enumerate(batch):
                    torch.testing.assert_close(logits[j], want[b][lens[j] - 1 + k], rtol=0, atol=1e-4)
                if k == steps:
                    break
                pos = [n + k for n in lens]
                nxt = torch.tensor([[seqs[b][p]] for b, p in zip(batch, pos)])
                logits = model.decode(nxt, cache, pos)


def test_cache_stores_only_the_kv_heads():
    model = model_for("cpu")
    cache = model.new_cache(3, 20)
    assert len(cache.k) == len(cache.v) == 2
    assert cache.k[0].shape == (3, 2, 20, 8)  # (B, n_kv_head, max_len, head_dim), not n_head=4
    assert model_for("mqa").new_cache(1, 5).v[1].shape == (1, 1, 5, 8)


@pytest.mark.parametrize("name", SHAPES)
def test_greedy_engine_equals_the_reference_loop(name):
    model = model_for(name)
    engine = Engine(model)
    n = 20
    ref = [generate(model, p, n, temperature=0) for p in PROMPTS]
    assert all(len(set(r)) > 3 for r in ref)  # non-trivial continuations
    batched = engine.generate(PROMPTS, n, temperature=0)
    alone = [engine.generate([p], n, temperature=0)[0] for p in PROMPTS]
    uncached = engine.generate(PROMPTS, n, temperature=0, use_cache=False)
    for got in (batched, alone, uncached):
        assert [c.tokens for c in got] == ref
        assert all(c.finish_reason == "length" and c.stop is None for c in got)


@pytest.mark.parametrize("name", ["cpu", "gpt2-classic"])
def test_seeded_sampling_with_every_filter_equals_the_reference_loop(name):
    model = model_for(name)
    kw = dict(temperature=0.9, top_k=30, top_p=0.95, min_p=0.02, repetition_penalty=1.3, seed=5)
    want = generate(model, PROMPTS[0], 25, **kw)
    for use_cache in (True, False):
        [c] = Engine(model).generate([PROMPTS[0]], 25, use_cache=use_cache, **kw)
        assert c.tokens == want


def test_greedy_repetition_penalty_matches_the_reference_and_changes_the_output():
    model = model_for("cpu")
    plain = generate(model, PROMPTS[2], 20, temperature=0)
    want = generate(model, PROMPTS[2], 20, temperature=0, repetition_penalty=3.0)
    assert want != plain
    got = Engine(model).generate(PROMPTS, 20, temperature=0, repetition_penalty=3.0)
    assert got[2].tokens == want
    assert got[0].tokens == generate(model, PROMPTS[0], 20, temperature=0, repetition_penalty=3.0)


def test_seed_reproducible_and_global_rng_untouched():
    engine = Engine(model_for("mqa"))
    state = torch.get_rng_state()
    a = engine.generate(PROMPTS, 15, temperature=1.0, seed=42)
    assert torch.equal(torch.get_rng_state(), state)
    assert [c.tokens for c in engine.generate(PROMPTS, 15, temperature=1.0, seed=42)] == [c.tokens for c in a]
    b = engine.generate(PROMPTS, 15, temperature=1.0, seed=43)
    assert [c.tokens for c in b] != [c.tokens for c in a]


def test_generation_stops_at_the_context_window():
    model = model_for("cpu")
    engine = Engine(model)
    near = rand_ids(BLOCK - 3, 7)
    full = rand_ids(BLOCK, 8)
    got = engine.generate([near, PROMPTS[1], full], 10, temperature=0)
    assert len(got[0].tokens) == 3 and got[0].finish_reason == "length"  # prompt + output == window
    assert got[0].tokens == generate(model, near, 3, temperature=0)
    assert got[1].tokens == generate(model, PROMPTS[1], 10, temperature=0)  # the other rows go on
    assert got[2].tokens == [] and got[2].finish_reason == "length"
    with pytest.raises(LmforgeError, match=r"prompt 1 is 49 tokens, longer than the model's context window"):
        engine.generate([PROMPTS[0], rand_ids(BLOCK + 1, 9)], 5)
    with pytest.raises(LmforgeError, match="context window"):
        Engine(model, Tokenizer.byte_level()).stream(rand_ids(BLOCK + 1, 9), 5)  # raised at the call


def test_zero_new_tokens_and_bad_arguments():
    engine = Engine(model_for("cpu"))
    assert engine.generate(PROMPTS, 0) == [Completion([], "", "length")] * 3
    with pytest.raises(LmforgeError, match="empty"):
        engine.generate([[1, 2], []], 5)
    with pytest.raises(LmforgeError, match=r"\[prompt_ids\]"):
        engine.generate([1, 2, 3], 5)
    with pytest.raises(LmforgeError, match="vocabulary"):
        engine.generate([[1, VOCAB]], 5)
    with pytest.raises(LmforgeError, match="tokenizer"):
        engine.generate(PROMPTS, 5, stop_strings=["x"])
    with pytest.raises(LmforgeError, match="min-p"):
        engine.generate(PROMPTS, 5, min_p=1.5)
    with pytest.raises(LmforgeError, match="repetition penalty"):
        engine.generate(PROMPTS, 5, repetition_penalty=0.0)


def test_stop_ids_with_random_weights_and_uneven_finishes():
    model = model_for("gpt2-classic")
    engine = Engine(model)
    full = [generate(model, p, 20, temperature=0) for p in PROMPTS]
    stop = full[0][4]
    got = engine.generate(PROMPTS, 20, temperature=0, stop_ids={stop})
    for c, f in zip(got, full):
        if stop in f:
            assert c.tokens == f[:f.index(stop)] and (c.finish_reason, c.stop) == ("stop", stop)
        else:
            assert c.tokens == f and c.finish_reason == "length"
    assert got[0].tokens == full[0][:full[0].index(stop)]


def test_compiled_decode_step_matches_the_plain_one():
    """Engine(compile=True): greedy tokens equal the plain engine's for rows of unequal lengths, a
    row dropped mid-way (batch size changes) and a second call (cache length changes); per-step
    logits agree to float rounding. (Batches of 2+ rows only: batch 1 is a second graph, and each
    compile costs seconds.)"""
    import torch._dynamo

    model = model_for("cpu")
    torch._dynamo.reset()
    compiled = Engine(model, compile=True)
    plain = Engine(model)
    for prompts, n in ((PROMPTS, 12), (PROMPTS[1:], 5)):
        assert ([c.tokens for c in compiled.generate(prompts, n, temperature=0)]
                == [c.tokens for c in plain.generate(prompts, n, temperature=0)])
    outputs = [c.tokens for c in plain.generate(PROMPTS, 12, temperature=0)]
    # A stop id that ends row 1 only, after 3 tokens: the batch shrinks from 3 rows to 2.
    stop = next(t for t in outputs[1][3:] if t not in outputs[0] + outputs[2])
    assert ([c.tokens for c in compiled.generate(PROMPTS, 12, temperature=0, stop_ids=[stop])]
            == [c.tokens for c in plain.generate(PROMPTS, 12, temperature=0, stop_ids=[stop])])
    assert not compiled.step_fn.failed
    with torch.inference_mode():
        cache = model.new_cache(2, 16)
        logits = model.prefill(torch.tensor([PROMPTS[0][:5], PROMPTS[1] + [0] * 3]), cache,
                               torch.tensor([4, 1]))
        for positions in ([5, 2], [6, 3], [7, 4]):
            idx = logits.argmax(-1, keepdim=True)
            saved = [t.clone() for t in cache.k + cache.v]
            want = model.decode(idx, cache, positions)
            for t, old in zip(cache.k + cache.v, saved):
                t.copy_(old)
            logits = model.decode(idx, cache, positions, step_fn=compiled.step_fn)
            torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)


def test_compile_failure_falls_back_to_the_plain_step(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    engine = Engine(model_for("cpu"), compile=True)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        got = engine.generate(PROMPTS, 6, temperature=0)
    assert [c.tokens for c in got] == [c.tokens for c in Engine(model_for("cpu")).generate(PROMPTS, 6, temperature=0)]
    assert engine.step_fn.failed


@pytest.mark.parametrize("name", SHAPES)
def test_bf16_engine_casts_the_weights_once_and_computes_in_bf16(name):
    model = copy.deepcopy(model_for(name))  # the engine casts in place; model_for's copy is shared
    engine = Engine(model, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    if model.rotary is not None:  # computed from the config, never saved: kept exact
        assert model.rotary.cos.dtype == torch.float32
    seen = set()
    hooks = [m.register_forward_hook(lambda m, args, out: seen.add((args[0].dtype, m.weight.dtype, out.dtype)))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    ptrs = [p.data_ptr() for p in model.parameters()]
    got = engine.generate(PROMPTS, 8, temperature=0)
    for h in hooks:
        h.remove()
    # Every matmul read bf16 weights with bf16 inputs (no per-step cast, no autocast), and the
    # weights are the same tensors as before generating.
    assert seen == {(torch.bfloat16,) * 3}
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert [len(c.tokens) for c in got] == [8, 8, 8]
    # Within bf16's rounding of the exact computation on the same (bf16-rounded) weights.
    exact = copy.deepcopy(model).float()
    for prompt in PROMPTS:
        idx = torch.tensor([prompt])
        with torch.inference_mode():
            cache = model.new_cache(1, dtype=torch.bfloat16)
            assert cache.k[0].dtype == torch.bfloat16
            got_logits = model.prefill(idx, cache)
            want = exact(idx)[:, -1]
        assert got_logits.dtype == torch.float32
        torch.testing.assert_close(got_logits, want, rtol=0.05, atol=0.05 * float(want.abs().max()))


def test_engine_dtype_defaults_to_the_stored_one_and_rejects_unknown_names():
    model = copy.deepcopy(model_for("cpu")).to(torch.bfloat16)  # as an imported bf16 model is held
    Engine(model).generate(PROMPTS[:1], 2, temperature=0)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # no dtype given: left as stored
    Engine(model, dtype="fp32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with pytest.raises(LmforgeError, match="dtype"):
        Engine(model, dtype="fp16")


def test_training_mode_restored_and_no_inference_mode_between_pieces(byte_tok):
    model = scripted_model(byte_tok, "abcdef")
    model.train()
    pieces = Engine(model, byte_tok).stream([byte_tok.bos_id], 5, temperature=0)
    assert next(pieces) == "a"
    assert not torch.is_inference_mode_enabled()
    assert "".join(pieces) == "bcde"
    assert model.training


def test_ids_beyond_the_tokenizer_are_never_sampled(byte_tok):
    cfg = GPTConfig(vocab_size=byte_tok.vocab_size + 40, block_size=32, n_layer=1, n_head=2, n_embd=16,
                    init_std=0.5)
    torch.manual_seed(1)
    got = Engine(GPT(cfg), byte_tok).generate([[1, 2, 3]] * 4, 25, temperature=3.0, seed=0, stop_ids=())
    assert all(t < byte_tok.vocab_size for c in got for t in c.tokens)


# ----------------------------------------------------------------------------- sampling filters


def test_min_p_keeps_tokens_at_least_min_p_times_the_top_one():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4).contiguous()

    def used(**kw):
        return set(sample_next(logits, kw.pop("temperature", 1.0), None, None, torch.Generator().manual_seed(0),
                               **kw).unique().tolist())

    assert used(min_p=0.2) == {0, 1, 2}  # threshold 0.1
    assert used(min_p=0.5) == {0, 1}  # threshold 0.25
    assert used(min_p=0.7) == {0}
    assert used(min_p=1.0) == {0}
    assert used(min_p=0.0) == {0, 1, 2, 3}
    # Applied after temperature (as in Hugging Face): at T=2 the ratios are square roots, 0.05/0.5 -> 0.32.
    assert used(min_p=0.2, temperature=2.0) == {0, 1, 2, 3}
    assert used(min_p=0.6, temperature=2.0) == {0, 1}  # sqrt(0.3/0.5) = 0.77 stays, sqrt(0.15/0.5) = 0.55 goes


def test_repetition_penalty_on_hand_made_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5]])
    seen = torch.tensor([[True, True, False, False]])
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 2.0), torch.tensor([[1.0, -2.0, 0.5, -0.5]]))
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 0.5), torch.tensor([[4.0, -0.5, 0.5, -0.5]]))
    assert sample_next(logits, 0, None, None, None).item() == 0
    assert sample_next(logits, 0, None, None, None, repetition_penalty=5.0, seen=seen).item() == 2  # 2/5 < 0.5
    assert sample_next(logits, 0, None, None, None, repetition_penalty=5.0).item() == 0  # nothing seen
    # with sampling: a heavily penalised token is (almost) never drawn
    many = logits.expand(2000, 4)
    draws = sample_next(many, 1.0, None, None, torch.Generator().manual_seed(0), repetition_penalty=50.0,
                        seen=seen.expand(2000, 4))
    want = torch.tensor([0.4 / 10, -50.0, 0.5, -0.5]).softmax(-1)[0].item()  # 0.31, down from 0.74
    assert (draws == 1).sum() == 0
    assert (draws == 0).float().mean().item() == pytest.approx(want, abs=0.04)


# ----------------------------------------------------------------------------- text: stops and streaming


@pytest.fixture(scope="module")
def byte_tok() -> Tokenizer:
    return Tokenizer.byte_level()


def scripted_model(tok: Tokenizer, *parts) -> GPT:
    """A model whose greedy output ignores the prompt's content: generating after a prompt of n
    tokens yields script[n], script[n + 1], ..., where script = [bos] + the parts (strings are
    encoded byte by byte, ints are ids, bytes are raw bytes). Only the position embedding and the
    head are non-zero: the residual stream at position p is one-hot, and the head maps it to
    script[p + 1]."""
    script = [tok.bos_id]
    for part in parts:
        script += tok.encode(part) if isinstance(part, str) else list(part) if isinstance(part, bytes) else [part]
    n = len(script) + 4
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=n, n_layer=1, n_head=1, n_embd=n, pos="learned",
                    mlp="gelu")
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.wpe.weight.copy_(torch.eye(n))
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
        for pos, nxt in enumerate(script[1:]):
            model.lm_head.weight[nxt, pos] = 1.0
    model.script = script
    return model


TEXT = "Hi! héllo wörld 🙂 ok"


def test_scripted_model_says_its_script(byte_tok):
    model = scripted_model(byte_tok, TEXT)
    assert generate(model, [byte_tok.bos_id], len(TEXT.encode()), temperature=0) == model.script[1:]
    assert generate(model, [5, 6, 7], 3, temperature=0) == model.script[3:6]


def test_stop_id_stop_string_and_length_end_rows_at_different_times(byte_tok):
    end = byte_tok.special_id("assistant_end")
    model = scripted_model(byte_tok, "Hello there", end, " more")
    engine = Engine(model, byte_tok)
    bos = byte_tok.bos_id
    prompts = [[bos], [bos] * 10, [bos] * 3, [bos] * 2]
    got = engine.generate(prompts, 50, temperature=0, stop_strings=["er"])
    # row 0 reaches the stop string "er" (two tokens, e and r); row 1 starts past it ("re"), so the
    # default stop id (end of turn) ends it; the stop id is not part of the output
    assert (got[0].text, got[0].finish_reason, got[0].stop) == ("Hello th", "stop", "er")
    assert byte_tok.decode(got[0].tokens) == "Hello ther"  # the tokens that spell "er" are kept
    assert (got[1].text, got[1].finish_reason, got[1].stop) == ("re", "stop", end)
    assert got[1].tokens == byte_tok.encode("re")
    assert [(c.text, c.stop) for c in got[2:]] == [("llo th", "er"), ("ello th", "er")]
    short = engine.generate(prompts, 4, temperature=0)
    assert [c.text for c in short] == ["Hell", "re", "llo ", "ello"]
    assert [c.finish_reason for c in short] == ["length", "stop", "length", "length"]
    # each row of the batch is what it would be alone
    for p, c in zip(prompts, got):
        assert engine.generate([p], 50, temperature=0, stop_strings=["er"]) == [c]
    # stop ids can be replaced: with none, row 1 runs into " more" as text
    [c] = engine.generate([[bos] * 10], 8, temperature=0, stop_ids=())
    assert c.text == "re<|assistant_end|> more" and c.finish_reason == "length"


def test_stream_holds_multibyte_characters_until_complete(byte_tok):
    model = scripted_model(byte_tok, TEXT)
    engine = Engine(model, byte_tok)
    n = len(TEXT.encode())
    pieces = list(engine.stream([byte_tok.bos_id], n, temperature=0))
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in p for p in pieces)
    assert "é" in pieces and "🙂" in pieces  # 2 and 4 byte tokens, handed out as one character each
    [c] = engine.generate([[byte_tok.bos_id]], n, temperature=0)
    assert c.text == TEXT == byte_tok.decode(c.tokens) and len(c.tokens) == n
    # cut inside the emoji: the incomplete character becomes U+FFFD at the end, as in decode
    cut = n - len(" ok") - 2
    pieces = list(engine.stream([byte_tok.bos_id], cut, temperature=0))
    [c] = engine.generate([[byte_tok.bos_id]], cut, temperature=0)
    assert "".join(pieces) == c.text == byte_tok.decode(c.tokens) and c.text.endswith("\ufffd")


def test_stream_never_hands_out_part_of_a_stop_string(byte_tok):
    model = scripted_model(byte_tok, TEXT)
    engine = Engine(model, byte_tok)
    for stop in ("wörld", "🙂", "ld 🙂 o"):
        pieces = list(engine.stream([byte_tok.bos_id], 100, temperature=0, stop_strings=["zzz", stop]))
        want = TEXT[:TEXT.index(stop)]
        assert "".join(pieces) == want
        [c] = engine.generate([[byte_tok.bos_id]], 100, temperature=0, stop_strings=["zzz", stop])
        assert (c.text, c.stop) == (want, stop)
    # a partial match that does not complete is handed out once it is clear
    n = len(TEXT.encode())
    pieces = list(engine.stream([byte_tok.bos_id], n, temperature=0, stop_strings=["wörle"]))
    assert "".join(pieces) == TEXT


def test_invalid_utf8_decodes_like_the_tokenizer(byte_tok):
    model = scripted_model(byte_tok, "a", b"\xff\xc3", "b", b"\xe2\x82", "c")
    engine = Engine(model, byte_tok)
    n = len(model.script) - 1
    [c] = engine.generate([[byte_tok.bos_id]], n, temperature=0)
    assert c.text == byte_tok.decode(c.tokens) == "a\ufffd\ufffdb\ufffdc"
    assert "".join(engine.stream([byte_tok.bos_id], n, temperature=0)) == c.text
