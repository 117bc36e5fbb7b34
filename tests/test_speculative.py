"""Speculative decoding (lmforge/inference/speculative.py): the multi-token cached step, greedy output
identical to the engine's, the sampled distribution equal to the target's (chi-square against an
exact enumeration), acceptance statistics, bad input, and the CLI and server flags.

The distribution tests run thousands of generations, so their models are lookup tables (`TableLM`:
logits = a random table indexed by the last two tokens, behind the same decode protocol as the
transformer, a positional cache of token ids): a generation costs a few hundred microseconds instead
of milliseconds, and the acceptance rule, the only thing under test there, does not care what
computes p and q. The transformer's own step is tested against its full forward."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import pytest
import torch
from scipy.stats import chisquare

from lmforge.common import LmforgeError
from lmforge.inference.engine import Engine
from lmforge.inference.sampling import sampling_probs
from lmforge.inference.speculative import SpecSession, Speculator, lookup_draft
from lmforge.models.protocol import LanguageModel, ModelConfig
from lmforge.models.transformer import GPT, get_config
from lmforge.tokenizer import Tokenizer

# ----------------------------------------------------------------------------- models


def gpt(seed: int, vocab: int = 300, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, block_size=96, init_std=0.15)
    return GPT(get_config("tiny", **{**cfg, **kw})).eval()


def smaller_copy(target: GPT, noise: float = 0.0, seed: int = 1) -> GPT:
    """A one-block draft sharing the target's embedding, first block, final norm and head (a
    truncated target: it agrees with the target on some tokens and not on others); noise perturbs it."""
    draft = GPT(get_config("tiny", **{**target.config.to_dict(), "n_layer": 1})).eval()
    own = draft.state_dict()
    with torch.no_grad():
        own.update({k: v.clone() for k, v in target.state_dict().items() if k in own})
        draft.load_state_dict(own)
        torch.manual_seed(seed)
        for p in draft.parameters():
            p.add_(noise * torch.randn_like(p) * p.std().nan_to_num())
    return draft


@dataclass(frozen=True)
class TableConfig(ModelConfig):
    vocab_size: int = 8
    block_size: int = 16


class TableState:
    def __init__(self, batch_size: int, max_len: int):
        self.ids = torch.zeros(batch_size, max_len, dtype=torch.long)
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.ids.size(0)

    def keep(self, rows):
        self.ids = self.ids[rows]

    def extend(self, other):
        self.ids = torch.cat([self.ids, other.ids])


class TableLM(LanguageModel):
    """logits(next | ..., a, b) = table[a, b] (a = 0 before the first token): a second-order Markov
    chain behind the decode protocol, with a positional cache (slot i = the token at position i)."""
    family = "table"

    def __init__(self, cfg: TableConfig, seed: int, scale: float = 2.0):
        super().__init__()
        self.config = cfg
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("table", scale * torch.randn(cfg.vocab_size, cfg.vocab_size, cfg.vocab_size, generator=g))

    @property
    def context_limit(self) -> int:
        return self.config.block_size

    def forward(self, idx):
        prev = torch.cat([torch.zeros_like(idx[:, :1]), idx[:, :-1]], dim=1)
        return self.table[prev, idx]

    def new_cache(self, batch_size, max_len=None, dtype=None):
        return TableState(batch_size, max_len or self.config.block_size)

    def prefill(self, idx, cache, last=None):
        cache.ids[:, :idx.size(1)] = idx
        logits = self(idx)
        return logits[:, -1] if last is None else logits[torch.arange(idx.size(0)), last]

    def decode(self, idx, cache, positions, step_fn=None):
        return self.decode_many(idx, cache, positions)[:, 0]

    def decode_many(self, idx, cache, start):
        B, T = idx.shape
        starts = [start] * B if isinstance(start, int) else list(start)
        for b, s in enumerate(starts):
            cache.ids[b, s:s + T] = idx[b]
        prev = torch.stack([cache.ids[b, max(s - 1, 0):s] if s else torch.zeros(1, dtype=torch.long)
                            for b, s in enumerate(starts)])
        return self.table[torch.cat([prev, idx[:, :-1]], dim=1), idx]


# ----------------------------------------------------------------------------- (i) the multi-token step


@pytest.mark.parametrize("kw", [{}, {"pos": "learned", "n_kv_head": 1},
                                {"sliding_window": 5, "window_layers": (0,), "attn_softcap": 30.0},
                                {"n_kv_head": 4, "qk_norm": True, "logit_softcap": 10.0}])
def test_decode_many_equals_the_full_forward(kw):
    model = gpt(0, vocab=50, init_std=0.3, **kw)
    x = torch.randint(0, 50, (2, 24))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2)
        model.prefill(x[:, :7], cache)
        got = [model.decode_many(x[:, 7:12], cache, 7)]
        model.decode_many(torch.randint(0, 50, (2, 6)), cache, 12)  # a rejected draft, then overwritten
        got.append(model.decode_many(x[:, 12:24], cache, 12))
        # rows at different positions (the second row re-feeds slots it already holds)
        both = model.decode_many(torch.stack([x[0, 12:16], x[1, 4:8]]), cache, [12, 4])
        # and the single-token decode still agrees after the multi-token writes
        one = model.decode(x[:, 16:17], cache, [16, 16])
    torch.testing.assert_close(torch.cat(got, dim=1), full[:, 7:24], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(both[0], full[0, 12:16], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(both[1], full[1, 4:8], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(one, full[:, 16], atol=2e-5, rtol=1e-4)


def test_decode_many_refuses_positions_outside_the_window():
    model = gpt(0, vocab=50)
    cache = model.new_cache(1, 10)
    with pytest.raises(LmforgeError, match="outside the context window"):
        model.decode_many(torch.zeros(1, 4, dtype=torch.long), cache, 8)


# ----------------------------------------------------------------------------- (ii) greedy is greedy

PROMPTS = [[5, 6, 7, 8, 9] * 4, [3], list(range(20, 60)), [11, 12, 11, 12, 13, 11, 12]]


@pytest.fixture(scope="module")
def target():
    """Small weights (its greedy output falls into loops that prompt lookup predicts) and a weak
    second block (so a truncated copy is a fair draft: it agrees often, not always)."""
    model = gpt(0, init_std=0.05)
    with torch.no_grad():
        model.layers[1].self_attn.o_proj.weight.mul_(0.3)
        model.layers[1].mlp.down_proj.weight.mul_(0.3)
    return model


@pytest.mark.parametrize("how", ["draft", "lookup"])
def test_greedy_output_is_the_engine_output(target, how):
    draft = smaller_copy(target, noise=0.2)
    engine = Engine(target)
    proposed = accepted = 0
    for prompt, k, n in product(PROMPTS, (1, 3, 5), (7, 40)):
        spec = Speculator(target, draft=draft, k=k) if how == "draft" else Speculator(target, prompt_lookup=True, k=k)
        [ref] = engine.generate([prompt], n, temperature=0, stop_ids=())
        got, stats = spec.generate(prompt, n, temperature=0, stop_ids=())
        assert got.tokens == ref.tokens and got.finish_reason == ref.finish_reason == "length", (prompt, k, n)
        assert stats.accepted <= stats.proposed and stats.tokens == n
        proposed, accepted = proposed + stats.proposed, accepted + stats.accepted
        # a stop id met mid-block: the output ends just before it, as the engine's does
        stop = ref.tokens[len(ref.tokens) // 2]
        [ref_stop] = engine.generate([prompt], n, temperature=0, stop_ids=[stop])
        got_stop, _ = spec.generate(prompt, n, temperature=0, stop_ids=[stop])
        assert got_stop == ref_stop and got_stop.finish_reason == "stop"
    assert 0.1 * proposed < accepted < 0.9 * proposed  # both paths, acceptance and rejection, ran often


def test_greedy_to_the_end_of_the_window(target):
    """Prompt plus output fill the context window: the same length cut as the engine's."""
    prompt = [7, 8, 9] * 30  # 90 of 96 positions
    [ref] = Engine(target).generate([prompt], 50, temperature=0, stop_ids=())
    got, _ = Speculator(target, prompt_lookup=True, k=4).generate(prompt, 50, temperature=0, stop_ids=())
    assert got == ref and len(got.tokens) == 6


