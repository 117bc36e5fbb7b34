"""Conversion between lmforge checkpoints and Hugging Face `transformers` model folders.

Which HF architecture an lmforge config becomes (and comes from):
  * rotary positions + RMSNorm + SwiGLU            -> LlamaForCausalLM (GQA, tied or untied head,
                                                      biases as attention_bias / mlp_bias, Llama 3.1's
                                                      "llama3" RoPE scaling)
  * the same with qkv_bias (q/k/v biases only)     -> Qwen2ForCausalLM
  * the same with qk_norm=True                      -> Qwen3ForCausalLM, whose q_norm / k_norm are
                                                      exactly ours: RMSNorm over each head's vector,
                                                      sharing rms_norm_eps, applied before RoPE; its
                                                      head_dim may differ from hidden_size / heads
  * GeGLU + sandwich norms + (1 + w) gains + scaled embeddings (+ soft-capping, a query scale, sliding
    windows on some layers)                         -> Gemma2ForCausalLM
  * learned positions + LayerNorm + GELU (tanh)     -> GPT2LMHeadModel (fused c_attn, Conv1D weights
                                                      stored transposed; missing biases written as 0)
Everything else (squared-ReLU MLPs, LayerNorm with RoPE, GQA or QK-norm in the GPT-2 shape, half of
Gemma-2's features, ...) has no exact HF counterpart and is refused with an LmforgeError that names
the feature; so is an HF config lmforge cannot compute exactly (another RoPE scaling, custom code).

Importing reads the weights lazily (one tensor at a time, `HFWeights`) and streams them into the
checkpoint in their own dtype. Biases that HF leaves out but lmforge's single `bias` switch turns on
(e.g. Llama with attention_bias but not mlp_bias) are filled with zeros, which changes nothing. The
tokenizer becomes lmforge's own when it is in lmforge's layout, else a HubTokenizer (the model's
tokenizer.json and chat template). Config files are read and written as plain JSON, so this module
needs neither `transformers` nor a network connection.

This file is long because each direction (config, weight names and layouts, tokenizer) is written
once for all five architectures, side by side, so a difference between them is visible in one place.
"""
from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from lmforge.common import LmforgeError, atomic_write_bytes, atomic_write_json, read_json
from lmforge.models.transformer import GPT, GPTConfig
from lmforge.train.checkpoint import (
    list_checkpoints,
    load_checkpoint_tokenizer,
    load_model,
    model_state_for_saving,
    resolve_checkpoint,
    save_checkpoint,
)

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "gemma2": "Gemma2ForCausalLM", "gpt2": "GPT2LMHeadModel"}
# What each Gemma-2 model has that a Llama does not (all or none: anything in between has no HF class).
GEMMA2_FEATURES = dict(mlp="geglu", norm="rms", norm_offset=1.0, sandwich_norm=True, embed_scale=True,
                       bias=False, qkv_bias=False, qk_norm=False)
# A rotary model's features other families do not have.
GEMMA2_ONLY = ("norm_offset", "sandwich_norm", "embed_scale", "attn_softcap", "logit_softcap", "window_layers")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}

# The end of a chat turn. Tools that stop only at the tokenizer's eos (many chat front ends) must
# stop there; a base model's end of document (<|bos|>, the next document's start) is the second
# entry of generation_config's eos list, so `generate` stops at either.
EOS_TOKEN = "<|assistant_end|>"

# The split regex of `tokenizers`' ByteLevel pre-tokenizer with use_regex=True (GPT-2's pattern).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

EXPORT_FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json")


@dataclass
class HFConversion:
    """What export_hf / import_hf wrote."""
    path: Path  # the HF folder (export) or the checkpoint folder step_000000 (import)
    architecture: str  # HF class name, e.g. "Qwen3ForCausalLM"
    config: GPTConfig
    tokenizer: bool  # whether a tokenizer was written alongside the weights
    note: str = ""  # why not, when tokenizer is False


# ----------------------------------------------------------------------------- config mapping


