"""LoRA adapters: exact start, frozen base, save/load, merge."""
import pytest
import torch

from lmforge.common import LmforgeError
from lmforge.models.transformer import GPT, get_config
from lmforge.posttrain.lora import (
    LoRAConfig,
    apply_lora,
    load_adapter,
    lora_modules,
    merge_lora,
    save_adapter,
    trainable_summary,
)
from lmforge.train.optim import build_optimizers


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(get_config("tiny", vocab_size=300, block_size=32)).eval()


def perturb_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


X = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(5))


def test_adapted_model_starts_equal_to_the_base():
    base = tiny_model()
    ref = base(X)
    apply_lora(base, LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj")))
    assert len(lora_modules(base)) == 3 * base.config.n_layer
    assert torch.equal(base(X), ref)


def test_only_adapters_train_and_the_count_is_r_times_in_plus_out():
    model = tiny_model()
    cfg = model.config
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")))
    kv = cfg.kv_heads * cfg.head_dim
    expected = cfg.n_layer * 4 * ((cfg.n_embd + cfg.n_embd) + (cfg.n_embd + kv))
    s = trainable_summary(model)
    assert s["trainable"] == expected and s["total"] == sum(p.numel() for p in tiny_model().parameters()) + expected
    perturb_adapters(model)
    model.train()
    model(X, X).backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    # the Trainer's optimizer builder only sees the adapters
    opts = build_optimizers(model, name="adamw", lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), muon_lr=0.02,
                            muon_momentum=0.95)
    in_opt = {id(p) for o in opts for g in o.param_groups for p in g["params"]}
    assert in_opt == {id(p) for n, p in model.named_parameters() if "lora_" in n}


def test_merged_model_equals_the_adapted_one():
    model = tiny_model()
    apply_lora(model, LoRAConfig(rank=4, alpha=16, targets=("all",)))
    perturb_adapters(model)
    adapted = model(X)
    assert not torch.allclose(adapted, tiny_model()(X), atol=1e-3)  # the adapters do change the output
    merge_lora(model)
    assert not lora_modules(model) and type(model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(model(X), adapted, atol=1e-5, rtol=1e-5)
    assert set(model.state_dict()) == set(tiny_model().state_dict())  # a plain model again


def test_saved_adapter_is_small_and_reloads_exactly(tmp_path):
    model = tiny_model()
    apply_lora(model, LoRAConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")))
    perturb_adapters(model)
    want = model(X)
    out = save_adapter(model, tmp_path / "ad")
    size = (out / "adapter.safetensors").stat().st_size
    assert size < 0.1 * sum(p.numel() * 4 for p in tiny_model().parameters())
    fresh = tiny_model()
    meta = load_adapter(fresh, out)
    assert meta["rank"] == 2 and meta["targets"] == ["q_proj", "v_proj"]
    torch.testing.assert_close(fresh(X), want, atol=0, rtol=0)


def test_adapter_for_another_model_or_bad_targets_is_refused(tmp_path):
    model = tiny_model()
    apply_lora(model, LoRAConfig(rank=2, targets=("q_proj",)))
    save_adapter(model, tmp_path / "ad")
    other = GPT(get_config("tiny", vocab_size=300, block_size=32, n_embd=32))
    with pytest.raises(LmforgeError, match="different config"):
        load_adapter(other, tmp_path / "ad")
    with pytest.raises(LmforgeError, match="match no linear layer"):
        apply_lora(tiny_model(), LoRAConfig(rank=2, targets=("qkv",)))
    with pytest.raises(LmforgeError, match="rank"):
        LoRAConfig(rank=0)
