"""What every command module shares: argument types, the option groups (model, training, sampling,
LoRA), and the derivation of options from declared settings.

A setting is declared once, as a dataclass field made with `lmforge.common.setting` (default, help,
value rule). `add_options` turns such fields into command-line options, `options_from_args` builds
the dataclass back from parsed arguments, and `options_argv` writes a dataclass as the arguments
that reproduce it (the speedrun re-enters `lmforge pretrain` under torchrun with them). A stage
changes defaults with its TRAIN_DEFAULTS dict (lmforge/stages/options.py); nothing here restates
a field.

Command modules import this module and the library, never each other.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from lmforge.common import LmforgeError

# ----------------------------------------------------------------------------- argument types


def checked(cast, ok, expected: str):
    """An argparse type: parse with `cast`, accept when ok(value) (NaN never passes), else a one-line
    error saying what was expected."""
    def parse(s: str):
        try:
            v = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}")
        return v

    parse.__name__ = expected  # argparse names the type in some messages
    return parse


positive_int = checked(int, lambda v: v > 0, "a positive integer")
nonneg_int = checked(int, lambda v: v >= 0, "an integer >= 0")
fraction = checked(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
unit_interval = checked(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
nonneg_float = checked(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
temperature_value = checked(float, lambda v: 0 <= v < float("inf"), "a temperature >= 0 (0 = greedy)")
top_p_value = checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
positive_float = checked(float, lambda v: 0 < v < float("inf"), "a positive number")
# torch.Generator.manual_seed takes any integer from -2**63 to 2**64 - 1.
seed_value = checked(int, lambda v: -2**63 <= v < 2**64, "an integer seed that fits in 64 bits")

# The argparse type of a declared setting: by its value rule ("check") and its annotation.
_TYPES = {("positive", "int"): positive_int, ("positive", "float"): positive_float,
          ("nonneg", "int"): nonneg_int, ("nonneg", "float"): nonneg_float,
          ("fraction", "float"): fraction, ("unit", "float"): unit_interval, ("seed", "int"): seed_value,
          ("temperature", "float"): temperature_value, ("top_p", "float"): top_p_value,
          (None, "int"): int, (None, "float"): float, (None, "str"): str}


class Deprecated(argparse.Action):
    """An old spelling of an option, kept working for one release with a warning naming the new one."""

    def __init__(self, option_strings, dest, new: str, **kw):
        self.new = new
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated here and will be removed in the next release; "
              f"use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


# ----------------------------------------------------------------------------- declared settings


def declared(cls, names=None) -> list[dataclasses.Field]:
    """The fields of a dataclass declared with `setting` (all, or those named, in declaration order)."""
    out = [f for f in dataclasses.fields(cls) if "help" in f.metadata]
    if names is not None:
        unknown = set(names) - {f.name for f in out}
        if unknown:
            raise ValueError(f"{cls.__name__} declares no setting {', '.join(sorted(unknown))}")
        out = [f for f in out if f.name in names]
    return out


def _kind(f: dataclasses.Field) -> str:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return t.split("|")[0].strip()


def flag_of(f: dataclasses.Field) -> str:
    if _kind(f) == "bool" and f.default is True:
        return "--no-" + f.name.replace("_", "-")
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_options(group, cls, names=None, *, defaults: dict | None = None, helps: dict | None = None,
                required=()):
    """One option per declared setting of cls. `defaults` and `helps` change a command's default or
    wording (a stage's TRAIN_DEFAULTS; "pairs" instead of "sequences"); `required` names options the
    command cannot run without."""
    defaults, helps = defaults or {}, helps or {}
    for f in declared(cls, names):
        default = defaults.get(f.name, f.default)
        text = helps.get(f.name, f.metadata["help"])
        kind = _kind(f)
        if kind == "bool":
            group.add_argument(flag_of(f), dest=f.name, action="store_false" if f.default else "store_true",
                               default=default, help=("turn off: " if f.default else "") + text)
            continue
        if f.name in required:
            group.add_argument(flag_of(f), dest=f.name, required=True, type=_TYPES[f.metadata["check"], kind],
                               choices=f.metadata["choices"], help=text)
            continue
        shown = f" (default: {default})" if default is not None else ""
        group.add_argument(flag_of(f), dest=f.name, type=_TYPES[f.metadata["check"], kind],
                           choices=f.metadata["choices"], default=default, help=text + shown)


def options_from_args(cls, args: argparse.Namespace, names=None, **given):
    """The dataclass built from the declared settings present in parsed arguments, plus `given`."""
    values = {f.name: getattr(args, f.name) for f in declared(cls, names) if hasattr(args, f.name)}
    return cls(**{**values, **given})


def options_argv(obj, names=None) -> list[str]:
    """The command-line arguments that give back `obj`'s declared settings (every one, explicitly,
    so the result does not depend on a command's defaults)."""
    argv = []
    for f in declared(type(obj), names):
        value = getattr(obj, f.name)
        if _kind(f) == "bool":
            if value != f.default:
                argv.append(flag_of(f))
        elif value is not None:
            argv += [flag_of(f), str(value)]
        elif f.default is not None:
            raise LmforgeError(f"{f.name}=None cannot be written as {flag_of(f)}")
    return argv


# ----------------------------------------------------------------------------- model options


def parse_model_sets(pairs: list[str], family: str | None = None) -> dict:
    """`--set key=value` overrides for fields of a model family's config, typed by the dataclass field."""
    from lmforge.models.registry import get_family

    types = {f.name: str(f.type) for f in dataclasses.fields(get_family(family).config_class)}
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise LmforgeError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in types:
            raise LmforgeError(f"--set: unknown model field {key!r}; fields: {', '.join(types)}")
        t = types[key]
        try:
            if "None" in t and value.lower() == "none":
                out[key] = None
            elif "bool" in t:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                out[key] = value.lower() in ("true", "1")
            elif "int" in t:
                out[key] = int(value)
            elif "float" in t:
                out[key] = float(value)
            else:
                out[key] = value
        except ValueError:
            raise LmforgeError(f"--set {key}: cannot parse {value!r} as {t}") from None
    return out


MODEL_SHAPE = ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size")  # the shape options with their own flags


def add_model_args(p: argparse.ArgumentParser, *, family: bool = False):
    """--model PRESET (and with family, --arch FAMILY), the shape options and --set."""
    from lmforge.models.registry import family_names

    g = p.add_argument_group("model")
    if family:
        g.add_argument("--arch", default="transformer", choices=family_names(),
                       help="model family (default transformer); presets are per family")
    g.add_argument("--model", dest="model_preset", default=None, metavar="PRESET",
                   help="the family's model preset (transformer: tiny, cpu (default), gpt2-classic, d12, d20; "
                        "lstm: tiny, cpu; ngram: unigram, bigram, trigram, kn3, kn5, kn7, ...)")
    if family:  # pretrain's old spelling; the speedrun's --preset names a speedrun preset
        g.add_argument("--preset", dest="model_preset", action=Deprecated, new="--model", help=argparse.SUPPRESS)
    g.add_argument("--n-layer", type=positive_int)
    g.add_argument("--n-head", type=positive_int)
    g.add_argument("--n-kv-head", type=positive_int)
    g.add_argument("--n-embd", type=positive_int)
    g.add_argument("--block-size", type=positive_int, help="context window in tokens")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any model config field, e.g. --set mlp=gelu --set qk_norm=false")


def model_overrides(args) -> dict:
    """The model fields set on the command line, checked against the chosen family's config."""
    from lmforge.models.registry import get_family

    family = get_family(getattr(args, "arch", None))
    known = {f.name for f in dataclasses.fields(family.config_class)}
    preset = getattr(args, "model_preset", None)
    if preset is not None and preset not in family.presets:
        raise LmforgeError(f"--model {preset}: not a {family.name} preset; choose from {', '.join(family.presets)}")
    o = {k: getattr(args, k) for k in MODEL_SHAPE if getattr(args, k) is not None}
    for k in o:
        if k not in known:
            raise LmforgeError(f"--{k.replace('_', '-')} does not apply to the {family.name} family "
                               f"(its fields: {', '.join(sorted(known))})")
    o.update(parse_model_sets(args.set, family.name))
    return o


def model_argv(family: str, preset: str | None, overrides: dict) -> list[str]:
    """--arch/--model/--set arguments that give back a model choice."""
    argv = ["--arch", family] + (["--model", preset] if preset else [])
    for k, v in overrides.items():
        argv += ["--set", f"{k}={v}"]
    return argv


# ----------------------------------------------------------------------------- training options


def add_train_args(p: argparse.ArgumentParser, *, defaults: dict | None = None, skip=()):
    """Every TrainConfig setting as an option, with a stage's TRAIN_DEFAULTS as its defaults; --out
    is required (unless skipped: the speedrun names its stages' run folders itself)."""
    from lmforge.train.config import TrainConfig

    g = p.add_argument_group("training")
    names = [f.name for f in declared(TrainConfig) if f.name not in skip]
    add_options(g, TrainConfig, names, defaults=defaults, required=("out_dir",))
    return g


def train_config(args, **given):
    from lmforge.train.config import TrainConfig

    return options_from_args(TrainConfig, args, **given)


# ----------------------------------------------------------------------------- LoRA options


def add_lora_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-rank", type=positive_int, help="train rank-R adapters instead of all weights")
    g.add_argument("--lora-alpha", type=positive_float, help="adapter scale alpha/R (default alpha = 2R)")
    g.add_argument("--lora-targets", default=None,
                   help="comma-separated linear layer names, or 'all' (q,k,v,o,gate,up,down); default q_proj,v_proj")
    g.add_argument("--lora-dropout", type=fraction, default=None, help="dropout on the adapter input (default 0)")


def lora_config(args):
    """The LoRAConfig the LoRA options ask for, or None; adapter options without --lora-rank are an error."""
    if not args.lora_rank:
        given = [f for f, v in (("--lora-alpha", args.lora_alpha), ("--lora-targets", args.lora_targets),
                                ("--lora-dropout", args.lora_dropout)) if v is not None]
        if given:
            raise LmforgeError(f"{' / '.join(given)} need --lora-rank")
        return None
    from lmforge.posttrain.lora import LoRAConfig

    return LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha or 2.0 * args.lora_rank,
                      targets=args.lora_targets or "q_proj,v_proj", dropout=args.lora_dropout or 0.0)