def hf_family(cfg: GPTConfig) -> str:
    """The HF architecture ("llama", "qwen3" or "gpt2") that computes exactly what `cfg` computes.
    Raises LmforgeError naming what has no HF equivalent."""
    if cfg.n_experts:
        wanted = dict(pos="rope", norm="rms", mlp="swiglu", qk_norm=True, moe_gate="softmax", moe_shared=0,
                      moe_capacity=None, bias=False, qkv_bias=False, attn_scale=None)
        wrong = [f"{k}={getattr(cfg, k)!r}" for k, want in wanted.items() if getattr(cfg, k) != want]
        wrong += [k for k in GEMMA2_ONLY if getattr(cfg, k)]
        if wrong:
            raise LmforgeError("cannot export to Hugging Face: a mixture of experts maps onto Qwen3-MoE, which "
                               "needs RoPE, RMSNorm, SwiGLU experts, QK-norm, a softmax router, no shared experts "
                               f"and no capacity limit; this model has {', '.join(wrong)}")
        return "qwen3_moe"
    if cfg.pos == "rope":
        if cfg.mlp == "geglu" or any(getattr(cfg, k) for k in GEMMA2_ONLY):
            wrong = [f"{k}={getattr(cfg, k)!r}" for k, want in GEMMA2_FEATURES.items() if getattr(cfg, k) != want]
            if wrong:
                needs = ", ".join(f"{k}={v!r}" for k, v in GEMMA2_FEATURES.items())
                raise LmforgeError(f"cannot export to Hugging Face: a model with Gemma-2's features maps onto "
                                   f"Gemma-2, which also needs {needs}; this model has {', '.join(wrong)}")
            return "gemma2"
        wrong = [f"{k}={getattr(cfg, k)!r}" for k, want in (("norm", "rms"), ("mlp", "swiglu"))
                 if getattr(cfg, k) != want]
        if wrong:
            raise LmforgeError(f"cannot export to Hugging Face: a rotary-position model maps onto Llama/Qwen, "
                               f"which need norm='rms' and mlp='swiglu'; this model has {', '.join(wrong)}")
        if cfg.attn_scale is not None:
            raise LmforgeError("cannot export to Hugging Face: Llama and Qwen scale attention by 1/sqrt(head size), "
                               f"this model by {cfg.attn_scale}")
        if cfg.qkv_bias and not cfg.bias:
            if cfg.qk_norm:
                raise LmforgeError("cannot export to Hugging Face: query/key/value biases with QK-norm "
                                   "(Qwen2 has the biases, Qwen3 the norm)")
            return "qwen2"
        return "qwen3" if cfg.qk_norm else "llama"
    wrong = [f"{k}={getattr(cfg, k)!r}" for k, want in (("norm", "layer"), ("mlp", "gelu"))
             if getattr(cfg, k) != want]
    if cfg.qk_norm:
        wrong.append("qk_norm=True (GPT-2 has no QK-norm)")
    if cfg.qkv_bias and not cfg.bias:
        wrong.append("qkv_bias=True without bias (GPT-2 has biases everywhere)")
    if cfg.attn_softcap or cfg.logit_softcap or cfg.window_layers or cfg.attn_scale is not None:
        wrong.append("Gemma-2's attention options (soft-capping, sliding windows, a scale)")
    if cfg.kv_heads != cfg.n_head:
        wrong.append(f"n_kv_head={cfg.kv_heads} (GPT-2 has no grouped-query attention)")
    if wrong:
        raise LmforgeError(f"cannot export to Hugging Face: a learned-position model maps onto GPT-2, which "
                           f"needs norm='layer', mlp='gelu', one KV head per query head and no QK-norm; "
                           f"this model has {', '.join(wrong)}")
    return "gpt2"


def hf_config(cfg: GPTConfig, family: str, token_ids: dict, dtype: str = "float32") -> dict:
    """config.json for `family`. Written by hand (transformers is only a test dependency); keys
    are the ones both transformers 4.x and 5.x read."""
    common = {"architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": cfg.vocab_size,
              "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
              "use_cache": True, "torch_dtype": dtype, **token_ids}
    if family == "gpt2":
        return {**common, "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
                "n_head": cfg.n_head, "n_inner": cfg.hidden_dim, "activation_function": "gelu_new",
                "layer_norm_epsilon": cfg.norm_eps, "scale_attn_weights": True,
                # lmforge drops out exactly where GPT-2 does: embeddings, residual branches, attention
                "embd_pdrop": cfg.dropout, "resid_pdrop": cfg.dropout,
                "attn_pdrop": cfg.dropout if cfg.attn_dropout is None else cfg.attn_dropout}
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_context)
    d = {**common, "hidden_size": cfg.n_embd, "intermediate_size": cfg.hidden_dim,
         "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
         "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
         "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
         # 4.x reads rope_theta and rope_scaling, 5.x rope_parameters
         "rope_theta": cfg.rope_theta, "rope_parameters": rope,
         "rope_scaling": rope if cfg.rope_scaling else None,
         "attention_bias": cfg.bias, "attention_dropout": 0.0}
    if family == "llama":
        d["mlp_bias"] = cfg.bias
    elif family == "gemma2":
        scalar = cfg.head_dim if cfg.attn_scale is None else cfg.attn_scale ** -2
        d.update(hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                 query_pre_attn_scalar=round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar,
                 attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.logit_softcap,
                 sliding_window=cfg.sliding_window,
                 layer_types=["sliding_attention" if i in cfg.window_layers else "full_attention"
                              for i in range(cfg.n_layer)])
    else:
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    if family == "qwen3_moe":
        # every layer sparse (decoder_sparse_step 1, no mlp_only_layers); 4.x reads num_experts, 5.x both
        d.update(num_experts=cfg.n_experts, num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.moe_top_k,
                 moe_intermediate_size=cfg.expert_hidden, norm_topk_prob=cfg.moe_norm_topk, decoder_sparse_step=1,
                 mlp_only_layers=[], router_aux_loss_coef=cfg.moe_aux_coef, output_router_logits=False)
    return d


