"""Reward model (Bradley-Terry) and DPO: losses against hand computations, the scalar head (on a
transformer and on a family that is not one), the checkpoint layout old and new, and tiny
end-to-end runs of `lmforge reward train|score` and `lmforge dpo`."""
import json
import math
import random
from dataclasses import asdict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import PrefixMeanConfig, PrefixMeanLM, run_cli, save_tiny_checkpoint
from safetensors.torch import load_file, save_file

from lmforge.common import LmforgeError, atomic_write_json
from lmforge.models.transformer import GPT, get_config
from lmforge.posttrain.batches import pack, sequence_logprob
from lmforge.posttrain.preference import encode_pairs, record_to_pair
from lmforge.stages.dpo import DPOTask, dpo_loss, pair_rows
from lmforge.stages.reward import (
    RewardModel,
    RewardTask,
    bradley_terry_loss,
    load_reward_model,
    pack_for_scoring,
    pair_batch,
)
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import list_checkpoints, load_model, save_checkpoint
from lmforge.train.logs import read_log
from lmforge.train.loop import TrainConfig, Trainer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.byte_level()


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("pref_base"))


# ----------------------------------------------------------------------------- losses by hand


def test_bradley_terry_loss_by_hand():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # −log σ(1) = log(1 + e^−1), −log σ(−1) = log(1 + e)
    want = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(want, abs=1e-6)
    assert bradley_terry_loss(torch.tensor([500.0]), torch.tensor([-500.0])).item() == 0.0  # no overflow


def test_dpo_loss_by_hand():
    # pair 1: policy raised the chosen reply by 0.5 nats vs the reference and lowered the rejected by 0.5
    # pair 2: the policy moved the wrong way by 1 nat on the chosen reply
    pc, pr = torch.tensor([-1.0, -4.0]), torch.tensor([-2.0, -2.0])
    rc, rr = torch.tensor([-1.5, -3.0]), torch.tensor([-1.5, -2.0])
    beta = 0.5
    loss, cr, rj = dpo_loss(pc, pr, rc, rr, beta)
    assert cr.tolist() == [0.25, -0.5] and rj.tolist() == [-0.25, 0.0]
    # margins 0.5 and −0.5: −log σ(0.5) = 0.474077, −log σ(−0.5) = 0.974077
    assert loss.item() == pytest.approx((0.4740770 + 0.9740770) / 2, abs=1e-6)
    # Gradient: dL/d pc_i = −β σ(−margin_i) / n
    pc.requires_grad_(True)
    dpo_loss(pc, pr, rc, rr, beta)[0].backward()
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert pc.grad.tolist() == pytest.approx([-0.5 * sig(-0.5) / 2, -0.5 * sig(0.5) / 2], abs=1e-6)


def test_sequence_logprob_matches_token_by_token_scoring(tok):
    """The summed reply log-probability from one padded batch equals scoring the reply one token at a
    time on its own prefix (no padding, no batching)."""
    torch.manual_seed(1)
    model = GPT(get_config("tiny", vocab_size=tok.vocab_size, block_size=96)).eval()
    pairs = [record_to_pair({"prompt": "2+2?", "chosen": "4", "rejected": "five, I think"})]
    [e], _ = encode_pairs(tok, pairs, 96)
    x, mask = pack([e.prompt, e.prompt], [e.chosen, e.rejected], tok.pad_id, "cpu")
    got = sequence_logprob(model, x, mask)
    for row, reply in enumerate([e.chosen, e.rejected]):
        seq, total = list(e.prompt), 0.0
        for t in reply:
            logits = model(torch.tensor([seq]))[0, -1]
            total += F.log_softmax(logits.double(), -1)[t].item()
            seq.append(t)
        assert got[row].item() == pytest.approx(total, abs=1e-4)