def test_repetition_penalty_greedy(target):
    prompt = PROMPTS[0]
    [ref] = Engine(target).generate([prompt], 30, temperature=0, repetition_penalty=1.3, stop_ids=())
    for spec in (Speculator(target, prompt_lookup=True, k=3), Speculator(target, draft=smaller_copy(target), k=3)):
        got, _ = spec.generate(prompt, 30, temperature=0, repetition_penalty=1.3, stop_ids=())
        assert got.tokens == ref.tokens


def test_stream_and_stop_strings_match_the_engine(target):
    tok = Tokenizer.byte_level()
    model = gpt(2, vocab=tok.vocab_size)
    spec = Speculator(model, tok, draft=smaller_copy(model, noise=0.2), k=3)
    engine = Engine(model, tok)
    prompt = [tok.bos_id] + tok.encode("the cat sat on the mat; the cat sat on the")
    [ref] = engine.generate([prompt], 40, temperature=0)
    assert "".join(spec.stream(prompt, 40, temperature=0)) == ref.text
    stop = ref.text[10:12]
    [ref_stop] = engine.generate([prompt], 40, temperature=0, stop_strings=[stop])
    got, _ = spec.generate(prompt, 40, temperature=0, stop_strings=[stop])
    assert got == ref_stop and got.finish_reason == "stop"
    assert "".join(spec.stream(prompt, 40, temperature=0, stop_strings=[stop])) == ref_stop.text


