"""Conversion between lmforge checkpoints and Hugging Face `transformers` model folders.

Which HF architecture an lmforge config becomes:
  * rotary positions + RMSNorm + SwiGLU            -> LlamaForCausalLM (GQA, tied or untied head,
                                                      biases as attention_bias / mlp_bias)
  * the same with qk_norm=True                      -> Qwen3ForCausalLM, whose q_norm / k_norm are
                                                      exactly ours: RMSNorm over each head's vector,
                                                      sharing rms_norm_eps, applied before RoPE
  * learned positions + LayerNorm + GELU (tanh)     -> GPT2LMHeadModel (fused c_attn, Conv1D weights
                                                      stored transposed; missing biases written as 0)
Everything else (squared-ReLU MLPs, LayerNorm with RoPE, GQA or QK-norm in the GPT-2 shape, ...)
has no exact HF counterpart and is refused with an LmforgeError that names the feature.

Importing goes the other way for llama, qwen3 and gpt2 folders. Biases that HF leaves out but
lmforge's single `bias` switch turns on (e.g. Llama with attention_bias but not mlp_bias) are filled
with zeros, which changes nothing. Config files are read and written as plain JSON, so this module
needs neither `transformers` nor a network connection.
"""
from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.common import LmforgeError, atomic_write_bytes, atomic_write_json, read_json
from lmforge.models.transformer import GPT, GPTConfig
from lmforge.train.checkpoint import (
    list_checkpoints,
    load_checkpoint_tokenizer,
    load_model,
    resolve_checkpoint,
    save_checkpoint,
)

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

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
    if cfg.pos == "rope":
        wrong = [f"{k}={getattr(cfg, k)!r}" for k, want in (("norm", "rms"), ("mlp", "swiglu"))
                 if getattr(cfg, k) != want]
        if wrong:
            raise LmforgeError(f"cannot export to Hugging Face: a rotary-position model maps onto Llama/Qwen3, "
                               f"which need norm='rms' and mlp='swiglu'; this model has {', '.join(wrong)}")
        return "qwen3" if cfg.qk_norm else "llama"
    wrong = [f"{k}={getattr(cfg, k)!r}" for k, want in (("norm", "layer"), ("mlp", "gelu"))
             if getattr(cfg, k) != want]
    if cfg.qk_norm:
        wrong.append("qk_norm=True (GPT-2 has no QK-norm)")
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
    d = {**common, "hidden_size": cfg.n_embd, "intermediate_size": cfg.hidden_dim,
         "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
         "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
         "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
         # 4.x reads rope_theta, 5.x rope_parameters
         "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
         "attention_bias": cfg.bias, "attention_dropout": 0.0}
    if family == "llama":
        d["mlp_bias"] = cfg.bias
    else:
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
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
        if hf.get("hidden_act", "silu") != "silu":
            unsupported(f"hidden_act={hf['hidden_act']!r} (lmforge's gated MLP is SwiGLU)")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            unsupported(f"RoPE scaling (rope_type={rope_type!r})")
        if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
            unsupported("partial rotary embeddings")
        if hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types") or []):
            unsupported("sliding-window attention")
        n_embd, n_head = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
        head_dim = hf.get("head_dim") or n_embd // n_head
        if head_dim * n_head != n_embd:
            unsupported(f"head_dim={head_dim} with hidden_size={n_embd} and {n_head} heads "
                        f"(lmforge's head size is hidden_size / heads)")
        fields = dict(vocab_size=hf.get("vocab_size", 32000), block_size=hf.get("max_position_embeddings", 2048),
                      n_layer=hf.get("num_hidden_layers", 32), n_head=n_head,
                      n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=n_embd,
                      mlp="swiglu", mlp_hidden=hf.get("intermediate_size", 11008), norm="rms", pos="rope",
                      rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                      qk_norm=family == "qwen3", tie_embeddings=hf.get("tie_word_embeddings", False),
                      # lmforge has one switch for all biases; the ones HF leaves out are imported as zeros
                      bias=bool(hf.get("attention_bias") or hf.get("mlp_bias")),
                      norm_eps=hf.get("rms_norm_eps", 1e-6))
    # Dropout is a training choice rather than part of the model: imported models start without it.
    fields["init_std"] = hf.get("initializer_range", 0.02)
    return family, GPTConfig(**fields)


# ----------------------------------------------------------------------------- weight mapping

# GPT-2 names (under `transformer.`) of lmforge's per-layer modules; c_attn is q, k, v fused.
GPT2_LAYER = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "self_attn.o_proj": "attn.c_proj",
              "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
# Causal-mask buffers that old GPT-2 checkpoints store next to the weights.
GPT2_MASK_BUFFER = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")


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


