"""GRPO and PPO: advantages, the clipped objective, the KL estimator and GAE against hand
computations; a policy-gradient step moves probability the right way (PPO's heads also on a family
that is not a transformer); PPO's checkpoint is the policy's; tiny end-to-end runs."""
import json
import math

import pytest
import torch
from conftest import PrefixMeanConfig, PrefixMeanLM, run_cli, save_tiny_checkpoint
from safetensors.torch import load_file

from lmforge.common import LmforgeError, atomic_write_json, read_json
from lmforge.models.protocol import trainable_groups
from lmforge.models.transformer import GPT, get_config
from lmforge.posttrain.batches import pack, token_logprobs
from lmforge.stages.rl import (
    ActorCritic,
    RLOptions,
    RLTask,
    Rollout,
    clipped_surrogate,
    gae,
    group_advantages,
    kl_k3,
)
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import list_checkpoints, load_model, load_model_weights, save_checkpoint
from lmforge.train.logs import read_log
from lmforge.train.optim import build_optimizers


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.byte_level()


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("rl_base"))


# ----------------------------------------------------------------------------- the pieces by hand


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0, 0.0, 0.0, 1.0])
    a = group_advantages(r, 4, eps=0.0 + 1e-12)
    # group 1: mean 0.5, population std 0.5 -> ±1; group 2: all equal -> 0
    assert a[:8].tolist() == pytest.approx([1, -1, -1, 1, 0, 0, 0, 0], abs=1e-6)
    # group 3: mean 1, std sqrt((4 + 1 + 1 + 0) / 4) = sqrt(1.5)
    s = math.sqrt(1.5)
    assert a[8:].tolist() == pytest.approx([2 / s, -1 / s, -1 / s, 0.0], abs=1e-6)
    with pytest.raises(LmforgeError, match="groups of 5"):
        group_advantages(r, 5)


def test_clipped_surrogate_by_hand():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 0.5, 1.5]))
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    obj, clipped = clipped_surrogate(logp, old, adv, 0.2)
    # ratio 1.5, A>0: capped at 1.2; ratio 0.5, A>0: 0.5 (the pessimistic, unclipped term);
    # ratio 0.5, A<0: clip to 0.8 -> -0.8; ratio 1.5, A<0: -1.5 (unclipped, pessimistic)
    assert obj.tolist() == pytest.approx([1.2, 0.5, -0.8, -1.5], abs=1e-6)
    assert clipped.tolist() == [True, False, True, False]
    # gradient vanishes exactly where the clip is active
    logp.requires_grad_(True)
    clipped_surrogate(logp, old, adv, 0.2)[0].sum().backward()
    assert logp.grad.tolist() == pytest.approx([0.0, 0.5, 0.0, -1.5], abs=1e-6)


