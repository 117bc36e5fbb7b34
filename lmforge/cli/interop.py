"""Checkpoints in and out: Hugging Face folders, GGUF files, ARPA n-gram files, weight-only quantization.

    lmforge export --checkpoint RUN [--format hf|gguf|arpa] [--dtype ...] OUT
    lmforge import HF_DIR --out RUN        a local Llama / Qwen2 / Qwen3 / Gemma-2 / GPT-2 folder
    lmforge quantize --checkpoint RUN --out RUN_INT8 [--bits 8|4]
"""
from __future__ import annotations

from pathlib import Path

from lmforge.common import LmforgeError

# --dtype values each format takes (one option, so that `--dtype q8_0 --format hf` is one clear error)
HF_DTYPES = ("float32", "bfloat16", "float16")
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
FORMAT_DTYPES = {"hf": HF_DTYPES, "gguf": GGUF_DTYPES, "arpa": ()}


def cmd_export(args):
    from lmforge.train.checkpoint import checkpoint_family, read_checkpoint_state, resolve_checkpoint

    if args.dtype is not None and args.dtype not in FORMAT_DTYPES[args.format]:
        fits = FORMAT_DTYPES[args.format]
        raise LmforgeError(f"--dtype {args.dtype} does not fit --format {args.format}, which takes "
                           + (", ".join(fits) if fits else "no --dtype"))
    family = checkpoint_family(read_checkpoint_state(resolve_checkpoint(args.checkpoint)))
    if args.format == "arpa":
        return export_arpa(args, family)
    if family != "transformer":
        raise LmforgeError(f"--format {args.format} exports the transformer family; this checkpoint holds a "
                           f"{family} model" + (" (use --format arpa)" if family == "ngram" else ""))
    if args.format == "gguf":
        return write_gguf(args)
    from lmforge.hf import export_hf

    conv = export_hf(args.checkpoint, args.out_dir, dtype=args.dtype)
    print(f"exported {conv.architecture} to {conv.path}" + (f" ({conv.note})" if conv.note else ""))
    print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(conv.path)!r})")


def write_gguf(args):
    from lmforge.gguf_export import export_gguf

    res = export_gguf(args.checkpoint, args.out_dir, dtype=args.dtype)
    kept = f"; {len(res.kept_f16)} matrices not a multiple of 32 wide kept in f16" if res.kept_f16 else ""
    print(f"wrote {res.path} ({res.size / 2**20:.1f} MiB, arch {res.arch}, {res.dtype}{kept})")
    print(f"load it with llama_cpp.Llama(model_path={str(res.path)!r}) or llama.cpp's llama-cli -m")


def export_arpa(args, family: str):
    """An n-gram checkpoint as an ARPA file (the format of SRILM and KenLM); words are the tokens'
    spellings (`arpa_token_text`), <s> the document start."""
    from lmforge.models.ngram import arpa_token_text, write_arpa
    from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model

    if family != "ngram":
        raise LmforgeError(f"--format arpa exports n-gram models; this checkpoint holds a {family} model")
    out = Path(args.out_dir)
    if out.is_dir():
        out = out / "model.arpa"
    model, _ = load_model(args.checkpoint)
    write_arpa(model, out, arpa_token_text(load_checkpoint_tokenizer(args.checkpoint)))
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, order {model.config.order}); "
          f"query it with kenlm.Model({str(out)!r})")


def cmd_import(args):
    from lmforge.hf import import_hf

    conv = import_hf(args.hf_dir, args.out)
    print(f"imported {conv.architecture} into {conv.path}" + (f" ({conv.note})" if conv.note else ""))


def cmd_quantize(args):
    from lmforge.quantize import model_memory_bytes
    from lmforge.train.checkpoint import load_model, quantize_checkpoint

    out = quantize_checkpoint(args.checkpoint, args.out, bits=args.bits, group_size=args.group_size,
                              include_lm_head=not args.no_lm_head)
    before, after = model_memory_bytes(load_model(args.checkpoint)[0]), model_memory_bytes(load_model(out)[0])
    print(f"int{args.bits} checkpoint in {out}: {after / 2**20:.1f} MiB in memory (from {before / 2**20:.1f} MiB)")


def add_commands(sub) -> None:
    ex = sub.add_parser("export", help="write a checkpoint as a Hugging Face model folder, a GGUF file (llama.cpp) "
                                       "or an ARPA n-gram file")
    ex.add_argument("--checkpoint", required=True)
    ex.add_argument("--format", choices=list(FORMAT_DTYPES), default="hf",
                    help="hf: a transformers folder, gguf: a llama.cpp file (transformer family); "
                         "arpa: an SRILM/KenLM file (n-gram family)")
    ex.add_argument("--dtype", choices=HF_DTYPES + GGUF_DTYPES, default=None,
                    help="hf: float32|bfloat16|float16, default the checkpoint's own (float32 when trained here, "
                         "bf16 when imported so); gguf: f32|f16|bf16|q8_0|q4_0, default f16 (bf16 for a bf16 "
                         "checkpoint)")
    ex.add_argument("out_dir", help="the folder (hf), the .gguf file or a folder for model.gguf (gguf), "
                                    "or the .arpa file or a folder for model.arpa (arpa)")
    ex.set_defaults(func=cmd_export)
    im = sub.add_parser("import", help="convert a local Hugging Face Llama/Qwen2/Qwen3/Gemma-2/GPT-2 folder "
                                       "(weights, tokenizer, chat template) to a checkpoint")
    im.add_argument("hf_dir")
    im.add_argument("--out", required=True, help="run folder for the lmforge checkpoint")
    im.set_defaults(func=cmd_import)

    qz = sub.add_parser("quantize", help="weight-only int8 / int4 quantization of a checkpoint")
    qz.add_argument("--checkpoint", required=True)
    qz.add_argument("--out", required=True, help="run folder for the quantized checkpoint")
    qz.add_argument("--bits", type=int, choices=[8, 4], default=8)
    qz.add_argument("--group-size", type=int, choices=[32, 64, 128, 256], default=32, help="int4 columns per scale")
    qz.add_argument("--no-lm-head", action="store_true", help="keep the output head in full precision")
    qz.set_defaults(func=cmd_quantize)