def gpt_config_from_hf(hf: dict) -> tuple[str, GPTConfig]:
    """(family, GPTConfig) for an HF config.json dict; LmforgeError for anything lmforge cannot
    reproduce exactly."""
    family = hf.get("model_type")
    if family not in ARCHITECTURES:
        by_class = {v: k for k, v in ARCHITECTURES.items()}
        family = next((by_class[a] for a in hf.get("architectures") or [] if a in by_class), None)
    if family is None:
        found = hf.get("model_type") or hf.get("architectures")
        raise LmforgeError(f"cannot import Hugging Face model type {found!r}: lmforge imports "
                           f"{', '.join(ARCHITECTURES)} ({', '.join(ARCHITECTURES.values())})")

    def unsupported(feature):
        raise LmforgeError(f"cannot import this {ARCHITECTURES[family]}: {feature} is not supported by lmforge")

    if hf.get("auto_map"):
        unsupported("custom modelling code (auto_map, i.e. trust_remote_code=True)")

    if family == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        # all three are the tanh approximation of GELU, the one lmforge uses
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            unsupported(f"activation_function={act!r} (lmforge's GELU is the tanh approximation, gelu_new)")
        if not hf.get("scale_attn_weights", True):
            unsupported("scale_attn_weights=False")
        if hf.get("scale_attn_by_inverse_layer_idx"):
            unsupported("scale_attn_by_inverse_layer_idx")
        if hf.get("add_cross_attention"):
            unsupported("cross-attention")
        n_embd = hf.get("n_embd", 768)
        fields = dict(vocab_size=hf.get("vocab_size", 50257), block_size=hf.get("n_positions", 1024),
                      n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=n_embd,
                      mlp="gelu", mlp_hidden=hf.get("n_inner") or 4 * n_embd, norm="layer", pos="learned",
                      tie_embeddings=hf.get("tie_word_embeddings", True), bias=True,
                      norm_eps=hf.get("layer_norm_epsilon", 1e-5))
    else:
        fields = _rotary_fields(hf, family, unsupported)
    # Dropout is a training choice rather than part of the model: imported models start without it.
    fields["init_std"] = hf.get("initializer_range", 0.02)
    return family, GPTConfig(**fields)