def test_k3_kl_estimator_is_unbiased_and_nonnegative():
    assert kl_k3(torch.tensor([-1.0]), torch.tensor([-2.0])).item() == pytest.approx(math.exp(-1), abs=1e-6)
    assert kl_k3(torch.tensor([-0.7]), torch.tensor([-0.7])).item() == 0.0
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    exact = (p * (p / q).log()).sum()
    expectation = (p * kl_k3(p.log(), q.log())).sum()  # E_{x~p}[k3], exactly
    assert expectation.item() == pytest.approx(exact.item(), abs=1e-12)
    assert (kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()


def test_gae_by_hand():
    # one reply of 3 tokens after a prompt position (mask 0) and before padding (mask 0)
    mask = torch.tensor([[0.0, 1, 1, 1, 0]])
    rewards = torch.tensor([[9.0, 0, 0, 1, 9]])  # outside the mask: must not leak in
    values = torch.tensor([[5.0, 0.5, 0.6, 0.7, 5.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.9)
    # δ2 = 1 − 0.7 = 0.3, A2 = 0.3; δ1 = 0.7 − 0.6 = 0.1, A1 = 0.1 + 0.9·0.3 = 0.37;
    # δ0 = 0.6 − 0.5 = 0.1, A0 = 0.1 + 0.9·0.37 = 0.433
    assert adv[0].tolist() == pytest.approx([0, 0.433, 0.37, 0.3, 0], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0, 0.933, 0.97, 1.0, 0], abs=1e-6)
    # λ = 1: returns are the discounted rewards-to-go (Monte Carlo), whatever the values
    r2 = torch.tensor([[0.5, -1.0, 2.0]])
    _, ret2 = gae(r2, torch.tensor([[3.0, -2.0, 7.0]]), torch.ones(1, 3), gamma=0.9, lam=1.0)
    assert ret2[0].tolist() == pytest.approx([0.5 - 0.9 + 0.81 * 2, -1 + 0.9 * 2, 2.0], abs=1e-6)
    # λ = 0: one-step TD errors
    a0, _ = gae(r2, torch.tensor([[3.0, -2.0, 7.0]]), torch.ones(1, 3), gamma=0.9, lam=0.0)
    assert a0[0].tolist() == pytest.approx([0.5 + 0.9 * -2 - 3, -1 + 0.9 * 7 + 2, 2 - 7], abs=1e-6)


def test_gae_carries_credit_across_a_tool_result_inside_the_reply():
    """With tools, the tool's result sits inside the reply but is not an action (mask 0): GAE must
    skip it, so the final reward still reaches the tokens before the tool call."""
    # prompt | 2 actions (the call) | 2 tool-result tokens | 4 actions (the answer) | padding
    mask = torch.tensor([[0.0, 1, 1, 0, 0, 1, 1, 1, 1, 0]])
    rewards = torch.tensor([[9.0, 0.1, 0, 5, 5, 0, 0, 0, 1, 9]])  # not actions: 9 and 5 never count
    values = torch.tensor([[7.0, 0.2, 0.3, 4, 4, 0.4, 0.5, 0.6, 0.8, 7]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)  # γλ = 0.72
    # Backwards over the actions only (positions 8, 7, 6, 5, then 2, 1):
    # δ8 = 1 − 0.8 = 0.2                 A8 = 0.2
    # δ7 = 0.9·0.8 − 0.6 = 0.12          A7 = 0.12 + 0.72·0.2 = 0.264
    # δ6 = 0.9·0.6 − 0.5 = 0.04          A6 = 0.04 + 0.72·0.264 = 0.23008
    # δ5 = 0.9·0.5 − 0.4 = 0.05          A5 = 0.05 + 0.72·0.23008 = 0.2156576
    # δ2 = 0.9·V5 − 0.3 = 0.06           A2 = 0.06 + 0.72·0.2156576 = 0.215273472   (across the gap)
    # δ1 = 0.1 + 0.9·0.3 − 0.2 = 0.17    A1 = 0.17 + 0.72·0.215273472 = 0.32499689984
    expected = [0, 0.32499689984, 0.215273472, 0, 0, 0.2156576, 0.23008, 0.264, 0.2, 0]
    assert adv[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert ret[0].tolist() == pytest.approx([a + v if m else 0 for a, v, m in
                                             zip(expected, values[0].tolist(), mask[0].tolist())], abs=1e-6)
    # γ = λ = 1: each action's return is the sum of the rewards of the actions from it to the end,
    # whatever the values — the tokens before the call get the final reward too.
    _, ret1 = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert ret1[0].tolist() == pytest.approx([0, 1.1, 1.0, 0, 0, 1.0, 1.0, 1.0, 1.0, 0], abs=1e-6)


@pytest.mark.parametrize("separate", [True, False])
def test_actor_critic_keeps_the_policy_and_adds_a_value_per_position(tok, separate):
    torch.manual_seed(0)
    lm = GPT(get_config("tiny", vocab_size=tok.vocab_size, block_size=64)).eval()
    ac = ActorCritic(lm, separate).eval()
    x = torch.randint(0, 256, (2, 10))
    logits, values = ac(x)
    torch.testing.assert_close(logits, lm(x))
    assert values.shape == (2, 10) and values.abs().sum() == 0
    # The checkpoint layout: the policy's tensors under their own names, the heads' under theirs.
    heads = {k for k in ac.state_dict() if k.startswith(("critic.", "value_head."))}
    assert set(ac.state_dict()) - heads == set(lm.state_dict()) and "critic.lm_head.weight" not in heads
    n_lm = sum(p.numel() for p in lm.parameters())
    n_trained = sum(p.numel() for ps in trainable_groups(ac).values() for p in ps)
    head = lm.lm_head.weight.numel()
    # a separate critic doubles the trunk (not the vocabulary head, which it leaves frozen); a
    # shared one adds only the value head
    assert n_trained == (2 * n_lm - head if separate else n_lm) + lm.config.n_embd + 1
    if separate:  # the critic's trunk is its own copy: training it leaves the policy alone
        assert ac.critic.embed_tokens.weight.data_ptr() != ac.model.embed_tokens.weight.data_ptr()
        assert not ac.critic.lm_head.weight.requires_grad


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_one_policy_gradient_step_favours_the_rewarded_reply(tok, algorithm):
    """Two replies to one prompt, one rewarded: after one step on the RL loss the rewarded reply is
    more likely and the other less likely."""
    torch.manual_seed(4)
    lm = GPT(get_config("tiny", vocab_size=tok.vocab_size, block_size=64))
    model = ActorCritic(lm, separate_critic=False) if algorithm == "ppo" else lm
    ref = GPT(lm.config)
    ref.load_state_dict(lm.state_dict())
    ref.requires_grad_(False)
    opts = RLOptions(checkpoint="-", algorithm=algorithm, group_size=2, kl_beta=0.0)
    task = RLTask(opts, tok, ref, seed=0, device="cpu")
    prompt = tok.encode("Q: 1+1=")
    end = tok.special_id("<|assistant_end|>")
    good, bad = tok.encode("2") + [end], tok.encode("3") + [end]
    x, mask = pack([prompt, prompt], [good, bad], tok.pad_id, "cpu")
    roll = Rollout(x, mask, torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([2.0, 2.0]))

    def logps():
        with torch.no_grad():
            out = model(x)
            return (token_logprobs(out[0] if isinstance(out, tuple) else out, x) * mask).sum(1)

    before = logps()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss, n = task.loss(model, roll)
    assert n == 4
    loss.backward()
    opt.step()
    after = logps()
    assert after[0] > before[0] and after[1] < before[1]
    if algorithm == "ppo":
        assert model.value_head.weight.abs().sum() > 0  # the critic learned too


def test_ppo_heads_on_another_family_train_and_round_trip(tok, tmp_path):
    """ActorCritic on a policy that is not a transformer, with its own critic trunk: a step of the
    PPO loss makes the rewarded reply more likely and trains the value head; the critic's unused
    output layer is frozen, without optimizer state, and not saved; the checkpoint loads back into an
    ActorCritic with the same logits and values, and with `load_model` as the plain policy."""
    torch.manual_seed(7)
    cfg = PrefixMeanConfig(vocab_size=tok.vocab_size)
    ac = ActorCritic(PrefixMeanLM(cfg), separate_critic=True)
    ref = PrefixMeanLM(cfg)
    ref.load_state_dict(ac.model.state_dict())
    ref.requires_grad_(False)
    task = RLTask(RLOptions(checkpoint="-", algorithm="ppo", group_size=2, kl_beta=0.0), tok, ref, seed=0,
                  device="cpu")
    prompt, end = tok.encode("Q: 1+1="), tok.special_id("<|assistant_end|>")
    x, mask = pack([prompt, prompt], [tok.encode("2") + [end], tok.encode("3") + [end]], tok.pad_id, "cpu")
    roll = Rollout(x, mask, torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([2.0, 2.0]))

    def logps():
        with torch.no_grad():
            return (token_logprobs(ac(x)[0], x) * mask).sum(1)

    optimizers = build_optimizers(ac, name="adamw", lr=1e-2, weight_decay=0.0, betas=(0.9, 0.95), muon_lr=0.02,
                                  muon_momentum=0.95)
    optimized = {id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]}
    assert id(ac.critic.embed.weight) in optimized and id(ac.model.out.weight) in optimized
    assert not {id(ac.critic.out.weight), id(ac.critic.out.bias)} & optimized
    before = logps()
    task.loss(ac, roll)[0].backward()
    for opt in optimizers:
        opt.step()
    after = logps()
    assert after[0] > before[0] and after[1] < before[1]
    assert ac.value_head.weight.abs().sum() > 0 and ac.critic.out.weight.grad is None

    ckpt = save_checkpoint(tmp_path / "ppo" / "checkpoints", 1, ac, optimizers,
                           {"stage": "ppo", "head": ac.head_record()})
    assert set(load_file(str(ckpt / "model.safetensors"))) == {
        "embed.weight", "out.weight", "out.bias", "critic.embed.weight", "value_head.weight", "value_head.bias"}
    again = ActorCritic(PrefixMeanLM(cfg), separate_critic=True)
    load_model_weights(again, ckpt)
    with torch.no_grad():
        for got, want in zip(again(x), ac(x)):
            torch.testing.assert_close(got, want)
        policy, state = load_model(tmp_path / "ppo")
        assert isinstance(policy, PrefixMeanLM) and state["head"]["critic"] == "separate"
        torch.testing.assert_close(policy(x), ac(x)[0])


def test_tool_rollouts_credit_only_the_policys_own_tokens(tok, monkeypatch):
    """With tools, a reply holds tokens the loop inserted (the tool's result): they are in the packed
    sequence, so the policy reads them, but not in the mask of actions."""
    from lmforge.posttrain import verifiable

    torch.manual_seed(0)
    lm = GPT(get_config("tiny", vocab_size=tok.vocab_size, block_size=128))
    end = tok.special_id("<|assistant_end|>")
    seen = {}

    def scripted(engine, prompts, max_new_tokens, *, tools, **sampling):
        seen["tools"] = tools
        right = tok.encode("call") + tok.encode("=7") + tok.encode("so 7") + [end]
        actions = [1] * 4 + [0] * 2 + [1] * 5
        wrong = tok.encode("8") + [end]
        return [verifiable.Reply(right, actions, "so 7", True) if i == 0 else verifiable.Reply(wrong, [1, 1], "8", True)
                for i in range(len(prompts))]

    monkeypatch.setattr(verifiable, "generate_replies", scripted)
    monkeypatch.setattr(verifiable.SyntheticSource, "sample", lambda self, rng: ("What is 3 + 4?", "7"))
    task = RLTask(RLOptions(checkpoint="-", tools=True, prompts_per_step=2, group_size=2), tok, lm, seed=0,
                  device="cpu")
    task.policy = lm
    r = task.rollout()
    assert seen["tools"] is True
    assert r.correct.tolist() == [1.0, 0.0, 0.0, 0.0] and r.lengths.tolist() == [9.0, 2.0, 2.0, 2.0]
    # The second group's replies are all wrong: no advantage, left out of the loss.
    assert r.x.shape[0] == 2 and r.rewards.tolist() == [1.0, 0.0]
    assert r.stats == {"reward": 0.25, "informative": 0.5}
    assert r.mask[0].sum() == 9 and r.mask[1].sum() == 2
    n_prompt = len(task._prompt_ids("What is 3 + 4?"))
    assert r.mask[0, n_prompt - 1:n_prompt - 1 + 11].tolist() == [1.0] * 4 + [0.0] * 2 + [1.0] * 5
    loss, n = task.loss(lm, r)
    assert n == 11 and torch.isfinite(loss)
    assert task.metrics.sums["informative"] == 0.5


def test_grpo_rollout_without_an_informative_group_adds_nothing(tok, monkeypatch):
    """Every reply wrong: no group carries a signal. One group still goes through the model (under
    DDP every process must take part in the step) but with no action in its mask: zero loss, zero
    gradient — not a step towards the reference alone."""
    from lmforge.posttrain import verifiable

    torch.manual_seed(0)
    lm = GPT(get_config("tiny", vocab_size=tok.vocab_size, block_size=128))
    end = tok.special_id("<|assistant_end|>")
    monkeypatch.setattr(verifiable, "generate_replies", lambda engine, prompts, n, **kw: [
        verifiable.Reply(tok.encode("8") + [end], [1, 1], "8", True) for _ in prompts])
    monkeypatch.setattr(verifiable.SyntheticSource, "sample", lambda self, rng: ("What is 3 + 4?", "7"))
    ref = GPT(lm.config)
    ref.load_state_dict(lm.state_dict())
    task = RLTask(RLOptions(checkpoint="-", prompts_per_step=2, group_size=2, kl_beta=0.5), tok, ref, seed=0,
                  device="cpu")
    task.policy = lm
    r = task.rollout()
    assert r.x.shape[0] == 2 and r.mask.sum() == 0 and r.global_replies == 0 and r.stats["informative"] == 0
    with torch.no_grad():  # a policy away from the reference: a KL term would have a gradient
        lm.lm_head.weight.mul_(3)
    loss, n = task.loss(lm, r)
    loss.backward()
    assert n == 0 and loss.item() == 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in lm.parameters())


def test_rl_options_are_checked(tok):
    ref = GPT(get_config("tiny", vocab_size=tok.vocab_size))
    for kw, msg in [({"group_size": 1}, "group-size >= 2"), ({"clip": 1.5}, "clip"), ({"kl_beta": -1}, "kl-beta"),
                    ({"tasks": ["nope"]}, "unknown synthetic task"), ({"max_new_tokens": 0}, "max-new-tokens"),
                    ({"tasks": ["gsm8k:/missing.jsonl"]}, "not found")]:
        with pytest.raises(LmforgeError, match=msg):
            RLTask(RLOptions(checkpoint="-", **kw), tok, ref, seed=0, device="cpu")


# ----------------------------------------------------------------------------- the commands


RL_ARGS = ["--group-size", "3", "--prompts-per-step", "2", "--max-new-tokens", "6", "--eval-n", "4",
           "--eval-every", "2", "--no-progress", "--device", "cpu", "--dtype", "fp32", "--lr", "1e-3"]


def test_cli_grpo_logs_reward_accuracy_kl_length_and_resumes(base, tmp_path):
    out = tmp_path / "grpo"
    common = ["grpo", "--checkpoint", base, "--task", "arithmetic,letters", "--out", out, "--ckpt-every", "2", *RL_ARGS]
    code, stdout, err = run_cli(*common, "--max-steps", "3")
    assert code == 0, err
    result = json.loads(stdout[stdout.index("{"):])
    assert result["step"] == 3 and "start_val_accuracy" in result and "val_accuracy_letters" in result
    log = read_log(out / "log.jsonl")
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert {"reward", "accuracy", "kl", "length", "clip_frac"} <= set(r)
        assert 0 <= r["accuracy"] <= 1 and 1 <= r["length"] <= 7 and r["kl"] >= 0
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first rollout is sampled from the reference
    # resume from step 2 repeats step 3 exactly (same rollout seed, same weights)
    import shutil

    shutil.rmtree(out / "checkpoints" / "step_000003")
    code, _, err = run_cli(*common, "--max-steps", "3", "--resume")
    assert code == 0, err
    again = [r for r in read_log(out / "log.jsonl") if "loss" in r]
    assert again[-1]["loss"] == pytest.approx(steps[-1]["loss"], abs=1e-6)
    assert again[-1]["length"] == steps[-1]["length"]


def test_cli_ppo_checkpoint_is_the_policy(base, tmp_path):
    """One checkpoint tree: the run's own checkpoint (for --resume) loads with `load_model` as the
    trained policy — the same tensors, the same logits as the actor-critic the run would resume —
    with the value head and the critic left out; no second tree."""
    out = tmp_path / "ppo"
    code, stdout, err = run_cli("ppo", "--checkpoint", base, "--task", "arithmetic", "--out", out,
                                "--max-steps", "2", "--updates-per-rollout", "2", *RL_ARGS)
    assert code == 0, err
    result = json.loads(stdout[stdout.index("{"):])
    steps = [r for r in read_log(out / "log.jsonl") if "loss" in r]
    assert len(steps) == 2 and all("value_loss" in r and "reward" in r for r in steps)
    ckpt = list_checkpoints(result["checkpoint"])[-1]
    policy, state = load_model(out)
    assert state["stage"] == "ppo" and not hasattr(policy, "value_head") and not (out / "policy").exists()
    assert state["head"] == {"kind": "actor-critic", "prefixes": ["value_head.", "critic."],
                             "loads_as_language_model": True, "critic": "separate"}
    trained = load_file(str(ckpt / "model.safetensors"))
    assert set(trained) == set(policy.state_dict()) | {k for k in trained if k.startswith(("critic.", "value_head."))}
    for name, weight in policy.state_dict().items():
        assert torch.equal(weight, trained[name]), name
    assert any(k.startswith("critic.") for k in trained) and "value_head.weight" in trained
    ac = ActorCritic(GPT(policy.config), separate_critic=True)
    load_model_weights(ac, ckpt)  # as --resume restores it
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(policy(x), ac(x)[0])
    # A PPO checkpoint from before the "head" record is known by its stage.
    legacy = read_json(ckpt / "state.json", "state")
    del legacy["head"]
    atomic_write_json(ckpt / "state.json", legacy)
    with torch.no_grad():
        torch.testing.assert_close(load_model(ckpt)[0](x), policy(x))
    atomic_write_json(ckpt / "state.json", {**legacy, "head": {"prefixes": "critic."}})
    with pytest.raises(LmforgeError, match="'head' is not a record"):
        load_model(ckpt)
    code, _, err = run_cli("ppo", "--checkpoint", base, "--out", tmp_path / "shared", "--critic", "shared",
                           "--max-steps", "1", *RL_ARGS)
    assert code == 0, err
    assert load_model(tmp_path / "shared")[1]["head"]["critic"] == "shared"


def last_token_reward_model(root, tok):
    """A reward model whose score depends only on the reply's last token: its blocks write nothing
    into the residual stream (zero output projections), so the head reads the normed embedding of
    that token. Returns (run folder, score of every token)."""
    from lmforge.stages.reward import RewardModel

    torch.manual_seed(1)
    lm = GPT(get_config("tiny", vocab_size=tok.vocab_size, block_size=96))
    rm = RewardModel(lm)
    with torch.no_grad():
        for layer in lm.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        rm.score_head.weight.normal_(0, 1 / 8)  # scores spread with a std of about 1 over the tokens
        scores = rm.score_head(lm.norm(lm.embed_tokens.weight)).squeeze(-1)
    save_checkpoint(root / "checkpoints", 0, rm, None, {"stage": "reward", "tokenizer_fingerprint": tok.fingerprint,
                                                        "head": rm.head_record()})
    return root, scores


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_cli_rl_raises_the_expected_reward(base, tok, tmp_path, algorithm):
    """A one-token reply scored by a reward model that prefers some tokens: a bandit a tiny policy
    learns in a few steps. The policy's exact expected reward (its next-token distribution after the
    prompt, weighted by the scores) must rise by a clear margin on prompts it did not train on; a
    run whose advantages had the wrong sign, or that did not step, lowers or keeps it."""
    from lmforge.chat import render_messages

    rm, scores = last_token_reward_model(tmp_path / "rm", tok)
    out = tmp_path / algorithm
    code, _, err = run_cli(algorithm, "--checkpoint", base, "--reward-model", rm, "--task", "arithmetic",
                                "--out", out, "--max-steps", "8", "--max-new-tokens", "1", "--group-size", "8",
                                "--prompts-per-step", "2", "--lr", "1e-2", "--warmup-steps", "1", "--eval-every", "0",
                                "--eval-n", "2", "--no-progress", "--device", "cpu", "--dtype", "fp32")
    assert code == 0, err
    prompts = [render_messages(tok, [{"role": "user", "content": f"What is {a} {op} {b}?"}])
               for a, op, b in [(3, "+", 4), (12, "-", 5), (7, "*", 70), (1, "+", 1), (250, "-", 9)]]

    def expected_reward(path):
        model, _ = load_model(path)
        with torch.no_grad():
            return sum((torch.softmax(model(torch.tensor([p]))[0, -1], -1) * scores).sum().item()
                       for p in prompts) / len(prompts)

    before = expected_reward(base)
    after = expected_reward(out)  # PPO's checkpoint too is the policy's
    # Measured over seeds 1-5: +0.20 to +0.74 (the scores have a std of 1); sign-flipped advantages: -0.6.
    assert after > before + 0.12, (before, after)


def test_cli_rl_errors(base, tmp_path):
    code, _, err = run_cli("grpo", "--checkpoint", base, "--task", "nope", "--out", tmp_path / "x", "--no-progress")
    assert code == 2 and err.startswith("error:") and "unknown synthetic task" in err
    code, _, err = run_cli("grpo", "--checkpoint", base, "--out", tmp_path / "y", "--group-size", "1", "--no-progress")
    assert code == 2 and "group-size" in err


def test_gsm8k_prompts_and_answer_checking(tmp_path):
    import random

    from lmforge.posttrain.verifiable import prompt_source

    p = tmp_path / "gsm.jsonl"
    p.write_text(json.dumps({"question": "Tom has 3 apples and buys 1,200 more. How many?",
                             "answer": "3 + 1200 = <<3+1200=1203>>1203\n#### 1,203"}) + "\n")
    src = prompt_source(f"gsm8k:{p}", "train")
    q, a = src.sample(random.Random(0))
    assert q.startswith("Tom") and a == "1203"
    assert src.check("He has 1,203 apples.", a) and not src.check("He has 1204.", a)
    p.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(LmforgeError, match="gsm.jsonl: item 1 does not have the expected fields"):
        prompt_source(f"gsm8k:{p}", "train")


def test_arithmetic_difficulty_spec():
    import random
    import re

    from lmforge.posttrain.verifiable import prompt_source

    src = prompt_source("arithmetic:1:+", "train")
    rng = random.Random(0)
    for _ in range(50):
        q, a = src.sample(rng)
        x, y = map(int, re.findall(r"\d+", q))
        assert x < 10 and y < 10 and "+" in q and a == str(x + y)
    for bad in ("arithmetic:x", "arithmetic:0", "arithmetic:2:/", "letters:3"):
        with pytest.raises(LmforgeError):
            prompt_source(bad, "train")
