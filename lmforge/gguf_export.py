"""lmforge checkpoints as GGUF files, the format llama.cpp (and Ollama, LM Studio, ...) loads.

The file is written with the `gguf` package, llama.cpp's own reader/writer. Which llama.cpp
architecture a config becomes follows the Hugging Face mapping (`lmforge.hf.hf_family`):
  * rotary positions + RMSNorm + SwiGLU (GQA, tied or untied head, biases,
    Llama 3.1's "llama3" RoPE scaling)                  -> `llama`
  * the same with qk_norm=True                          -> `qwen3`
  * learned positions + LayerNorm + GELU (tanh)         -> `gpt2` (fused q/k/v, missing biases as 0)
Everything else (Qwen2's lone q/k/v biases, Gemma-2, mixtures of experts, bidirectional attention,
RoPE scaling on a qwen3, ...) is refused with one LmforgeError naming the feature.

Layout facts (read from llama.cpp, not copied from its converter):
  * lmforge's RoPE rotates the two halves of each head vector ("rotate half", NEOX style). llama.cpp's
    `qwen3` uses that style; its `llama` rotates adjacent pairs (2i, 2i+1), so for `llama` the rows of
    q_proj and k_proj (and their biases) are reordered within each head: half-split pair i -> rows
    2i, 2i+1. q.k is unchanged by a permutation applied to both, so the model computes the same thing.
  * GGUF stores matrices as nn.Linear does (out, in); GPT-2's Conv1D (in, out) is transposed back.
  * 1-D tensors (norms, biases, RoPE frequency factors) and GPT-2's position table stay f32, as
    llama.cpp's converter and llama-quantize keep them; the token embedding and output head take the
    chosen type. A matrix whose rows are not a multiple of 32 cannot be q8_0/q4_0 and is written f16.

Tokenizer: lmforge's byte-level BPE as tokenizer.ggml.model "gpt2" (tokens in GPT-2's byte-to-unicode
spelling, ids unchanged, merges in rank order, specials as CONTROL, rows the model pads its vocabulary
with as UNUSED). The pre-tokenizer is "llama-bpe" (Llama 3's): its regex is cl100k's, lmforge's
SPLIT_PATTERN, up to possessive quantifiers that change no split, `\\s*[\\r\\n]+` for `\\s*[\\r\\n]`
(both end at the last newline of a whitespace run) and contractions matched case-insensitively by ASCII
case only (cl100k's (?i) also folds "'ſ", long s, into "'s"). llama.cpp also looks a whole chunk up in
the vocabulary before merging ("ignore_merges"), which is what tiktoken, lmforge's encoder, does.
add_bos_token is true: lmforge conditions every text on a leading <|bos|>; the chat template writes
its own, which llama.cpp drops when it adds one. eos is <|assistant_end|>, as in the HF export.

Not exported: checkpoints quantized by lmforge (int8/int4 QuantLinear; quantizing them again would
add a second rounding, so export the full-precision checkpoint with --dtype q8_0/q4_0 instead) and
checkpoints whose tokenizer is a HubTokenizer (an imported HF model: llama.cpp identifies such a
tokenizer by hashing its outputs, so convert that HF folder with llama.cpp's convert_hf_to_gguf.py).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from lmforge.common import LmforgeError
from lmforge.hf import ARCHITECTURES, EOS_TOKEN, _special_ids, hf_family, load_for_export, to_hf_tensors
from lmforge.models.transformer import GPTConfig, llama3_frequencies
from lmforge.train.checkpoint import load_checkpoint_tokenizer

Q = gguf.GGMLQuantizationType
DTYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
ARCHES = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen3": gguf.MODEL_ARCH.QWEN3, "gpt2": gguf.MODEL_ARCH.GPT2}
# llama.cpp's pre-tokenizer whose regex splits text as lmforge's SPLIT_PATTERN does (module docstring)
PRE_TOKENIZER = "llama-bpe"
# What the HF families lmforge has but this export does not are, for the error message.
NOT_EXPORTED = {"qwen2": "q/k/v biases without the other biases (Qwen2)",
                "gemma2": "Gemma-2's features (GeGLU, sandwich norms, soft-capping, ...)",
                "qwen3_moe": "a mixture of experts"}


@dataclass
class GGUFExport:
    """What export_gguf wrote."""
    path: Path
    arch: str  # llama.cpp architecture: llama, qwen3 or gpt2
    dtype: str  # the requested type of the matrices (f32, f16, bf16, q8_0, q4_0)
    size: int  # bytes
    config: GPTConfig
    kept_f16: list[str] = field(default_factory=list)  # matrices a block type could not hold


# ----------------------------------------------------------------------------- architecture


def gguf_arch(cfg: GPTConfig) -> str:
    """The llama.cpp architecture computing what `cfg` computes; LmforgeError naming what has none."""
    try:
        family = hf_family(cfg)
    except LmforgeError as e:  # the same decision as the HF export, so the same reason
        raise LmforgeError(str(e).replace("cannot export to Hugging Face", "cannot export to GGUF")) from None
    if family in NOT_EXPORTED:
        raise LmforgeError(f"cannot export to GGUF: {NOT_EXPORTED[family]} (HF {ARCHITECTURES[family]}) has "
                           f"no exporter here; GGUF export writes llama, qwen3 and gpt2")
    if not cfg.causal:
        raise LmforgeError("cannot export to GGUF: causal=False (bidirectional attention); llama.cpp's "
                           "llama, qwen3 and gpt2 are causal")
    if family == "qwen3" and cfg.rope_scaling:
        raise LmforgeError(f"cannot export to GGUF: rope_scaling={cfg.rope_scaling!r} with QK-norm; llama.cpp's "
                           "qwen3 has no RoPE frequency factors")
    if family == "gpt2" and cfg.head_dim * cfg.n_head != cfg.n_embd:
        raise LmforgeError(f"cannot export to GGUF: head_size={cfg.head_size} with n_head={cfg.n_head} is not "
                           f"n_embd={cfg.n_embd}; llama.cpp's gpt2 needs heads x head size = n_embd")
    return family


# ----------------------------------------------------------------------------- tensors


def rope_pairs_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection (or bias) reordered from lmforge's half-split RoPE pairs (i, i + d/2)
    to llama.cpp `llama`'s adjacent pairs (2i, 2i+1), head by head."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model, arch: str) -> dict[str, torch.Tensor]:
    """The model's weights under GGUF names, in llama.cpp's layouts (float32)."""
    cfg = model.config
    hf = to_hf_tensors(model, arch)  # names, fusing and zero biases decided once, in lmforge/hf.py
    if arch == "qwen3":
        # llama.cpp's qwen3 has no output-projection bias (HF Qwen3 has one with attention_bias)
        for name in [n for n in hf if n.endswith("o_proj.bias")]:
            if hf.pop(name).any():
                raise LmforgeError("cannot export to GGUF: a QK-norm model maps onto llama.cpp's qwen3, which "
                                   "has no attention output bias, and this model's is not zero")
    names = gguf.get_tensor_name_map(ARCHES[arch], cfg.n_layer)
    out = {}
    for name, t in hf.items():
        t = t.detach().float()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            t = rope_pairs_interleaved(t, cfg.n_head if ".q_proj." in name else cfg.kv_heads)
        if arch == "gpt2" and name.startswith("transformer.h.") and t.dim() == 2:
            t = t.t()  # HF's Conv1D (in, out) back to (out, in)
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:  # a tensor the name map does not know: better no file than a wrong one
            raise LmforgeError(f"cannot export to GGUF: no {arch} name for {name}")
        out[new] = t.contiguous()
    if cfg.rope_scaling == "llama3":
        # llama.cpp divides each RoPE frequency by a factor: the base frequency over lmforge's scaled one
        hd = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        out[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = inv_freq / llama3_frequencies(inv_freq, cfg)
    return out


def tensor_type(name: str, t: torch.Tensor, dtype: str) -> Q:
    """The GGML type `name` is stored in when the file's type is `dtype`."""
    if t.dim() <= 1 or name.startswith(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD] + "."):
        return Q.F32  # llama.cpp's kernels take norms, biases and the position table in f32
    qtype = DTYPES[dtype]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return Q.F16 if t.shape[-1] % block else qtype  # a row must be whole blocks


