"""The model protocol (lmforge/models/protocol.py) and the family registry.

A third family written here in a dozen lines — a neural bigram model: no attention, no context
window, its decode state only the last token — goes through everything downstream of the protocol
(engine, scheduler, eval harness, scoring, checkpoints) with no special case for it anywhere."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.common import LmforgeError
from lmforge.inference.engine import Engine
from lmforge.models.protocol import (
    LanguageModel,
    ModelConfig,
    ModelFamily,
    check_param_groups,
    scoring_window,
    tokens_left,
)
from lmforge.models.registry import build_model, get_family, register
from lmforge.models.transformer import GPT, get_config
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import load_model, save_checkpoint

# ----------------------------------------------------------------------------- the fake family


@dataclass(frozen=True)
class BigramConfig(ModelConfig):
    vocab_size: int = 260
    n_embd: int = 16


class LastToken:  # the whole decode state: each row's last token
    def __init__(self, last):
        self.last = last

    batch_size = property(lambda self: self.last.size(0))

    def keep(self, rows):
        self.last = self.last.index_select(0, rows)

    def extend(self, other):
        self.last = torch.cat([self.last, other.last])


class NeuralBigram(LanguageModel):
    family = "test-bigram"

    def __init__(self, cfg: BigramConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size)

    def forward(self, idx, targets=None, reduction="mean"):
        logits = self.head(self.embed(idx)).float()
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction=reduction)

    def param_groups(self):
        return {"embedding": [self.embed.weight, self.head.weight], "vector": [self.head.bias]}

    def new_cache(self, batch_size, max_len=None, dtype=None):
        return LastToken(torch.zeros(batch_size, dtype=torch.long, device=self.device))

    def prefill(self, idx, cache, last=None):
        last = torch.full((idx.size(0),), idx.size(1) - 1, device=idx.device) if last is None else last
        cache.last = idx[torch.arange(idx.size(0), device=idx.device), last]
        return self(cache.last[:, None])[:, 0]

    def decode(self, idx, cache, positions, step_fn=None):
        cache.last = idx[:, 0]
        return self(idx)[:, 0]


register(ModelFamily("test-bigram", NeuralBigram, BigramConfig, {"tiny": BigramConfig()}, default_preset="tiny"))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.byte_level()


@pytest.fixture(scope="module")
def bigram(tok):
    torch.manual_seed(0)
    return build_model("test-bigram", get_family("test-bigram").config(vocab_size=tok.vocab_size)).eval()


# ----------------------------------------------------------------------------- the protocol


def test_engine_cached_equals_recomputed_for_a_non_transformer(bigram, tok):
    prompts = [[tok.bos_id] + tok.encode("def f"), [tok.bos_id] + tok.encode("import os, sys")]
    engine = Engine(bigram, tok)
    cached = engine.generate(prompts, 12, temperature=0.0, stop_ids=())
    plain = engine.generate(prompts, 12, temperature=0.0, stop_ids=(), use_cache=False)
    assert [c.tokens for c in cached] == [c.tokens for c in plain]
    assert all(len(c.tokens) == 12 for c in cached)
    # Greedy bigram: every token is the argmax after the one before it.
    with torch.no_grad():
        best_next = bigram(torch.arange(tok.vocab_size)[None])[0].argmax(-1)
    for p, c in zip(prompts, cached):
        seq = p + c.tokens
        assert all(seq[i + 1] == int(best_next[seq[i]]) for i in range(len(p) - 1, len(seq) - 1))
    # No context window: a generation longer than any transformer preset's still runs.
    long = engine.generate([prompts[0]], 300, temperature=1.0, seed=0, stop_ids=())
    assert len(long[0].tokens) == 300


def test_scheduler_serves_a_non_transformer(bigram, tok):
    from lmforge.inference.scheduler import SamplingParams, Scheduler

    sched = Scheduler(bigram, tok, max_batch=4)
    events = []
    prompts = [[tok.bos_id] + tok.encode(t) for t in ("class A:", "x = 1", "return")]
    seqs = [sched.submit(p, SamplingParams(max_tokens=8 + 3 * i, temperature=0.0), events.append)
            for i, p in enumerate(prompts)]
    for _ in range(60):
        sched.step()
    ref = Engine(bigram, tok).generate(prompts, 14, temperature=0.0)
    for i, (seq, r) in enumerate(zip(seqs, ref)):
        assert seq.done
        assert seq.tokens == r.tokens[:8 + 3 * i]


def test_harness_and_scoring_through_the_protocol(bigram, tok):
    from lmforge.eval.harness import LmforgeModel
    from lmforge.inference.sampling import score_text

    lm = LmforgeModel(bigram, tok)
    assert lm.max_length == scoring_window(bigram) and bigram.context_limit is None
    ctx = [tok.bos_id] + tok.encode("The answer is")
    conts = [tok.encode(" yes"), tok.encode(" no, it is not")]
    [[(lp_a, _), (lp_b, _)]] = lm.score_shared([(ctx, conts)])
    for cont, lp in zip(conts, (lp_a, lp_b)):
        full = torch.tensor([ctx + cont])
        ref = F.log_softmax(lm.logits(full[:, :-1])[0], -1)[len(ctx) - 1:].gather(1, torch.tensor(cont)[:, None])
        torch.testing.assert_close(lp, ref[:, 0], rtol=1e-5, atol=1e-5)
    [[(lp_doc, _)]] = lm.score_shared([([tok.bos_id], [conts[1]])])
    assert score_text(bigram, tok, " no, it is not").logprob == pytest.approx(float(lp_doc.sum()), abs=1e-4)
    assert tokens_left(bigram, 10**6) > 0


def test_checkpoint_records_the_family_and_rebuilds_it(bigram, tok, tmp_path):
    path = save_checkpoint(tmp_path / "ck", 3, bigram, files={"tokenizer.json": b"{}"})
    state = json.loads((path / "state.json").read_text())
    assert state["model_family"] == "test-bigram"
    loaded, _ = load_model(path)
    assert type(loaded) is NeuralBigram
    x = torch.randint(0, tok.vocab_size, (2, 9))
    torch.testing.assert_close(loaded(x), bigram(x))


def test_checkpoints_from_before_families_load_as_transformers(tmp_path):
    torch.manual_seed(0)
    gpt = GPT(get_config("tiny", tie_embeddings=True)).eval()
    path = save_checkpoint(tmp_path / "ck", 1, gpt)
    state = json.loads((path / "state.json").read_text())
    del state["model_family"]  # what every checkpoint written before this change looks like
    (path / "state.json").write_text(json.dumps(state))
    loaded, _ = load_model(path)
    assert type(loaded) is GPT and loaded.lm_head.weight is loaded.embed_tokens.weight
    x = torch.randint(0, 512, (1, 16))
    torch.testing.assert_close(loaded(x), gpt(x))


def test_unknown_family_and_preset_are_one_clear_error():
    with pytest.raises(LmforgeError, match="unknown model family 'rwkv'.*lstm.*ngram.*transformer"):
        get_family("rwkv")
    with pytest.raises(LmforgeError, match="unknown transformer preset 'huge'"):
        get_family("transformer").config("huge")


def test_param_groups_must_cover_every_parameter_once(bigram):
    check_param_groups(bigram, bigram.param_groups())
    with pytest.raises(LmforgeError, match="in no group.*head.bias"):
        check_param_groups(bigram, {"embedding": [bigram.embed.weight, bigram.head.weight]})
    with pytest.raises(LmforgeError, match="in groups 'embedding' and 'matrix'"):
        check_param_groups(bigram, {**bigram.param_groups(), "matrix": [bigram.head.weight]})
    with pytest.raises(LmforgeError, match="unknown parameter groups"):
        check_param_groups(bigram, {"muon": []})


def test_transformer_groups_decide_the_optimizers():
    from lmforge.train.optim import Muon, build_optimizers

    for tied in (False, True):
        gpt = GPT(get_config("tiny", tie_embeddings=tied, pos="learned"))
        groups = gpt.param_groups()
        check_param_groups(gpt, groups)
        tables = {id(gpt.embed_tokens.weight), id(gpt.wpe.weight), id(gpt.lm_head.weight)}
        assert {id(p) for p in groups["embedding"]} == tables
        opts = build_optimizers(gpt, name="muon", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), muon_lr=0.02,
                                muon_momentum=0.95)
        muon = [o for o in opts if isinstance(o, Muon)][0]
        in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
        assert in_muon == {id(p) for p in groups["matrix"]} and not in_muon & tables


@pytest.mark.parametrize("family,preset", [("transformer", "tiny"), ("lstm", "tiny")])
def test_output_layer_alone_matches_forward(family, preset):
    torch.manual_seed(0)
    for tied in (False, True):
        model = build_model(family, get_family(family).config(preset, tie_embeddings=tied)).eval()
        x = torch.randint(0, model.vocab_size, (2, 11))
        torch.testing.assert_close(model.logits_from_hidden(model.hidden_states(x)), model(x))
        names = dict(model.named_parameters())
        assert all(n in names for n in model.output_head_names())
        assert bool(model.output_head_names()) == (not tied or getattr(model, "out_proj", None) is not None)


@pytest.mark.parametrize("argv,needle", [
    (["--arch", "lstm", "--model", "kn5"], "--model kn5: not a lstm preset; choose from tiny, cpu"),
    (["--arch", "ngram", "--n-head", "4"], "--n-head does not apply to the ngram family"),
    (["--arch", "ngram", "--set", "mlp=gelu"], "unknown model field 'mlp'"),
    (["--arch", "rwkv"], "invalid choice: 'rwkv'"),
    (["--arch", "lstm", "--dry-run"], "estimates the transformer family only"),
])
def test_family_options_fail_with_one_line(tiny_data, tmp_path, argv, needle):
    from conftest import run_cli

    code, out, err = run_cli("pretrain", "--data-dir", tiny_data, "--out", tmp_path / "r", *argv)
    assert code == 2 and needle in err and "Traceback" not in out + err, err
    assert not (tmp_path / "r" / "checkpoints").exists()