def from_hf_tensors(tensors: dict[str, torch.Tensor], family: str, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """An lmforge state dict from HF weights (names, layouts; tied heads dropped)."""
    if family != "gpt2":
        sd = {name.removeprefix("model."): t for name, t in tensors.items()
              if not name.endswith("rotary_emb.inv_freq")}  # old checkpoints saved the RoPE table
    else:
        t = {name.removeprefix("transformer."): w for name, w in tensors.items()
             if not GPT2_MASK_BUFFER.search(name)}

        def take(name):
            if name not in t:
                raise LmforgeError(f"GPT-2 weights lack {name}")
            return t.pop(name)

        sd = {"embed_tokens.weight": take("wte.weight"), "wpe.weight": take("wpe.weight"),
              "norm.weight": take("ln_f.weight"), "norm.bias": take("ln_f.bias")}
        for i in range(cfg.n_layer):
            ours, theirs = f"layers.{i}.", f"h.{i}."
            for name, hf_name in GPT2_LAYER.items():
                w = take(f"{theirs}{hf_name}.weight")
                sd[f"{ours}{name}.weight"] = w.t() if w.dim() == 2 else w
                sd[f"{ours}{name}.bias"] = take(f"{theirs}{hf_name}.bias")
            split = [cfg.n_embd] * 3
            for x, w, b in zip("qkv", take(f"{theirs}attn.c_attn.weight").t().split(split),
                               take(f"{theirs}attn.c_attn.bias").split(split)):
                sd[f"{ours}self_attn.{x}_proj.weight"], sd[f"{ours}self_attn.{x}_proj.bias"] = w, b
        sd.update(t)  # lm_head.weight if untied; anything else is reported as unexpected below
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # some tied checkpoints store the head anyway
    return {k: v.contiguous() for k, v in sd.items()}


def _load_state(model: GPT, sd: dict[str, torch.Tensor], source: Path) -> None:
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name.endswith(".bias") and name not in sd:
            sd[name] = torch.zeros_like(p)  # e.g. Llama's MLP when only attention_bias is set
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise LmforgeError(f"weights in {source} do not fit their config.json: {e}") from None
    missing = [m for m in missing if m in params]  # a tied lm_head is not a separate parameter
    if missing or unexpected:
        raise LmforgeError(f"weights in {source} do not fit their config.json: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder: model.safetensors, pytorch_model.bin, or their sharded forms."""
    for name, index in (("model.safetensors", "model.safetensors.index.json"),
                        ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (hf_dir / name).is_file():
            files = [hf_dir / name]
        elif (hf_dir / index).is_file():
            weight_map = read_json(hf_dir / index, "weight index").get("weight_map", {})
            files = [hf_dir / f for f in sorted(set(weight_map.values()))]
        else:
            continue
        tensors = {}
        for f in files:
            try:
                if f.suffix == ".safetensors":
                    tensors.update(load_file(str(f)))
                else:  # weights_only: a pickle from the internet must not run code
                    tensors.update(torch.load(f, map_location="cpu", weights_only=True))
            except (SafetensorError, OSError, RuntimeError) as e:
                raise LmforgeError(f"cannot read {f}: {e}") from None
        return tensors
    raise LmforgeError(f"no weights in {hf_dir} (expected model.safetensors or pytorch_model.bin)")


# ----------------------------------------------------------------------------- tokenizer


def _special_ids(tok) -> dict:
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


def export_hf(checkpoint_path: str | Path, out_dir: str | Path, dtype: str = "float32") -> HFConversion:
    """Write an lmforge checkpoint as a folder that transformers' AutoModelForCausalLM and AutoTokenizer
    load offline: model.safetensors, config.json, generation_config.json and, if the checkpoint has
    a tokenizer, tokenizer.json + tokenizer_config.json (with the chat template).
    `checkpoint_path` is anything resolve_checkpoint accepts; dtype is float32, bfloat16 or float16."""
    if dtype not in DTYPES:
        raise LmforgeError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    ckpt = resolve_checkpoint(checkpoint_path)
    model, state = load_model(ckpt)
    if state.get("quantization"):
        raise LmforgeError(f"{ckpt} is quantized ({state['quantization']['bits']}-bit); export the "
                           "full-precision checkpoint instead")
    cfg = model.config
    family = hf_family(cfg)
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
        for name, data in hf_tokenizer_files(tok, cfg).items():
            atomic_write_bytes(out / name, data)
    else:
        for name in ("tokenizer.json", "tokenizer_config.json"):  # stale ones from an earlier export
            (out / name).unlink(missing_ok=True)
    return HFConversion(out, ARCHITECTURES[family], cfg, tok is not None, note)


def import_hf(hf_dir: str | Path, out_checkpoint_dir: str | Path) -> HFConversion:
    """Convert a local HF Llama, Qwen3 or GPT-2 folder (config.json + safetensors or pytorch_model.bin)
    into an lmforge checkpoint `out_checkpoint_dir/step_000000/`. Its tokenizer comes along if it is
    in lmforge's layout (see tokenizer_from_hf); otherwise the checkpoint holds the weights only and
    `note` says why."""
    hf_dir, out = Path(hf_dir), Path(out_checkpoint_dir)
    if not hf_dir.is_dir():
        raise LmforgeError(f"Hugging Face model folder not found: {hf_dir}")
    family, cfg = gpt_config_from_hf(read_json(hf_dir / "config.json", "Hugging Face config"))
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"{out} exists and is not a directory")
    if list_checkpoints(out):
        raise LmforgeError(f"{out} already holds checkpoints; import into an empty or new directory")
    model = GPT(cfg)
    _load_state(model, from_hf_tensors(read_hf_weights(hf_dir), family, cfg), hf_dir)

    tok, why = tokenizer_from_hf(hf_dir, cfg.vocab_size)
    state = {"imported_from": {"path": str(hf_dir.resolve()), "architecture": ARCHITECTURES[family]}}
    files = {}
    if tok is not None:
        state["tokenizer_fingerprint"] = tok.fingerprint
        with tempfile.TemporaryDirectory() as tmp:
            files["tokenizer.json"] = tok.save(Path(tmp) / "tokenizer.json").read_bytes()
    ckpt = save_checkpoint(out, 0, model, state=state, files=files)
    note = "" if tok is not None else f"tokenizer not converted ({why}): the checkpoint holds the weights only"
    return HFConversion(ckpt, ARCHITECTURES[family], cfg, tok is not None, note)