# ----------------------------------------------------------------------------- sampling and output


def add_sampling_args(p: argparse.ArgumentParser, *, seed_help: str | None = None):
    p.add_argument("--max-new-tokens", type=nonneg_int, default=200)
    p.add_argument("--temperature", type=temperature_value, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--top-p", type=top_p_value, default=0.95)
    p.add_argument("--min-p", type=top_p_value, default=None, help="drop tokens below min_p x the top probability")
    p.add_argument("--repetition-penalty", type=positive_float, default=None)
    p.add_argument("--seed", type=seed_value, default=None, help=seed_help)


def add_speculative_args(p: argparse.ArgumentParser):
    """Speculative decoding (docs/speculative.md): --draft or --prompt-lookup, and --speculate K."""
    g = p.add_argument_group("speculative decoding (same output distribution, more tokens per pass; "
                             "docs/speculative.md)")
    draft = g.add_mutually_exclusive_group()
    draft.add_argument("--draft", metavar="CHECKPOINT", default=None,
                       help="a smaller model with the same tokenizer proposes tokens, which the model checks "
                            "several at a time")
    draft.add_argument("--prompt-lookup", action="store_true",
                       help="propose the tokens that followed the latest earlier occurrence of the last few "
                            "tokens (no draft model; pays when the output repeats its context)")
    g.add_argument("--speculate", type=positive_int, default=4, metavar="K",
                   help="draft tokens proposed per step (default 4)")


def add_diffusion_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("masked diffusion models (ignored by autoregressive ones)")
    g.add_argument("--steps", type=positive_int, default=None,
                   help="forward passes to generate --max-new-tokens tokens (default: one per token)")
    g.add_argument("--block-len", type=positive_int, default=None,
                   help="semi-autoregressive blocks of this many tokens, left to right (default: one block)")
    g.add_argument("--remasking", choices=("low_confidence", "random", "ancestral"), default="low_confidence",
                   help="which masked tokens each step reveals (lmforge/inference/diffusion.py)")


def is_diffusion(model) -> bool:
    return getattr(model, "generation", "autoregressive") == "diffusion"


def diffusion_text(model, tok, ids: list[int], args, seed=None, length: int | None = None,
                   temperature: float | None = None) -> str:
    """A masked diffusion model's continuation of ids (`length` or --max-new-tokens tokens, --steps
    passes), cut at its first document end or end of turn."""
    from lmforge.inference.diffusion import diffusion_generate

    length = args.max_new_tokens if length is None else length
    if length < 1:
        return ""
    out = diffusion_generate(model, ids, length, min(args.steps or length, length), method=args.remasking,
                             block_len=args.block_len,
                             temperature=args.temperature if temperature is None else temperature,
                             top_k=args.top_k, top_p=args.top_p, seed=seed)[0, len(ids):].tolist()
    ends = [i for i, t in enumerate(out) if t in tok.stop_ids]
    return tok.decode(out[: ends[0]] if ends else out)


def sampling_kwargs(args) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=getattr(args, "min_p", None), repetition_penalty=getattr(args, "repetition_penalty", None))