def _rotary_fields(hf: dict, family: str, unsupported) -> dict:
    """GPTConfig fields of a Llama, Qwen2/3 or Gemma-2 config.json."""
    gemma = family == "gemma2"
    act = hf.get("hidden_activation") or hf.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
    want_act = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast") if gemma else ("silu",)
    if act not in want_act:
        unsupported(f"hidden_act={act!r} (lmforge's gated MLP is {'GeGLU (tanh GELU)' if gemma else 'SwiGLU'})")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = {}
    if rope_type == "llama3":
        scaling = dict(rope_scaling="llama3", rope_factor=float(rope["factor"]),
                       rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                       rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                       rope_original_context=int(rope.get("original_max_position_embeddings", 8192)))
    elif rope_type != "default":
        unsupported(f"RoPE scaling (rope_type={rope_type!r}; lmforge has 'default' and 'llama3')")
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        unsupported("partial rotary embeddings")
    n_layer = hf.get("num_hidden_layers", 32)
    layer_types = hf.get("layer_types")
    if gemma and not layer_types:  # Gemma-2 alternates: sliding window on even layers, full on odd ones
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layer)]
    layer_types = layer_types or []
    if set(layer_types) - {"full_attention", "sliding_attention"}:
        unsupported(f"layer types {sorted(set(layer_types) - {'full_attention', 'sliding_attention'})}")
    windowed = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
    if not gemma and (hf.get("use_sliding_window") or windowed):
        unsupported("sliding-window attention")
    n_embd, n_head = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    head_dim = hf.get("head_dim") or n_embd // n_head
    fields = dict(vocab_size=hf.get("vocab_size", 32000), block_size=hf.get("max_position_embeddings", 2048),
                  n_layer=n_layer, n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=n_embd,
                  head_size=None if head_dim * n_head == n_embd else head_dim,
                  mlp_hidden=hf.get("intermediate_size", 11008), norm="rms", pos="rope",
                  rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), **scaling,
                  qk_norm=family in ("qwen3", "qwen3_moe"), norm_eps=hf.get("rms_norm_eps", 1e-6))
    if family == "qwen3_moe":
        if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
            unsupported("dense layers among the sparse ones (mlp_only_layers / decoder_sparse_step)")
        n_experts = hf.get("num_experts") or hf.get("num_local_experts") or 128
        fields.update(n_experts=n_experts, moe_top_k=hf.get("num_experts_per_tok", 8),
                      moe_hidden=hf.get("moe_intermediate_size", 768), moe_norm_topk=bool(hf.get("norm_topk_prob")),
                      moe_aux_coef=hf.get("router_aux_loss_coef", 0.001))
    if gemma:
        if hf.get("attention_bias"):
            unsupported("attention_bias=True")
        scalar = hf.get("query_pre_attn_scalar", 256)
        fields.update(GEMMA2_FEATURES, tie_embeddings=hf.get("tie_word_embeddings", True),
                      attn_scale=None if scalar == head_dim else scalar ** -0.5,
                      attn_softcap=hf.get("attn_logit_softcapping"), logit_softcap=hf.get("final_logit_softcapping"),
                      sliding_window=hf.get("sliding_window", 4096) if windowed else None, window_layers=windowed)
    elif family == "qwen2":  # biases on q, k and v, nowhere else
        fields.update(mlp="swiglu", tie_embeddings=hf.get("tie_word_embeddings", False), qkv_bias=True)
    else:
        # lmforge has one switch for all biases; the ones HF leaves out are imported as zeros
        fields.update(mlp="swiglu", tie_embeddings=hf.get("tie_word_embeddings", False),
                      bias=bool(hf.get("attention_bias") or hf.get("mlp_bias")))
    return fields


# ----------------------------------------------------------------------------- weight mapping

# GPT-2 names (under `transformer.`) of lmforge's per-layer modules; c_attn is q, k, v fused.
GPT2_LAYER = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "self_attn.o_proj": "attn.c_proj",
              "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
# Causal-mask buffers that old GPT-2 checkpoints store next to the weights.
GPT2_MASK_BUFFER = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")
# Gemma-2's four norms per layer under lmforge's names. Llama's "post_attention_layernorm" is the norm in
# front of the MLP, Gemma-2's the one after attention.
GEMMA2_NORMS = {"input_layernorm": "input_layernorm", "post_attention_layernorm": "attn_out_norm",
                "pre_feedforward_layernorm": "post_attention_layernorm", "post_feedforward_layernorm": "mlp_out_norm"}
LAYER_MODULE = re.compile(r"^layers\.(\d+)\.(\w+)\.(weight|bias)$")


# Qwen3-MoE's router is `mlp.gate` (not to be confused with an MLP's gate_proj).
MOE_ROUTER = (".mlp.gate.weight", ".mlp.router.weight")


def _rename_layer_module(name: str, table: dict[str, str]) -> str:
    m = LAYER_MODULE.match(name)
    if m and m.group(2) in table:
        return f"layers.{m.group(1)}.{table[m.group(2)]}.{m.group(3)}"
    return name