# ----------------------------------------------------------------------------- (iii) the distribution

V = 8
N_SAMPLES = 3000
TOKENS = 3


def exact_distribution(model, prompt, settings: dict) -> dict[tuple, float]:
    """P(first TOKENS tokens) under the model with the sampling settings, by enumeration."""
    out = {(): 1.0}
    for _ in range(TOKENS):
        prefixes = list(out)
        contexts = torch.tensor([prompt + list(p) for p in prefixes])
        with torch.no_grad():
            logits = model(contexts)[:, -1]
        seen = torch.zeros(len(prefixes), V, dtype=torch.bool).scatter_(1, contexts, True)  # repetition penalty
        probs = sampling_probs(logits, **settings, seen=seen)
        out = {p + (t,): out[p] * float(probs[i, t]) for i, p in enumerate(prefixes) for t in range(V)}
    return out


def chi_square_p(samples: list[tuple], exact: dict[tuple, float]) -> float:
    """Chi-square goodness of fit; outcomes expected fewer than 5 times share one bin."""
    n = len(samples)
    counts: dict[tuple, int] = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    big = [o for o, p in exact.items() if p * n >= 5]
    observed = [counts.get(o, 0) for o in big] + [n - sum(counts.get(o, 0) for o in big)]
    expected = [exact[o] * n for o in big] + [n * (1 - sum(exact[o] for o in big))]
    assert sum(counts.get(o, 0) for o in counts if o not in exact) == 0
    if expected[-1] <= 0:
        observed, expected = observed[:-1], expected[:-1]
    scale = sum(observed) / sum(expected)
    return float(chisquare(observed, [e * scale for e in expected]).pvalue)


def speculative_samples(spec: Speculator, prompt, settings: dict, n: int = N_SAMPLES) -> list[tuple]:
    return [tuple(spec.generate(prompt, TOKENS, seed=seed, stop_ids=(), **settings)[0].tokens)
            for seed in range(n)]