def add_engine_args(p: argparse.ArgumentParser):
    """How the engine runs: the weights' dtype and the CPU threads."""
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="store the weights in this dtype, cast once at load (bf16: half the bytes read per "
                        "token); default: as the checkpoint stores them")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for the matrix multiplies (default: torch's, one per core; one thread "
                        "is often faster for a tiny model on a busy machine)")


def apply_engine_args(args, model):
    """--threads (process-wide, as torch's thread pool is) and --dtype (the weights cast once, in
    place); returns the model."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    if getattr(args, "dtype", None):
        from lmforge.inference.precision import cast_weights, engine_dtype

        cast_weights(model, engine_dtype(args.dtype))
    return model


def print_sample(model, tok, prompt: str, args, n: int = 1, seed=None):
    """n samples continuing `prompt` from a document start, each streamed as it is generated."""
    from lmforge.inference.engine import Engine

    ids = [tok.bos_id] + tok.encode(prompt)
    engine = None if is_diffusion(model) else Engine(model, tok)
    for i in range(n):
        s = None if seed is None else (seed + i) % 2**64
        if n > 1:
            print(f"--- sample {i + 1}")
        print(prompt, end="", flush=True)
        if engine is None:  # the whole continuation at once: diffusion reveals tokens in any order
            print(diffusion_text(model, tok, ids, args, seed=s))
            continue
        for piece in engine.stream(ids, args.max_new_tokens, seed=s, stop_ids=[tok.bos_id], **sampling_kwargs(args)):
            print(piece, end="", flush=True)
        print()


def read_text_arg(text: str | None) -> str:
    if text is not None:
        return text
    if sys.stdin.isatty():
        raise LmforgeError("give the text as an argument or on standard input")
    return sys.stdin.read()


def print_result(result: dict):
    """A training command's summary (numbers and strings only), on the main process."""
    import json

    from lmforge.common import is_main_process

    if is_main_process():
        print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, str))}, indent=2))


def main_log():
    """print on the main process, silence on the others."""
    from lmforge.common import is_main_process

    return print if is_main_process() else (lambda *a: None)