def to_hf_tensors(model: GPT, family: str) -> dict[str, torch.Tensor]:
    """The model's weights under the HF architecture's names and layouts."""
    cfg = model.config
    params = {n: p.detach() for n, p in model.named_parameters()}  # a tied lm_head appears once, as embed_tokens
    if family != "gpt2":
        if family == "qwen3" and cfg.bias:
            # Qwen3 has attention biases but none in the MLP: fine if ours are all zero (e.g. imported).
            mlp_biases = [n for n in params if ".mlp." in n and n.endswith(".bias")]
            if any(params[n].any() for n in mlp_biases):
                raise LmforgeError("cannot export to Hugging Face: a QK-norm model maps onto Qwen3, which has "
                                   "no MLP biases, and this model's MLP biases are not zero")
            for n in mlp_biases:
                del params[n]
        if family == "gemma2":
            ours_to_hf = {v: k for k, v in GEMMA2_NORMS.items()}
            params = {_rename_layer_module(n, ours_to_hf): p for n, p in params.items()}
        if family == "qwen3_moe":
            if any(m.expert_bias.any() for m in model.moe_layers()):
                raise LmforgeError("cannot export to Hugging Face: this mixture of experts was balanced with "
                                   "routing biases (moe_balance='bias'), which Qwen3-MoE's router does not have")
            params = {n.replace(MOE_ROUTER[1], MOE_ROUTER[0]): p for n, p in params.items()}
        # lmforge uses Llama's names, without the `model.` prefix of the decoder stack.
        return {n if n == "lm_head.weight" else f"model.{n}": p for n, p in params.items()}

    def bias(name, like):
        # HF's GPT-2 always has biases; a bias-free lmforge model is the same with zeros.
        return params.pop(name) if name in params else torch.zeros(like.shape[0])

    out = {"transformer.wte.weight": params.pop("embed_tokens.weight"),
           "transformer.wpe.weight": params.pop("wpe.weight")}
    for i in range(cfg.n_layer):
        ours, theirs = f"layers.{i}.", f"transformer.h.{i}."
        for name, hf_name in GPT2_LAYER.items():
            w = params.pop(f"{ours}{name}.weight")
            # Conv1D stores (in, out), the transpose of nn.Linear; norm gains are 1-D and stay as they are
            out[f"{theirs}{hf_name}.weight"] = w.t() if w.dim() == 2 else w
            out[f"{theirs}{hf_name}.bias"] = bias(f"{ours}{name}.bias", w)
        qkv = [f"{ours}self_attn.{x}_proj" for x in "qkv"]
        ws = [params.pop(f"{n}.weight") for n in qkv]
        out[f"{theirs}attn.c_attn.weight"] = torch.cat(ws).t()
        out[f"{theirs}attn.c_attn.bias"] = torch.cat([bias(f"{n}.bias", w) for n, w in zip(qkv, ws)])
    out["transformer.ln_f.weight"] = w = params.pop("norm.weight")
    out["transformer.ln_f.bias"] = bias("norm.bias", w)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = params.pop("lm_head.weight")
    if params:  # a parameter a newer model.py added that this mapping does not know
        raise LmforgeError(f"cannot export parameters {sorted(params)[:5]} to GPT-2")
    return out


def _transposed(t: torch.Tensor) -> torch.Tensor:
    return t.t() if t.dim() == 2 else t  # GPT-2's Conv1D weights are (in, out); its norm gains are 1-D


def import_plan(names: list[str], family: str, cfg: GPTConfig) -> dict[str, tuple[str, object]]:
    """How to make each lmforge tensor from the HF ones: {our name: (HF name, transform or None)}.
    A plan, not tensors, so that import reads one tensor at a time (see HFWeights)."""
    plan: dict[str, tuple[str, object]] = {}
    if family != "gpt2":
        for name in names:
            if name.endswith("rotary_emb.inv_freq"):  # old checkpoints saved the RoPE table
                continue
            ours = name.removeprefix("model.")
            if family == "gemma2":
                ours = _rename_layer_module(ours, GEMMA2_NORMS)
            plan[ours.replace(*MOE_ROUTER) if family == "qwen3_moe" else ours] = (name, None)
    else:
        prefix = "transformer." if any(n.startswith("transformer.") for n in names) else ""
        for name in names:
            if not GPT2_MASK_BUFFER.search(name) and not name.startswith(prefix + "h."):
                ours = {"wte.weight": "embed_tokens.weight", "wpe.weight": "wpe.weight", "ln_f.weight": "norm.weight",
                        "ln_f.bias": "norm.bias"}.get(name.removeprefix(prefix), name.removeprefix(prefix))
                plan[ours] = (name, None)
        for i in range(cfg.n_layer):
            ours, theirs = f"layers.{i}.", f"{prefix}h.{i}."
            for name, hf_name in GPT2_LAYER.items():
                plan[f"{ours}{name}.weight"] = (f"{theirs}{hf_name}.weight", _transposed)
                plan[f"{ours}{name}.bias"] = (f"{theirs}{hf_name}.bias", None)
            for j, x in enumerate("qkv"):
                def part(t, j=j):  # the j-th third of the fused projection, as an nn.Linear weight or bias
                    return (t.t() if t.dim() == 2 else t).split(cfg.n_embd)[j]
                plan[f"{ours}self_attn.{x}_proj.weight"] = (f"{theirs}attn.c_attn.weight", part)
                plan[f"{ours}self_attn.{x}_proj.bias"] = (f"{theirs}attn.c_attn.bias", part)
    if cfg.tie_embeddings:
        plan.pop("lm_head.weight", None)  # some tied checkpoints store the head anyway
    return plan