def table_models():
    cfg = TableConfig(vocab_size=V)
    return TableLM(cfg, seed=0), TableLM(cfg, seed=1)


SETTINGS = [dict(temperature=1.0, top_k=None, top_p=None),
            dict(temperature=0.7, top_k=5, top_p=None),
            dict(temperature=1.3, top_k=None, top_p=0.9, min_p=0.05),
            dict(temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.5)]


# Two cases in the default run, the other settings in the slow group (CI runs both).
@pytest.mark.parametrize(("how", "settings"), [("draft", SETTINGS[0]), ("lookup", SETTINGS[0]),
                                               pytest.param("draft", SETTINGS[1], marks=pytest.mark.slow),
                                               pytest.param("draft", SETTINGS[3], marks=pytest.mark.slow),
                                               pytest.param("lookup", SETTINGS[2], marks=pytest.mark.slow)])
def test_samples_follow_the_target_distribution(how, settings):
    target, draft = table_models()
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]  # repetitive: prompt lookup proposes something every round
    spec = Speculator(target, draft=draft, k=2) if how == "draft" else Speculator(target, prompt_lookup=True, k=2)
    exact = exact_distribution(target, prompt, settings)
    assert chi_square_p(speculative_samples(spec, prompt, settings), exact) > 1e-3


def test_a_broken_acceptance_rule_fails_the_same_test(monkeypatch):
    """The test above has the power to see a wrong rule: accepting every draft gives the draft's
    distribution, and the chi-square test rejects it."""
    def always_accept(self, p, q, drafts):
        return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=self.generator))

    monkeypatch.setattr(SpecSession, "_verify", always_accept)
    target, draft = table_models()
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    settings = SETTINGS[0]
    exact = exact_distribution(target, prompt, settings)
    for spec in (Speculator(target, draft=draft, k=2), Speculator(target, prompt_lookup=True, k=2)):
        assert chi_square_p(speculative_samples(spec, prompt, settings, 1000), exact) < 1e-6


# ----------------------------------------------------------------------------- (iv) statistics


def test_prompt_lookup_accepts_nearly_everything_on_repetitive_text():
    """A target that repeats its context (a table that continues the period-3 cycle 1 2 3 with
    near-certainty) and prompt lookup: almost every proposal is accepted, ~k+1 tokens per pass."""
    target, _ = table_models()
    with torch.no_grad():
        for a, b, c in [(1, 2, 3), (2, 3, 1), (3, 1, 2)]:
            target.table[a, b, c] += 20.0
    spec = Speculator(target, prompt_lookup=True, k=4)
    got, stats = spec.generate([1, 2, 3, 1, 2, 3], 10, temperature=1.0, seed=0, stop_ids=())
    assert got.tokens == [1, 2, 3] * 3 + [1]
    assert stats.proposed > 0 and stats.accepted == stats.proposed and stats.acceptance_rate == 1.0
    assert stats.target_passes == 2 and stats.tokens_per_pass == 5.0


def test_a_draft_that_always_fails_is_soon_barely_asked(target):
    """Adaptive k: an unrelated draft model (nothing it proposes is the target's argmax) drafts less
    and less, then pauses; the output is still the greedy output."""
    bad = gpt(5, init_std=0.5)
    [ref] = Engine(target).generate([PROMPTS[0]], 60, temperature=0, stop_ids=())
    got, stats = Speculator(target, draft=bad, k=4).generate(PROMPTS[0], 60, temperature=0, stop_ids=())
    assert got.tokens == ref.tokens
    assert stats.accepted < 0.2 * stats.proposed  # it does predict badly
    # Without adapting: 4 drafts in each of ~60 passes. Adapting: 4, 3, 2, 1, then pauses of 1, 2, 4, ...
    assert stats.proposed < 40 and stats.target_passes >= 55