# ----------------------------------------------------------------------------- tokenizer


def write_tokenizer(writer: gguf.GGUFWriter, tok, vocab_size: int) -> None:
    """Tokenizer metadata for lmforge's byte-level BPE (module docstring)."""
    from lmforge.chat import CHAT_TEMPLATE_JINJA
    from lmforge.tokenizer import SPECIAL_TOKENS, bytes_to_unicode

    char = bytes_to_unicode()

    def spelling(i: int) -> str:
        return "".join(char[b] for b in tok.token_bytes(i))

    n_plain = tok.vocab_size - len(SPECIAL_TOKENS)
    # the model's padding rows: strings no pre-token can equal (letters and digits never share one)
    pads = [f"[PAD{i}]" for i in range(tok.vocab_size, vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list([spelling(i) for i in range(n_plain)] + list(SPECIAL_TOKENS) + pads)
    writer.add_token_types([gguf.TokenType.NORMAL] * n_plain + [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS)
                           + [gguf.TokenType.UNUSED] * len(pads))
    writer.add_token_merges([f"{spelling(a)} {spelling(b)}" for a, b in tok.merges])
    ids = _special_ids(tok)  # the HF export's choices: eos = <|assistant_end|>
    writer.add_bos_token_id(ids["bos_token_id"])
    writer.add_eos_token_id(tok.special_id(EOS_TOKEN))
    writer.add_pad_token_id(ids["pad_token_id"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE_JINJA)


def checkpoint_tokenizer(ckpt: Path, cfg: GPTConfig):
    if not (ckpt / "tokenizer.json").is_file():
        raise LmforgeError(f"checkpoint {ckpt} has no tokenizer.json; a GGUF file carries its tokenizer, "
                           "so export a checkpoint that has one")
    tok = load_checkpoint_tokenizer(ckpt)
    if hasattr(tok, "hf_files"):
        raise LmforgeError(f"checkpoint {ckpt} has a Hugging Face tokenizer (an imported model), which this "
                           "export does not write; convert the HF folder with llama.cpp's convert_hf_to_gguf.py")
    if not tok.merges:
        # gguf's writer cannot store an empty merge list, and llama.cpp refuses a BPE vocabulary without one.
        raise LmforgeError(f"the tokenizer in {ckpt} has no merges (byte-level); llama.cpp's BPE tokenizer "
                           "needs at least one, so train a tokenizer with merges for a model to export as GGUF")
    if tok.vocab_size > cfg.vocab_size:
        raise LmforgeError(f"the tokenizer in {ckpt} has {tok.vocab_size} ids but the model only {cfg.vocab_size}")
    return tok


# ----------------------------------------------------------------------------- export


def write_hparams(writer: gguf.GGUFWriter, cfg: GPTConfig, arch: str, dtype: str) -> None:
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_vocab_size(cfg.vocab_size)
    if arch == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps)
    else:
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_rope_freq_base(cfg.rope_theta)
        # head size may differ from n_embd / n_head (Qwen3); RoPE covers the whole head
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_file_type(FILE_TYPES[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def default_dtype(model) -> str:
    """bf16 for a bf16 checkpoint (f16 could overflow its range), else f16."""
    return "bf16" if next(model.parameters()).dtype == torch.bfloat16 else "f16"


def export_gguf(checkpoint_path: str | Path, out: str | Path, dtype: str | None = None) -> GGUFExport:
    """Write an lmforge transformer checkpoint as one GGUF file that llama.cpp loads (model, tokenizer,
    chat template). `out` is the file, or a folder to hold model.gguf; dtype is f32, f16, bf16, q8_0 or
    q4_0 (None: `default_dtype`)."""
    if dtype is not None and dtype not in DTYPES:
        raise LmforgeError(f"GGUF dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    ckpt, model = load_for_export(checkpoint_path, "export the full-precision checkpoint with --dtype q8_0 or "
                                                   "q4_0 instead")
    cfg = model.config
    arch = gguf_arch(cfg)
    tok = checkpoint_tokenizer(ckpt, cfg)
    dtype = dtype or default_dtype(model)
    out = Path(out)
    if out.is_dir():
        out = out / "model.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)

    tensors = gguf_tensors(model, arch)
    del model
    kept_f16 = []
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp", delete=False) as f:
        tmp = Path(f.name)
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[ARCHES[arch]])
        writer.add_name(ckpt.parent.name)  # the run folder
        write_hparams(writer, cfg, arch, dtype)
        write_tokenizer(writer, tok, cfg.vocab_size)
        for name, t in tensors.items():
            qtype = tensor_type(name, t, dtype)
            if qtype == Q.F16 and DTYPES[dtype] != Q.F16:
                kept_f16.append(name)
            writer.add_tensor(name, gguf.quants.quantize(t.numpy(), qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return GGUFExport(out, arch, dtype, out.stat().st_size, cfg, kept_f16)


def read_gguf_tensor(reader: gguf.GGUFReader, name: str) -> np.ndarray:
    """A tensor of a GGUF file as float32 in nn.Linear's (out, in) shape: dequantised, for checks."""
    t = next(t for t in reader.tensors if t.name == name)
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(n) for n in reversed(t.shape)))