class HFWeights:
    """The tensors of an HF folder, read one at a time: model.safetensors, pytorch_model.bin, or their
    sharded forms with an index. Nothing is loaded until `get`, so a model larger than the free memory
    can be converted tensor by tensor."""

    def __init__(self, hf_dir: Path):
        self.files: dict[str, Path] = {}  # tensor name -> file
        self._open: dict[Path, object] = {}
        for name, index in (("model.safetensors", "model.safetensors.index.json"),
                            ("pytorch_model.bin", "pytorch_model.bin.index.json")):
            if (hf_dir / name).is_file():
                files = [hf_dir / name]
            elif (hf_dir / index).is_file():
                weight_map = read_json(hf_dir / index, "weight index").get("weight_map", {})
                files = [hf_dir / f for f in sorted(set(weight_map.values()))]
            else:
                continue
            for f in files:
                for key in self._handle(f).keys():
                    self.files[key] = f
            return
        raise LmforgeError(f"no weights in {hf_dir} (expected model.safetensors or pytorch_model.bin)")

    def _handle(self, f: Path):
        if f not in self._open:
            try:
                if f.suffix == ".safetensors":
                    from safetensors import safe_open

                    self._open[f] = safe_open(str(f), framework="pt")
                else:  # weights_only: a pickle from the internet must not run code; mmap: lazy pages
                    try:
                        self._open[f] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                    except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
                        self._open[f] = torch.load(f, map_location="cpu", weights_only=True)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise LmforgeError(f"cannot read {f}: {e}") from None
        return self._open[f]

    def names(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> torch.Tensor:
        h = self._handle(self.files[name])
        try:
            return h.get_tensor(name) if hasattr(h, "get_tensor") else h[name]
        except (SafetensorError, OSError, RuntimeError) as e:
            raise LmforgeError(f"cannot read {name} from {self.files[name]}: {e}") from None

    def dtype_of(self, name: str) -> torch.dtype:
        """A tensor's dtype, without reading it."""
        h = self._handle(self.files[name])
        if hasattr(h, "get_slice"):
            code = h.get_slice(name).get_dtype()
            if code not in SAFETENSORS_DTYPES:
                raise LmforgeError(f"{name} in {self.files[name]} has dtype {code}, which lmforge does not import")
            return SAFETENSORS_DTYPES[code]
        return h[name].dtype

    def dtype(self) -> torch.dtype:
        """The floating dtype the weights are stored in (the first floating tensor's)."""
        for name in self.files:
            if self.dtype_of(name).is_floating_point:
                return self.dtype_of(name)
        return torch.float32


def converted_tensors(weights: HFWeights, family: str, cfg: GPTConfig, source: Path):
    """(spec, produce): the lmforge checkpoint's tensor names, shapes and dtypes in writing order, and
    a function making one of them from the HF weights. Checked against the model's own shapes first,
    so a config that does not fit its weights is one error before anything is written."""
    with torch.device("meta"):  # shapes only
        expected = model_state_for_saving(GPT(cfg))
    plan = import_plan(weights.names(), family, cfg)
    dtype = weights.dtype()
    # zero-filled if absent: biases lmforge's single switch adds, an MoE's routing biases (HF has none)
    missing = [n for n in expected if n not in plan and not n.endswith((".bias", ".expert_bias"))]
    unexpected = [n for n in plan if n not in expected]
    gpt2_missing = [n for n, (hf_name, _) in plan.items() if hf_name not in weights.files]
    if missing or unexpected or gpt2_missing:
        raise LmforgeError(f"weights in {source} do not fit their config.json: missing {(missing + gpt2_missing)[:5]}, "
                           f"unexpected {[plan[n][0] for n in unexpected][:5]}")

    def produce(name: str) -> torch.Tensor:
        if name not in plan:  # a bias HF leaves out (it adds nothing); routing biases start at 0
            return torch.zeros(expected[name].shape, dtype=dtype)
        hf_name, transform = plan[name]
        t = weights.get(hf_name)
        t = (transform(t) if transform else t).contiguous()
        if t.shape != expected[name].shape:
            raise LmforgeError(f"weights in {source} do not fit their config.json: {hf_name} has shape "
                               f"{tuple(t.shape)}, the model needs {tuple(expected[name].shape)}")
        return t

    # in the weights' dtype, zero-filled ones too: a bf16 model's checkpoint is all bf16 and loads as bf16
    spec = [(n, tuple(p.shape), weights.dtype_of(plan[n][0]) if n in plan else dtype) for n, p in expected.items()]
    return spec, produce


# ----------------------------------------------------------------------------- tokenizer


def _special_ids(tok) -> dict:
    if hasattr(tok, "hf_files"):  # a HubTokenizer: the model's own special tokens
        def id_of(text):
            return None if text is None else tok.special_id(text)
        return {"bos_token_id": id_of(tok.bos_token), "eos_token_id": sorted(tok.stop_ids),
                "pad_token_id": id_of(tok.pad_token)}
    return {"bos_token_id": tok.bos_id, "eos_token_id": [tok.special_id(EOS_TOKEN), tok.bos_id],
            "pad_token_id": tok.pad_id}


def hf_tokenizer_files(tok, cfg: GPTConfig) -> dict[str, bytes]:
    """tokenizer.json and tokenizer_config.json for AutoTokenizer."""
    from tokenizers import processors

    from lmforge.chat import CHAT_TEMPLATE_JINJA

    hf = tok.to_hf()
    bos = "<|bos|>"
    # lmforge conditions every text on a leading <|bos|> (training documents, sampling, scoring), so
    # `tokenizer(text)` adds it, as Llama's does; add_special_tokens=False gives lmforge's encode().
    # apply_chat_template tokenizes without it: the template writes its own <|bos|>.
    hf.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                      special_tokens=[(bos, tok.bos_id)])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": EOS_TOKEN,
              "pad_token": "<|pad|>", "add_bos_token": True, "add_eos_token": False,
              "model_max_length": cfg.block_size, "clean_up_tokenization_spaces": False,
              "chat_template": CHAT_TEMPLATE_JINJA}
    return {"tokenizer.json": hf.to_str(pretty=True).encode(),
            "tokenizer_config.json": (json.dumps(config, indent=2) + "\n").encode()}