def test_statistics_are_consistent(target):
    draft = smaller_copy(target, noise=0.2)
    for spec in (Speculator(target, draft=draft, k=4), Speculator(target, prompt_lookup=True, k=4)):
        got, stats = spec.generate(PROMPTS[0], 40, temperature=0.8, seed=3, stop_ids=())
        assert 0 <= stats.accepted <= stats.proposed <= 4 * stats.target_passes
        assert stats.tokens == len(got.tokens) == 40
        # every pass yields its accepted drafts plus one token (the last pass may be cut by the budget)
        assert stats.tokens <= stats.accepted + stats.target_passes
        assert 1.0 <= stats.tokens_per_pass <= 5.0 and 0.0 <= stats.acceptance_rate <= 1.0


def test_lookup_draft():
    assert lookup_draft([1, 2, 3, 9, 1, 2], 3) == [3, 9, 1]
    assert lookup_draft([1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]  # the copy runs on past the context's end
    assert lookup_draft([4, 5, 6], 2) == []  # nothing repeats
    assert lookup_draft([7, 1, 2, 8, 1, 2, 9, 2], 2, max_ngram=3) == [9, 2]  # n = 1: the latest "2"
    assert lookup_draft([7], 3) == []


# ----------------------------------------------------------------------------- (v) bad input


def test_bad_input(target):
    with pytest.raises(LmforgeError, match="vocabulary"):
        Speculator(target, draft=gpt(1, vocab=200, n_layer=1))
    with pytest.raises(LmforgeError, match="k >= 1"):
        Speculator(target, prompt_lookup=True, k=0)
    with pytest.raises(LmforgeError, match="exactly one draft"):
        Speculator(target)
    with pytest.raises(LmforgeError, match="exactly one draft"):
        Speculator(target, draft=smaller_copy(target), prompt_lookup=True)
    from lmforge.models.registry import get_family

    lstm_family = get_family("lstm")
    lstm = lstm_family.model_class(lstm_family.config(vocab_size=300))
    with pytest.raises(LmforgeError, match="multi-token cached step") as e:
        Speculator(lstm, prompt_lookup=True)
    assert "\n" not in str(e.value)
    with pytest.raises(LmforgeError, match="multi-token cached step"):
        Speculator(target, draft=lstm)
    spec = Speculator(target, prompt_lookup=True)
    with pytest.raises(LmforgeError, match="empty"):
        spec.generate([], 5)
    with pytest.raises(LmforgeError, match="temperature"):
        spec.generate([1], 5, temperature=-1)
    with pytest.raises(LmforgeError, match="longer than the model's context"):
        spec.generate([1] * 200, 5)


# ----------------------------------------------------------------------------- the CLI and the server


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A target and a draft checkpoint (the byte-level tokenizer), as `lmforge` commands load them."""
    from lmforge.train.checkpoint import save_checkpoint

    tok = Tokenizer.byte_level()
    root = tmp_path_factory.mktemp("spec_ckpt")
    tok_bytes = tok.save(root / "tokenizer.json").read_bytes()
    model = gpt(5, vocab=tok.vocab_size, block_size=128)
    draft = smaller_copy(model, noise=0.2)
    for name, m in (("target", model), ("draft", draft)):
        save_checkpoint(root / name / "checkpoints", 1, m, state={"tokenizer_fingerprint": tok.fingerprint},
                        files={"tokenizer.json": tok_bytes})
    return root / "target", root / "draft", tok


def test_cli_generate_with_speculation_prints_the_greedy_text(runs, capsys):
    from lmforge.cli import main

    target, draft, _ = runs
    base = ["generate", "--checkpoint", str(target), "--temperature", "0", "--max-new-tokens", "40",
            "abc abc abc abc"]
    assert main(base) in (0, None)
    plain = capsys.readouterr().out
    for extra in (["--prompt-lookup"], ["--draft", str(draft), "--speculate", "3"]):
        assert main(base + extra + ["--stats"]) in (0, None)
        out = capsys.readouterr()
        assert out.out == plain, extra
        assert "speculation:" in out.err and "accepted" in out.err and "tokens/s" in out.err
    with pytest.raises(SystemExit) as e:  # argparse: K must be positive
        main(base + ["--prompt-lookup", "--speculate", "0"])
    assert e.value.code == 2 and "--speculate" in capsys.readouterr().err


def test_a_draft_is_cast_like_the_target_and_must_share_its_tokenizer(runs):
    from lmforge.inference.precision import weight_dtype
    from lmforge.inference.speculative import speculator_from
    from lmforge.train.checkpoint import load_model

    target, draft, tok = runs
    model, _ = load_model(target)
    assert speculator_from(model, tok) is None  # neither --draft nor --prompt-lookup
    spec = speculator_from(model, tok, draft_path=draft, load_draft=lambda p: (load_model(p)[0], tok),
                           dtype="bf16", k=2)
    assert weight_dtype(spec.draft) == weight_dtype(spec.model) == torch.bfloat16  # serve --dtype bf16 --draft
    other = Tokenizer.train(["abc abc abd abd " * 50], 300, show_progress=False)
    with pytest.raises(LmforgeError, match="another tokenizer"):
        speculator_from(model, tok, draft_path=draft, load_draft=lambda p: (load_model(p)[0], other))


def test_serve_with_speculation_returns_the_greedy_text(runs):
    from fastapi.testclient import TestClient

    from lmforge.serve.app import ServeConfig, create_app
    from lmforge.train.checkpoint import load_model

    target, draft, tok = runs
    body = {"model": "m", "prompt": "abc abc abc abc", "max_tokens": 40, "temperature": 0}
    chat = {"model": "m", "messages": [{"role": "user", "content": "say abc abc abc"}], "max_tokens": 30,
            "temperature": 0}
    replies = []
    for spec in ({}, {"prompt_lookup": True}, {"draft": str(draft), "speculate": 3}):
        model, _ = load_model(target)
        with TestClient(create_app(model, tok, ServeConfig(model_name="m", **spec))) as client:
            a = client.post("/v1/completions", json=body).json()
            b = client.post("/v1/chat/completions", json=chat).json()
            health = client.get("/health").json()["scheduler"]
        replies.append((a["choices"][0]["text"], a["usage"], b["choices"][0]["message"]["content"]))
        assert (health["draft_proposed"] > 0) == bool(spec) and health["draft_accepted"] <= health["draft_proposed"]
    assert replies[0][0] and replies[1] == replies[0] and replies[2] == replies[0]


def test_scheduler_tool_call_under_speculation():
    """A sequence that switches to a tool call mid-round: the same events as without speculation."""
    from test_serve import CALL, QUESTION, TOOLS, collector, run_to_end, say, scripted_model

    from lmforge.chat import render_messages
    from lmforge.inference.scheduler import SamplingParams, Scheduler
    from lmforge.serve.protocol import ToolDef, tools_system_text

    tok = Tokenizer.byte_level()
    system = {"role": "system", "content": tools_system_text([ToolDef.model_validate(t) for t in TOOLS])}
    prompt = render_messages(tok, [system, QUESTION])
    reply = (tok.encode("ok ") + [tok.special_id("<|tool_call_start|>")] + tok.encode(CALL)
             + [tok.special_id("<|tool_call_end|>")])
    model = scripted_model(tok, say({}, len(prompt), reply), fill=tok.encode("a")[0],
                           block_size=len(prompt) + len(reply) + 8)
    runs = []
    for spec in (None, Speculator(model, tok, prompt_lookup=True, k=4)):
        sched = Scheduler(model, tok, speculator=spec)
        events, emit = collector()
        sched.submit(prompt, SamplingParams(max_tokens=100, temperature=0, tools=True), emit)
        run_to_end(sched)
        runs.append([(e.kind, e.text, e.tool_call, e.finish_reason) for e in events])
    assert runs[0] == runs[1] and runs[0][-1][-1] == "tool_calls"
    assert sched.stats.draft_accepted > 0