def test_reward_model_reads_the_last_reply_token(tok):
    torch.manual_seed(2)
    lm = GPT(get_config("tiny", vocab_size=tok.vocab_size, block_size=64)).eval()
    # hidden_states is the forward pass without the head
    x = torch.randint(0, 256, (2, 20))
    torch.testing.assert_close(lm.lm_head(lm.hidden_states(x)).float(), lm(x))
    rm = RewardModel(lm).eval()
    assert rm(x, torch.tensor([5, 19])).tolist() == [0.0, 0.0]  # zero-initialised head
    # The language model's output layer is never read: frozen, and not part of the checkpoint.
    assert rm.model is lm and not lm.lm_head.weight.requires_grad
    assert set(rm.state_dict()) == {k for k in lm.state_dict() if k != "lm_head.weight"} | {
        "score_head.weight", "score_head.bias"}
    torch.nn.init.normal_(rm.score_head.weight)
    a, last = pack_for_scoring([[1, 2, 3]], [[4, 5]], tok.pad_id, "cpu")
    b, _ = pack_for_scoring([[1, 2, 3], [9] * 10], [[4, 5], [6]], tok.pad_id, "cpu")
    # the score ignores padding after the last token and other rows of the batch
    torch.testing.assert_close(rm(a, last)[0], rm(b, torch.tensor([4, 10]))[0])
    x2 = a.clone()
    x2[0, 1] = 77  # ... but depends on earlier tokens
    assert rm(x2, last).item() != rm(a, last).item()


def test_reward_model_on_another_family_trains_saves_loads_and_resumes(tok, tmp_path):
    """The reward model on a language model that is not a transformer, through the shared Trainer
    (Muon for the head's matrix): two steps, a checkpoint that records the wrapped family and the
    head, loaded back with the same scores; --resume continues it. The wrapped output layer gets no
    optimizer state and is not saved."""
    torch.manual_seed(5)
    rm = RewardModel(PrefixMeanLM(PrefixMeanConfig(vocab_size=tok.vocab_size)))
    pairs = [record_to_pair({"prompt": f"{a}?", "chosen": "yes " * (a % 3 + 1), "rejected": "no " * (a % 3 + 1)})
             for a in range(8)]
    enc, _ = encode_pairs(tok, pairs, 64)

    def trainer(max_steps, resume=False):
        task = RewardTask(enc, enc, pad_id=tok.pad_id, batch_size=4, seed=0, device="cpu")
        cfg = TrainConfig(out_dir=str(tmp_path / "rm"), max_steps=max_steps, optimizer="muon", lr=0.05,
                          warmup_steps=0, eval_every=0, ckpt_every=1, log_every=1, compile="off", dtype="fp32",
                          device="cpu", progress=False)
        return Trainer(rm, task, cfg, extra_state={"stage": "reward", "head": rm.head_record()}, resume=resume)

    t = trainer(2)
    optimized = {id(p) for opt in t.optimizers for g in opt.param_groups for p in g["params"]}
    muon = {id(p) for p in t.optimizers[1].param_groups[0]["params"]}
    assert muon == {id(rm.score_head.weight)} and id(rm.score_head.bias) in optimized
    assert id(rm.model.embed.weight) in optimized
    assert not ({id(rm.model.out.weight), id(rm.model.out.bias)} & optimized)
    result = t.fit()
    assert result["val_accuracy"] > 0.5 and result["val_loss"] < math.log(2)
    x, last = pair_batch(enc, tok.pad_id, "cpu")
    with torch.no_grad():
        trained = rm.eval()(x, last)
    ckpt = list_checkpoints(tmp_path / "rm" / "checkpoints")[-1]
    assert set(load_file(str(ckpt / "model.safetensors"))) == {"embed.weight", "score_head.weight",
                                                              "score_head.bias"}
    loaded, state = load_reward_model(tmp_path / "rm")
    assert state["model_family"] == "test-prefix-mean" and state["model_config"] == asdict(rm.config)
    assert state["head"] == {"kind": "reward", "prefixes": ["score_head."], "loads_as_language_model": False}
    assert isinstance(loaded.model, PrefixMeanLM)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, last), trained)
    with pytest.raises(LmforgeError, match="holds a reward model, not a language model"):
        load_model(ckpt)
    rm.train()
    assert trainer(3, resume=True).fit()["step"] == 3