def tokenizer_from_hf(hf_dir: Path, vocab_size: int):
    """(lmforge Tokenizer, "") if the folder's tokenizer.json is byte-level BPE with lmforge's id layout
    (bytes 0..255 in byte order, merges in rank order, then exactly lmforge's special tokens), as
    export_hf writes it; otherwise (None, why not). Other layouts would need the embedding rows
    permuted and different special tokens, so they are not converted."""
    from lmforge.tokenizer import N_BYTES, SPECIAL_TOKENS, Tokenizer, _from_hf_str, _merges_from_hf

    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        return None, f"no tokenizer.json in {hf_dir}"
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"{path} is not valid JSON: {e}"
    model, pre = obj.get("model") or {}, obj.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or obj.get("normalizer") or model.get("dropout") \
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None, "the tokenizer is not plain byte-level BPE"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        pattern = GPT2_PATTERN
    elif kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) \
            and "Regex" in steps[0].get("pattern", {}) and steps[0].get("behavior") == "Isolated" \
            and not steps[0].get("invert"):
        pattern = steps[0]["pattern"]["Regex"]
    else:
        return None, f"its pre-tokenizer ({'+'.join(map(str, kinds))}) is not a regex split + byte-level one"
    if steps[-1].get("add_prefix_space"):
        return None, "its pre-tokenizer adds a prefix space"
    merges, dropped = _merges_from_hf(model.get("merges", []))
    if dropped:
        return None, f"{dropped} of its merges cannot be reproduced by lmforge's BPE"
    try:
        tok = Tokenizer(merges, pattern)
        vocab = {_from_hf_str(s): i for s, i in model.get("vocab", {}).items()}
    except Exception as e:  # a pattern tiktoken rejects, a non-byte-level vocabulary string
        return None, f"it cannot be rebuilt: {e}"
    ours = {tok.token_bytes(i): i for i in range(N_BYTES + len(merges))}
    if vocab != ours:
        return None, ("its ids are not lmforge's layout (the 256 bytes in byte order, then the merges in "
                      "the order they were learned)")
    specials = {t.get("content"): t.get("id") for t in obj.get("added_tokens", [])}
    if specials != tok.special_tokens:
        return None, f"its special tokens are not lmforge's ({', '.join(SPECIAL_TOKENS)})"
    if tok.vocab_size > vocab_size:
        return None, f"it has {tok.vocab_size} ids but the model only {vocab_size}"
    return tok, ""


# ----------------------------------------------------------------------------- export / import


def load_for_export(checkpoint_path: str | Path, quantized_hint: str):
    """(checkpoint folder, model) of a checkpoint to export; a quantized one is refused (exporting
    would either dequantize or round twice), with `quantized_hint` saying what to do instead."""
    ckpt = resolve_checkpoint(checkpoint_path)
    model, state = load_model(ckpt)
    if state.get("quantization"):
        raise LmforgeError(f"{ckpt} is quantized ({state['quantization']['bits']}-bit); {quantized_hint}")
    return ckpt, model


