"""The encoder-only family (lmforge/models/encoder.py): BERT's masking recipe, bidirectional attention
with a padding mask, pooling, masked-language-model pretraining on the shared Trainer, and the
one-line refusals of everything that needs text probabilities or generation."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import run_cli

from lmforge.models.encoder import Encoder, EncoderConfig
from lmforge.models.registry import get_family
from lmforge.train import checkpoint as ckpt_io


def tiny(**over) -> Encoder:
    torch.manual_seed(0)
    return Encoder(get_family("encoder").config("tiny", vocab_size=300, **over)).eval()


def test_corruption_is_berts_recipe():
    """15% of the text positions chosen, never anything else; of those 80% masked, 10% replaced by a
    random token, 10% left as they are (each within 5 standard errors)."""
    model = tiny()
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 300, (400, 500), generator=g)
    text = torch.rand(clean.shape, generator=g) < 0.9
    inputs, chosen = model.corrupt(clean, text, torch.Generator().manual_seed(1))
    assert not chosen[~text].any() and torch.equal(inputs[~chosen], clean[~chosen])

    def within(count, n, p):
        return abs(count - n * p) < 5 * math.sqrt(n * p * (1 - p))

    n_text, n_chosen = int(text.sum()), int(chosen.sum())
    assert within(n_chosen, n_text, 0.15)
    masked = int((inputs[chosen] == model.mask_id).sum())
    changed = int(((inputs[chosen] != model.mask_id) & (inputs[chosen] != clean[chosen])).sum())
    assert within(masked, n_chosen, 0.8)
    assert within(changed, n_chosen, 0.1 * (1 - 1 / 300))  # a random token is the same one 1 time in 300
    assert inputs.max() <= model.mask_id and (inputs[chosen] != model.mask_id).any()


def test_padding_changes_nothing_and_attention_goes_both_ways():
    model = tiny()
    a, b = torch.randint(0, 300, (10,)), torch.randint(0, 300, (6,))
    batch = torch.stack([a, torch.cat([b, torch.randint(0, 300, (4,))])])
    mask = torch.tensor([[True] * 10, [True] * 6 + [False] * 4])
    with torch.no_grad():
        together = model.hidden_states(batch, mask)
        alone = model.hidden_states(b[None])[0]
        assert torch.allclose(together[1, :6], alone, atol=1e-5)
        assert torch.allclose(together[0], model.hidden_states(a[None])[0], atol=1e-5)
        other_pad = batch.clone()
        other_pad[1, 6:] = 7
        assert torch.allclose(model.hidden_states(other_pad, mask)[1, :6], alone, atol=1e-5)
        assert not torch.allclose(model.hidden_states(batch)[1, :6], alone, atol=1e-3)  # unmasked padding is read
        # mean pooling over real tokens only; first-token pooling is position 0
        assert torch.allclose(model.embed_texts(batch, mask)[1], alone.mean(0), atol=1e-5)
        first = tiny(pooling="first")
        assert torch.allclose(first.embed_texts(batch, mask), first.hidden_states(batch, mask)[:, 0])
        # the first position sees the last token (a causal model's would not)
        changed = a.clone()
        changed[-1] = (a[-1] + 1) % 300
        assert not torch.allclose(model.hidden_states(changed[None])[0, 0], together[0, 0], atol=1e-4)


def test_masked_prediction_is_the_cross_entropy_of_the_chosen_tokens():
    model = tiny()
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 300, (4, 32), generator=g)
    y = torch.cat([x[:, 1:], torch.randint(0, 300, (4, 1), generator=g)], dim=1)
    y[0, :5] = -100  # a prompt: visible, never chosen
    with torch.no_grad():
        nll, correct, n = model.masked_prediction(x, y, torch.Generator().manual_seed(9))
        clean = torch.where(y != -100, y, torch.cat([x[:, 1:], x[:, -1:]], dim=1))
        inputs, chosen = model.corrupt(clean, y != -100, torch.Generator().manual_seed(9))
        logp = model(inputs).log_softmax(-1)
    assert not chosen[0, :5].any()
    want = -logp[chosen].gather(1, clean[chosen][:, None]).sum()
    assert int(n) == int(chosen.sum()) > 0
    assert nll.item() == pytest.approx(want.item(), rel=1e-5)
    assert int(correct) == int((logp[chosen].argmax(-1) == clean[chosen]).sum())
    assert logp.shape[-1] == 300  # the mask id is never an answer


def test_bad_configs_are_one_clear_error():
    from lmforge.common import LmforgeError

    for over, msg in (({"causal": True}, "attends both ways"), ({"mask_prob": 0.0}, "mask_prob"),
                      ({"pooling": "max"}, "pooling")):
        with pytest.raises(LmforgeError, match=msg):
            EncoderConfig(vocab_size=300, block_size=64, n_layer=1, n_head=2, n_embd=32, **over)


def test_pretraining_learns_to_fill_in_masked_tokens_and_everything_else_refuses(tiny_data, tmp_path):
    """`lmforge pretrain --arch encoder` on the shared Trainer: the validation accuracy on masked tokens
    beats always answering the most frequent token, the checkpoint loads as an encoder, and sampling,
    chat, scoring and benchmarks each refuse it with one line."""
    out = tmp_path / "enc"
    code, stdout, err = run_cli("pretrain", "--arch", "encoder", "--model", "tiny", "--data-dir", tiny_data,
                                "--out", out, "--seq-len", "64", "--batch-size", "16", "--max-steps", "400",
                                "--eval-every", "200", "--eval-tokens", "8192", "--compile", "off", "--no-progress")
    assert code == 0, err
    summary = json.loads(stdout[stdout.index("{"):])
    assert "val_bpb" not in summary and "val_loss" not in summary
    from lmforge.data.loader import TokenSplit

    val = TokenSplit(tiny_data, "val")
    ids = np.asarray(val.read(0, val.num_tokens))
    most_frequent = np.bincount(ids).max() / len(ids)
    assert summary["val_mlm_accuracy"] > most_frequent + 0.1
    assert (out / "loss.png").stat().st_size > 10_000
    model, state = ckpt_io.load_model(out)
    assert isinstance(model, Encoder) and state["model_family"] == "encoder"

    ckpt = str(ckpt_io.resolve_checkpoint(out))
    for argv, words in ((["sample", "--checkpoint", ckpt, "--max-new-tokens", "3"], "only reads text"),
                        (["chat", "--checkpoint", ckpt], "only reads text"),
                        (["score", "--checkpoint", ckpt, "some text"], "assigns none"),
                        (["eval", "--checkpoint", ckpt, "--tasks", "copa", "--limit", "2"], "assigns none")):
        code, _, err = run_cli(*argv)
        assert code == 2 and words in err and err.count("\n") == 1, (argv, err)