def test_a_reward_checkpoint_in_the_old_layout_still_loads(tmp_path):
    """A reward checkpoint as written before the heads wrapped the model (a GPT subclass): the
    transformer's tensors without lm_head, the score head's, and a state.json with neither
    "model_family" nor "head". It loads with the same scores, and saving it again writes that layout."""
    torch.manual_seed(6)
    cfg = get_config("tiny", vocab_size=300, block_size=32)
    lm = GPT(cfg)
    head = nn.Linear(cfg.n_embd, 1)
    tensors = {k: v for k, v in lm.state_dict().items() if not k.startswith("lm_head.")}
    tensors.update({"score_head.weight": head.weight.detach(), "score_head.bias": head.bias.detach()})
    ckpt = tmp_path / "old" / "checkpoints" / "step_000007"
    ckpt.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(ckpt / "model.safetensors"))
    atomic_write_json(ckpt / "state.json", {"format": "lmforge-checkpoint", "version": 1, "step": 7,
                                            "model_config": cfg.to_dict(), "stage": "reward"})
    rm, _ = load_reward_model(tmp_path / "old")
    x, last = torch.randint(0, 300, (3, 12)), torch.tensor([11, 4, 7])
    with torch.no_grad():
        want = head(lm.hidden_states(x)[torch.arange(3), last]).squeeze(-1)
        torch.testing.assert_close(rm(x, last), want)
    again = save_checkpoint(tmp_path / "again", 7, rm, None, {"stage": "reward", "head": rm.head_record()})
    assert set(load_file(str(again / "model.safetensors"))) == set(tensors)
    with pytest.raises(LmforgeError, match="holds a reward model"):  # no "head" record: known by its stage
        load_model(ckpt)