def export_hf(checkpoint_path: str | Path, out_dir: str | Path, dtype: str | None = None) -> HFConversion:
    """Write an lmforge checkpoint as a folder that transformers' AutoModelForCausalLM and AutoTokenizer
    load offline: model.safetensors, config.json, generation_config.json and, if the checkpoint has
    a tokenizer, tokenizer.json + tokenizer_config.json (with the chat template).
    `checkpoint_path` is anything resolve_checkpoint accepts; dtype is float32, bfloat16 or float16
    (None: the checkpoint's own)."""
    if dtype is not None and dtype not in DTYPES:
        raise LmforgeError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    ckpt, model = load_for_export(checkpoint_path, "export the full-precision checkpoint instead")
    cfg = model.config
    family = hf_family(cfg)
    if dtype is None:
        dtype = {v: k for k, v in DTYPES.items()}.get(next(model.parameters()).dtype, "float32")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"{out} exists and is not a directory")
    others = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES) if out.is_dir() else []
    if others:  # files from something else could make transformers load the wrong weights
        raise LmforgeError(f"{out} already holds other files ({', '.join(others[:3])}); export into an "
                           "empty or new directory")
    out.mkdir(parents=True, exist_ok=True)

    tok, note = None, ""
    if (ckpt / "tokenizer.json").is_file():
        tok = load_checkpoint_tokenizer(ckpt)
        if tok.vocab_size > cfg.vocab_size:
            raise LmforgeError(f"the tokenizer in {ckpt} has {tok.vocab_size} ids but the model only {cfg.vocab_size}")
    else:
        note = f"checkpoint {ckpt} has no tokenizer.json, so only the model was exported"

    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in to_hf_tensors(model, family).items()}
    with tempfile.NamedTemporaryFile(dir=out, prefix=".model.", suffix=".tmp", delete=False) as f:
        tmp = Path(f.name)
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})  # transformers expects format=pt
        tmp.replace(out / "model.safetensors")
    finally:
        tmp.unlink(missing_ok=True)
    ids = _special_ids(tok) if tok else {}
    atomic_write_json(out / "config.json", hf_config(cfg, family, ids, dtype))
    atomic_write_json(out / "generation_config.json", ids)
    if tok:
        tok_files = tok.hf_files() if hasattr(tok, "hf_files") else hf_tokenizer_files(tok, cfg)
        for name, data in tok_files.items():
            atomic_write_bytes(out / name, data)
    else:
        for name in ("tokenizer.json", "tokenizer_config.json"):  # stale ones from an earlier export
            (out / name).unlink(missing_ok=True)
    return HFConversion(out, ARCHITECTURES[family], cfg, tok is not None, note)


def import_hf(hf_dir: str | Path, out_checkpoint_dir: str | Path) -> HFConversion:
    """Convert a local HF Llama, Qwen2/3, Gemma-2 or GPT-2 folder (config.json + safetensors or
    pytorch_model.bin, sharded or not) into an lmforge checkpoint `out_checkpoint_dir/step_000000/`.
    Tensors are read and written one at a time and keep their dtype (bf16 stays bf16), so the model
    never has to fit in memory twice. The tokenizer comes along: as lmforge's own when the folder's is
    in lmforge's layout (an lmforge export), else as a HubTokenizer (the model's tokenizer.json, special
    tokens and chat template). Without a usable tokenizer the checkpoint holds the weights and `note`
    says why."""
    from lmforge.hub_tokenizer import HubTokenizer

    hf_dir, out = Path(hf_dir), Path(out_checkpoint_dir)
    if not hf_dir.is_dir():
        raise LmforgeError(f"Hugging Face model folder not found: {hf_dir}")
    family, cfg = gpt_config_from_hf(read_json(hf_dir / "config.json", "Hugging Face config"))
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"{out} exists and is not a directory")
    if list_checkpoints(out):
        raise LmforgeError(f"{out} already holds checkpoints; import into an empty or new directory")
    spec, produce = converted_tensors(HFWeights(hf_dir), family, cfg, hf_dir)

    tok, why = tokenizer_from_hf(hf_dir, cfg.vocab_size)
    if tok is None and (hf_dir / "tokenizer.json").is_file():
        try:
            tok = HubTokenizer.from_hf_dir(hf_dir)
        except LmforgeError as e:
            why = str(e)
        else:
            if tok.vocab_size > cfg.vocab_size:
                tok, why = None, f"it has {tok.vocab_size} ids but the model only {cfg.vocab_size}"
    state = {"imported_from": {"path": str(hf_dir.resolve()), "architecture": ARCHITECTURES[family]}}
    files = {}
    if tok is not None:
        state["tokenizer_fingerprint"] = tok.fingerprint
        with tempfile.TemporaryDirectory() as tmp:
            files["tokenizer.json"] = tok.save(Path(tmp) / "tokenizer.json").read_bytes()
    with torch.device("meta"):  # the family and config; the weights are streamed
        model = GPT(cfg)
    ckpt = save_checkpoint(out, 0, model, state=state, files=files, weights=(spec, produce))
    note = "" if tok is not None else f"tokenizer not converted ({why}): the checkpoint holds the weights only"
    return HFConversion(ckpt, ARCHITECTURES[family], cfg, tok is not None, note)