def test_dpo_starts_at_log2_and_one_step_raises_the_margin(tok):
    torch.manual_seed(3)
    policy = GPT(get_config("tiny", vocab_size=tok.vocab_size, block_size=96))
    ref = GPT(policy.config)
    ref.load_state_dict(policy.state_dict())
    ref.eval().requires_grad_(False)
    pairs = [record_to_pair({"prompt": f"{a}+{a}?", "chosen": str(2 * a), "rejected": str(2 * a + 1)})
             for a in range(4)]
    enc, _ = encode_pairs(tok, pairs, 96)
    task = DPOTask(enc, enc, ref, beta=0.1, pad_id=tok.pad_id, batch_size=4, seed=0, device="cpu")
    batch = pair_rows(enc, tok.pad_id, "cpu")
    loss, n = task.loss(policy, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and n == sum(
        len(e.chosen) + len(e.rejected) for e in enc)
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        task.loss(policy, batch)[0].backward()
        opt.step()
    m = task.evaluate(policy.eval())
    assert m["margin"] > 0 and m["accuracy"] > 0.5 and m["loss"] < math.log(2)
    with pytest.raises(LmforgeError, match="beta"):
        DPOTask(enc, enc, ref, beta=0.0, pad_id=0, batch_size=1, seed=0, device="cpu")


# ----------------------------------------------------------------------------- the commands


PROMPTS = ["How was your day?", "Tell me about the trip.", "What do you think of the plan?", "How is the garden?"]
CHEERFUL = "glad lovely happy kind warm bright sunny great".split()
GLOOMY = "ugh boring awful grim cold dull rainy sad".split()


def cheerful_pairs(path, n=200, seed=0):
    """Pairs a tiny model learns in seconds: the chosen reply is cheerful words, the rejected one as
    many gloomy words (same length, so length cannot decide). Held-out pairs are new word mixes."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        k = rng.randint(3, 6)
        records.append({"prompt": rng.choice(PROMPTS), "chosen": " ".join(rng.choices(CHEERFUL, k=k)) + ".",
                        "rejected": " ".join(rng.choices(GLOOMY, k=k)) + "."})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_cli_reward_train_and_score(base, tmp_path):
    out = tmp_path / "rm"
    code, stdout, err = run_cli("reward", "train", "--checkpoint", base, "--data", cheerful_pairs(tmp_path / "p.jsonl"),
                                "--val-fraction", "0.2", "--out", out, "--max-steps", "20", "--batch-size", "8",
                                "--eval-every", "10", "--log-every", "5", "--no-progress", "--device", "cpu",
                                "--dtype", "fp32", "--lr", "1e-3")
    assert code == 0, err
    result = json.loads(stdout[stdout.index("{"):])
    # 40 held-out pairs; chance is 0.5, measured 1.0 (loss 0.36 < log 2)
    assert result["val_accuracy"] >= 0.9 and result["val_loss"] < math.log(2) - 0.2 and result["step"] == 20
    log = read_log(out / "log.jsonl")
    train_lines = [r for r in log if "loss" in r]
    assert len(train_lines) == 4 and all("accuracy" in r and "margin" in r for r in train_lines)
    assert [r["step"] for r in log if "val_accuracy" in r] == [10, 20]
    rm, state = load_reward_model(out)
    assert state["stage"] == "reward" and rm.score_head.weight.abs().sum() > 0
    with pytest.raises(LmforgeError, match="not a reward model"):
        load_reward_model(base)
    assert state["head"]["kind"] == "reward"
    with pytest.raises(LmforgeError, match="not a language model"):  # its trunk feeds the score head only
        load_model(out)
    # A prompt and word mix it never saw: the cheerful reply is ranked first, by a clear margin.
    code, stdout, err = run_cli("reward", "score", "--checkpoint", out, "--prompt", "How was the concert?",
                                "dull grim cold.", "warm bright glad.")
    assert code == 0, err
    scores = [(float(score), text) for score, text in (ln.split("\t") for ln in stdout.strip().splitlines())]
    assert [text for _, text in scores] == ["warm bright glad.", "dull grim cold."]
    assert scores[0][0] > scores[1][0] + 0.3  # measured 0.9
    code, stdout, err = run_cli("reward", "score", "--checkpoint", out, "--data", "synthetic:arithmetic:10")
    assert code == 0 and json.loads(stdout)["pairs"] == 10
    code, _, err = run_cli("reward", "score", "--checkpoint", out)
    assert code == 2 and err.startswith("error:")


def test_cli_dpo_runs_logs_and_resumes(base, tmp_path):
    out = tmp_path / "dpo"
    common = ["dpo", "--checkpoint", base, "--data", "synthetic:arithmetic:40", "--val-fraction", "0.25", "--out", out,
              "--batch-size", "4", "--eval-every", "2", "--ckpt-every", "2", "--log-every", "1", "--no-progress",
              "--device", "cpu", "--dtype", "fp32", "--lr", "1e-3", "--beta", "0.2"]
    code, stdout, err = run_cli(*common, "--max-steps", "4")
    assert code == 0, err
    result = json.loads(stdout[stdout.index("{"):])
    # At the start the policy is the reference: every implicit reward is 0.
    assert result["start_val_margin"] == 0.0 and result["start_val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert "val_logp_accuracy" in result and result["val_margin"] != 0.0
    log = read_log(out / "log.jsonl")
    assert all({"reward_chosen", "reward_rejected", "margin", "accuracy"} <= set(r) for r in log if "loss" in r)
    full = [r["loss"] for r in log if "loss" in r]
    # resume from the step-2 checkpoint gives the same steps 3-4
    import shutil

    shutil.rmtree(out / "checkpoints" / "step_000004")
    code, _, err = run_cli(*common, "--max-steps", "4", "--resume")
    assert code == 0, err
    again = [r["loss"] for r in read_log(out / "log.jsonl") if "loss" in r]
    assert again == pytest.approx(full, abs=1e-6)
    code, _, err = run_cli("dpo", "--checkpoint", base, "--data", "synthetic:identity:10", "--out", tmp_path / "x")
    assert code == 2 and "arithmetic and letters" in err


def test_cli_dpo_lora(base, tmp_path):
    """DPO through a rank-2 LoRA adapter learns the preference on held-out pairs: at the start the
    policy is the reference (accuracy 0, loss log 2); after 20 steps measured accuracy 1.0, loss 0.53."""
    out = tmp_path / "dpo_lora"
    code, stdout, err = run_cli("dpo", "--checkpoint", base, "--data", cheerful_pairs(tmp_path / "p.jsonl"),
                                "--val-fraction", "0.2", "--out", out, "--batch-size", "8", "--max-steps", "20",
                                "--lora-rank", "2", "--lr", "3e-2", "--no-progress", "--device", "cpu",
                                "--dtype", "fp32", "--eval-every", "0")
    assert code == 0, err
    result = json.loads(stdout[stdout.index("{"):])
    assert result["start_val_accuracy"] == 0.0 and result["start_val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert result["val_accuracy"] >= 0.8 and result["val_margin"] > 0.1
    assert result["val_loss"] < math.log(2) - 0.05
    assert (out / "adapter" / "adapter.safetensors").is_file()
