"""Checkpoints: weights and optimizer tensors in safetensors, everything else in one JSON.

A checkpoint is a folder `checkpoints/step_000123/` holding
  model.safetensors      model weights (a tied output head is stored once)
  optimizer.safetensors  optimizer state tensors (absent for weights-only exports)
  state.json             model family and config, step, data position, RNG states, optimizer hyper-parameters,
                         training config and anything the stage adds (tokenizer fingerprint, ...)
or, written by sharded processes (FSDP2, tensor parallel), instead of the two safetensors files
  sharded/               a torch.distributed.checkpoint folder: every process wrote its own shards of
                         the weights ("model.*") and optimizer state ("optimizer.*"), plus the
                         .metadata that maps them to whole tensors, so any number of processes (or
                         one, for sample/export) reads back the pieces it needs.
It is written into `step_000123.tmp/` and renamed into place only when complete, so a crash
mid-save leaves the previous checkpoint as the latest valid one.

This file is long because both layouts are one format: finding, resolving, loading and resuming
treat them alike (a reader never asks which layout it has), and split in two they would import each
other.
"""
from __future__ import annotations

import base64
import contextlib
import json
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.common import LmforgeError, atomic_write_json, read_json
from lmforge.models.registry import build_model, family_of, get_family
from lmforge.quantize import prepare_quantized, quantization_config, quantize_model

CKPT_RE = re.compile(r"^step_(\d+)$")


# ----------------------------------------------------------------------------- RNG state


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def _python_rng() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def capture_rng() -> dict:
    state = {"torch": _b64(torch.get_rng_state()), "numpy": np.random.get_state()[1].tolist(),
             "numpy_pos": int(np.random.get_state()[2]), "python": _python_rng()}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


# ----------------------------------------------------------------------------- optimizer state


def _split_optimizer_state(optimizers) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Optimizer state dicts -> (flat tensors for safetensors, JSON-able remainder). `optimizers` are
    optimizers or their state dicts (a sharded run's, gathered to full tensors: the same layout)."""
    tensors, meta = {}, []
    for i, opt in enumerate(optimizers):
        sd = opt if isinstance(opt, dict) else opt.state_dict()
        state_meta = {}
        for pid, pstate in sd["state"].items():
            entry = {}
            for k, v in pstate.items():
                if torch.is_tensor(v):
                    tensors[f"opt{i}.{pid}.{k}"] = v.detach().cpu().contiguous()
                    entry[k] = "tensor"
                else:
                    entry[k] = v
            state_meta[str(pid)] = entry
        meta.append({"param_groups": sd["param_groups"], "state": state_meta})
    return tensors, meta


def _join_optimizer_state(tensors: dict, meta: list[dict], i: int) -> dict:
    m = meta[i]
    state = {}
    for pid, entry in m["state"].items():
        state[int(pid)] = {k: (tensors[f"opt{i}.{pid}.{k}"] if v == "tensor" else v) for k, v in entry.items()}
    return {"state": state, "param_groups": m["param_groups"]}


# ----------------------------------------------------------------------------- save / load


def model_state_for_saving(model) -> dict[str, torch.Tensor]:
    """The model's tensors, a tied weight (an output head sharing the embedding) stored once."""
    sd, seen = {}, set()
    for k, v in model.state_dict(keep_vars=True).items():
        if isinstance(v, nn.Parameter):
            if id(v) in seen:
                continue
            seen.add(id(v))
        sd[k] = v.detach() if v.is_meta else v.detach().cpu().contiguous()  # meta: names and shapes only
    return sd


SAFETENSORS_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                     torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors_stream(path: Path, spec: list[tuple[str, tuple, torch.dtype]], produce) -> None:
    """Write a safetensors file one tensor at a time: `spec` lists (name, shape, dtype) in file order and
    produce(name) makes that tensor when its turn comes, so memory holds one tensor, not the model
    (safetensors' save_file serialises everything in memory first). The format: an 8-byte little-endian
    header size, a JSON header of names, dtypes, shapes and byte ranges, then the raw bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in spec:
        size = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    from tqdm import tqdm

    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for name, shape, dtype in tqdm(spec, desc="writing tensors", unit="tensor", disable=None, leave=False):
            t = produce(name)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise LmforgeError(f"{name}: made a {t.dtype} tensor of shape {tuple(t.shape)}, "
                                   f"expected {dtype} {tuple(shape)}")
            f.write(t.detach().cpu().contiguous().view(torch.uint8).numpy().data)


def _checkpoint_state(step: int, model, state: dict | None) -> dict:
    """state.json's content but the optimizer's: what the model is, and what the stage adds."""
    full_state = {"format": "lmforge-checkpoint", "version": 1, "step": step,
                  "model_family": family_of(model), "model_config": model.config.to_dict()}
    if callable(getattr(model, "head_record", None)):  # a reward or value head around the language model
        full_state["head"] = model.head_record()
    full_state.update(state or {})
    return full_state


def save_checkpoint(ckpt_root: str | Path, step: int, model, optimizers=None, state: dict | None = None,
                    keep: int | None = None, files: dict[str, bytes] | None = None, weights=None,
                    state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoints/step_{step}/ atomically; prune to the newest `keep` checkpoints.
    `files` are extra small files stored alongside (the tokenizer, so a checkpoint is self-contained).
    `weights`: (spec, produce) for write_safetensors_stream, to write tensors made one at a time
    (an import) instead of the model's; the model then only gives the family and config (it may be on
    the meta device). `state_dict`: full tensors to write instead of the model's own (a sharded model's,
    gathered)."""
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f"step_{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if weights is not None:
        try:
            write_safetensors_stream(tmp / "model.safetensors", *weights)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind
            raise
    else:
        tensors = model_state_for_saving(model) if state_dict is None else dict(state_dict)
        if state_dict is not None and getattr(model.config, "tie_embeddings", False):
            tensors.pop("lm_head.weight", None)  # stored once, as the embedding (as model_state_for_saving does)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"))
    for name, data in (files or {}).items():
        (tmp / name).write_bytes(data)
    full_state = _checkpoint_state(step, model, state)
    if optimizers:
        tensors, meta = _split_optimizer_state(optimizers)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        full_state["optimizer"] = meta
    return _complete(tmp, final, full_state, keep)


def _complete(tmp: Path, final: Path, full_state: dict, keep: int | None) -> Path:
    """Write state.json last (its presence marks a complete checkpoint), move the folder into place,
    and keep only the newest `keep` checkpoints."""
    atomic_write_json(tmp / "state.json", full_state)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if keep:
        for old in list_checkpoints(final.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


SHARDED = "sharded"  # the torch.distributed.checkpoint folder of a sharded checkpoint


def is_sharded_checkpoint(ckpt_dir: str | Path) -> bool:
    return (Path(ckpt_dir) / SHARDED / ".metadata").is_file()


def has_weights(ckpt_dir: str | Path) -> bool:
    return (Path(ckpt_dir) / "model.safetensors").is_file() or is_sharded_checkpoint(ckpt_dir)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def model_shards(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state as this process holds it (DTensor shards under FSDP2 or tensor parallelism,
    whole tensors otherwise), by parameter name: what torch.distributed.checkpoint saves or fills."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model)


def save_sharded_checkpoint(ckpt_root: str | Path, step: int, model, optimizers, state: dict | None = None,
                            keep: int | None = None, files: dict[str, bytes] | None = None) -> Path:
    """Every process calls this: each writes its own shards of the weights and the optimizer state
    with torch.distributed.checkpoint (nothing is gathered, so no process needs room for the whole
    model); the first also writes state.json and the small files, and renames the folder into place
    once all have finished. `state` matters on the first process only. Several machines need a folder
    they all see (a shared filesystem)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    distributed = _distributed()
    main = not distributed or dist.get_rank() == 0
    ckpt_root = Path(ckpt_root)
    final, tmp = ckpt_root / f"step_{step:06d}", ckpt_root / f"step_{step:06d}.tmp"
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / SHARDED).mkdir(parents=True)
    if distributed:
        dist.barrier()
    tensors, meta = _split_optimizer_state(optimizers or [])
    with _single_process_quietly():
        dcp.save({"model": model_shards(model), "optimizer": tensors}, checkpoint_id=str(tmp / SHARDED),
                 no_dist=not distributed)
    if main:
        for name, data in (files or {}).items():
            (tmp / name).write_bytes(data)
        full_state = _checkpoint_state(step, model, state)
        if optimizers:
            full_state["optimizer"] = meta
        _complete(tmp, final, full_state, keep)
    if distributed:
        dist.barrier()
    return final


def _sharded_metadata(ckpt_dir: Path):
    import torch.distributed.checkpoint as dcp

    try:
        return dcp.FileSystemReader(str(ckpt_dir / SHARDED)).read_metadata()
    except Exception as e:  # a damaged or half-copied folder: many exception types
        raise LmforgeError(f"cannot read {ckpt_dir / SHARDED}: {type(e).__name__}: {e}") from None


def _load_sharded(ckpt_dir: Path, wanted: dict) -> None:
    """Fill `wanted` ({"model": {...}, "optimizer": {...}} of tensors or DTensor shards) in place."""
    stored = _sharded_metadata(ckpt_dir).state_dict_metadata
    absent = [f"{group}.{k}" for group, d in wanted.items() for k in d if f"{group}.{k}" not in stored]
    if absent:
        raise LmforgeError(f"checkpoint {ckpt_dir} does not fit the model: missing {absent[:5]}")
    _dcp_load(ckpt_dir, wanted)


@contextlib.contextmanager
def _single_process_quietly():
    """torch.distributed.checkpoint warns when used without a process group; here that is intended
    (one process reading a sharded checkpoint, or writing one)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (load|save) in a single process")
        yield


def _dcp_load(ckpt_dir: Path, wanted: dict) -> None:
    import torch.distributed.checkpoint as dcp

    with _single_process_quietly():
        dcp.load(wanted, checkpoint_id=str(ckpt_dir / SHARDED), no_dist=not _distributed())


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete checkpoints under ckpt_root, oldest first."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = CKPT_RE.match(p.name)
        if m and (p / "state.json").is_file() and has_weights(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder, a `checkpoints/` folder or a run folder; return the newest
    complete checkpoint folder."""
    path = Path(path)
    if (path / "state.json").is_file() and has_weights(path):
        return path
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    if not path.exists():
        raise LmforgeError(f"checkpoint not found: {path}")
    raise LmforgeError(f"no complete checkpoint in {path} (expected step_NNNNNN/ folders with "
                       "state.json and model.safetensors or sharded/)")


def checkpoint_shapes(path: str | Path) -> tuple[Path, dict, nn.Module]:
    """(resolved checkpoint, its state, its model built on the meta device): sizes and FLOPs of a
    run's newest checkpoint without reading or allocating its weights."""
    ckpt = resolve_checkpoint(path)
    state = read_checkpoint_state(ckpt)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = build_model(checkpoint_family(state), checkpoint_model_config(ckpt, state))
    return ckpt, state, model


def read_checkpoint_state(ckpt_dir: str | Path) -> dict:
    return read_json(Path(ckpt_dir) / "state.json", "checkpoint state", fmt="lmforge-checkpoint", version=1)


def checkpoint_family(state: dict) -> str:
    """The model family a checkpoint holds; checkpoints from before families existed hold a transformer."""
    return state.get("model_family") or "transformer"


def checkpoint_model_config(ckpt_dir: Path, state: dict):
    """The model config recorded in a checkpoint's state.json (of its family's config class), or
    one clear error saying it is not there."""
    where = Path(ckpt_dir) / "state.json"
    config = state.get("model_config")
    if not isinstance(config, dict):
        raise LmforgeError(f"{where} has no 'model_config' (the model's shape), so the weights cannot be "
                           "loaded; the file is damaged or was not written by lmforge")
    try:
        return get_family(checkpoint_family(state)).config_from_dict(config)
    except LmforgeError as e:
        raise LmforgeError(f"{where}: 'model_config' is not a valid model configuration: {e}") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise LmforgeError(f"cannot read {path}: {e}") from None


def load_model_weights(model, ckpt_dir: str | Path, ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Load a checkpoint's tensors into `model`, leaving out those whose names start with
    `ignore_prefixes` (a head's, when only the language model under it is wanted). A sharded
    checkpoint fills whatever the model holds: whole tensors in one process, its own shards in a
    sharded one (all processes must call it then), however many processes wrote it."""
    if is_sharded_checkpoint(ckpt_dir):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        sd = {k: v for k, v in model_shards(model).items() if not k.startswith(ignore_prefixes)}
        _load_sharded(Path(ckpt_dir), {"model": sd})
        set_model_state_dict(model, sd, options=StateDictOptions(strict=not ignore_prefixes))
        return
    sd = _load_tensors(Path(ckpt_dir) / "model.safetensors")
    if ignore_prefixes:
        sd = {k: v for k, v in sd.items() if not k.startswith(ignore_prefixes)}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # A tied weight is stored once: loading the tensor it shares fills it too. (Names as the
    # model's state_dict gives them, which a model with a head may map.)
    params = {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, nn.Parameter)}
    loaded = {id(params[k]) for k in sd if k in params}
    missing = [k for k in missing if not (k in params and id(params[k]) in loaded)]
    if missing or unexpected:
        raise LmforgeError(f"checkpoint {ckpt_dir} does not fit the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")


def load_model(path: str | Path, device: str = "cpu") -> tuple:
    """Build the model a checkpoint describes (its family and config) and load its weights.
    A checkpoint of a model with a head (state "head": PPO's value head and critic) loads as its
    language model, the head's tensors left out; one whose head replaced the output layer (a reward
    model) is refused. A LoRA run's checkpoint loads with its adapters merged into the weights.
    Returns (model, state)."""
    ckpt = resolve_checkpoint(path)
    state = read_checkpoint_state(ckpt)
    head = state.get("head")
    if head is None and state.get("stage") == "ppo":  # written before the "head" record existed
        head = {"kind": "actor-critic", "prefixes": ["value_head.", "critic."], "loads_as_language_model": True}
    if head is None and state.get("stage") == "reward":
        head = {"kind": "reward", "prefixes": ["score_head."], "loads_as_language_model": False}
    if head is not None and not (isinstance(head, dict) and isinstance(head.get("prefixes"), list)
                                 and all(isinstance(x, str) for x in head["prefixes"])):
        raise LmforgeError(f"{ckpt / 'state.json'}: 'head' is not a record of a head's tensor prefixes; "
                           "the file is damaged or was not written by lmforge")
    if head is not None and not head.get("loads_as_language_model"):
        raise LmforgeError(f"{ckpt} holds a {head.get('kind', 'headed')} model, not a language model "
                           "(its head replaces the output layer)")
    model = build_model(checkpoint_family(state), checkpoint_model_config(ckpt, state))
    lora = state.get("lora")
    if lora:  # a LoRA run's own checkpoint: base weights and adapters, under the adapted layers' names
        from lmforge.posttrain.lora import LoRAConfig, apply_lora

        try:
            apply_lora(model, LoRAConfig(**lora))
        except TypeError:
            raise LmforgeError(f"{ckpt / 'state.json'}: 'lora' is not a LoRA configuration; the file is damaged "
                               "or was not written by lmforge") from None
    if state.get("quantization"):
        prepare_quantized(model, state["quantization"])  # empty quantized layers to load into
    else:
        stored = stored_float_dtype(ckpt)
        if stored is not None and stored != torch.float32:
            model.to(stored)  # bf16 weights (an imported model) stay bf16 in memory
    load_model_weights(model, ckpt, tuple(head["prefixes"]) if head else ())
    if lora:
        from lmforge.posttrain.lora import merge_lora

        merge_lora(model)  # W + (alpha/r) B A: a plain model, as `lmforge lora merge` writes it
    return model.to(device).eval(), state


def stored_float_dtype(ckpt: Path) -> torch.dtype | None:
    """The one floating dtype of a checkpoint's weights (read from the file's header or the sharded
    checkpoint's metadata), or None if mixed."""
    from safetensors import safe_open

    if is_sharded_checkpoint(ckpt):
        stored = _sharded_metadata(ckpt).state_dict_metadata
        found = {getattr(getattr(m, "properties", None), "dtype", None) for k, m in stored.items()
                 if k.startswith("model.")}
        floats = {d for d in found if d is not None and d.is_floating_point}
        return floats.pop() if len(floats) == 1 else None
    path = ckpt / "model.safetensors"
    codes = {v: k for k, v in SAFETENSORS_CODES.items()}
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {codes.get(f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise LmforgeError(f"cannot read {path}: {e}") from None
    floats = {d for d in found if d is not None and d.is_floating_point}
    return floats.pop() if len(floats) == 1 else None


def load_checkpoint_tokenizer(ckpt_dir: str | Path):
    """The tokenizer stored in a checkpoint folder, checked against the fingerprint recorded at training."""
    from lmforge.hub_tokenizer import load_tokenizer

    ckpt_dir = resolve_checkpoint(ckpt_dir)
    path = ckpt_dir / "tokenizer.json"
    if not path.is_file():
        raise LmforgeError(f"checkpoint {ckpt_dir} has no tokenizer.json")
    tok = load_tokenizer(path)
    want = read_checkpoint_state(ckpt_dir).get("tokenizer_fingerprint")
    if want and tok.fingerprint != want:
        raise LmforgeError(f"tokenizer in {ckpt_dir} does not match the one the model was trained with")
    return tok


def trained_with_tools(path: str | Path) -> bool:
    """Whether the model in a checkpoint was fine-tuned to call tools: its SFT data had tool calls
    (SFT records how many conversations did, "tool_conversations") or RL ran with tools. Followed
    back through "base_checkpoint" (an RL run's state leads to its SFT's); False when nothing says so
    (a base model, or an SFT checkpoint from before the record existed)."""
    ckpt, seen = resolve_checkpoint(path), set()
    while ckpt.resolve() not in seen:
        seen.add(ckpt.resolve())
        state = read_checkpoint_state(ckpt)
        rl = state.get("rl")
        if isinstance(rl, dict) and rl.get("tools"):
            return True
        if "tool_conversations" in state:
            return bool(state["tool_conversations"])
        base = state.get("base_checkpoint")
        if not base:
            return False
        try:
            ckpt = resolve_checkpoint(base)
        except LmforgeError:  # the base was moved or deleted: nothing more to learn
            return False
    return False


def load_optimizer_states(optimizers, ckpt_dir: str | Path, state: dict) -> None:
    meta = state.get("optimizer")
    if meta is None or len(meta) != len(optimizers):
        raise LmforgeError(f"checkpoint {ckpt_dir} has optimizer state for "
                           f"{0 if meta is None else len(meta)} optimizers, this run uses {len(optimizers)} "
                           "(was it trained with a different --optimizer?)")
    from torch.distributed.tensor import DTensor, distribute_tensor

    if is_sharded_checkpoint(ckpt_dir):
        tensors = _optimizer_shards(optimizers, Path(ckpt_dir), meta)
    else:
        tensors = _load_tensors(Path(ckpt_dir) / "optimizer.safetensors")
    for i, opt in enumerate(optimizers):
        sd = _join_optimizer_state(tensors, meta, i)
        # A sharded (FSDP2) run keeps each parameter's state sharded like the parameter: the saved full
        # tensors are cut to this rank's shard (so the number of processes may change between runs).
        params = [p for g in opt.param_groups for p in g["params"]]
        for pid, pstate in sd["state"].items():
            p = params[pid] if pid < len(params) else None
            if isinstance(p, DTensor):
                sd["state"][pid] = {k: distribute_tensor(v, p.device_mesh, p.placements)
                                    if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.shape
                                    else v for k, v in pstate.items()}
        try:
            opt.load_state_dict(sd)
        except (ValueError, KeyError) as e:  # torch checks group sizes; a changed grouping lands here
            raise LmforgeError(f"checkpoint {ckpt_dir}: its optimizer state does not fit this run's parameter "
                               f"groups ({e}); it was written by a version that grouped parameters differently. "
                               "Start a new run from its weights instead of --resume") from None


def _optimizer_shards(optimizers, ckpt_dir: Path, meta: list[dict]) -> dict[str, torch.Tensor]:
    """A sharded checkpoint's optimizer tensors as this run holds them: a state tensor shaped like its
    parameter is read as the parameter is held (this process's shard of a DTensor, else whole), any
    other (a step count) whole; names as _split_optimizer_state gives them."""
    stored = _sharded_metadata(ckpt_dir).state_dict_metadata
    wanted = {}
    for i, opt in enumerate(optimizers):
        params = [p for g in opt.param_groups for p in g["params"]]
        for pid, entry in meta[i]["state"].items():
            p = params[int(pid)] if int(pid) < len(params) else None
            for k, v in entry.items():
                if v != "tensor":
                    continue
                name = f"opt{i}.{pid}.{k}"
                info = stored.get(f"optimizer.{name}")
                if info is None or not hasattr(info, "size"):
                    raise LmforgeError(f"checkpoint {ckpt_dir}: optimizer state {name} is missing")
                dtype = info.properties.dtype
                if p is not None and tuple(info.size) == tuple(p.shape):
                    wanted[name] = torch.empty_like(p, dtype=dtype)
                else:
                    wanted[name] = torch.empty(tuple(info.size), dtype=dtype,
                                               device=p.device if p is not None else "cpu")
    _dcp_load(ckpt_dir, {"optimizer": wanted})
    return wanted


# ----------------------------------------------------------------------------- quantized checkpoints


def save_quantized(model: nn.Module, out_dir: str | Path, *, step: int = 0, state: dict | None = None,
                   files: dict[str, bytes] | None = None) -> Path:
    """Write a quantized model as a checkpoint out_dir/step_{step}/ (model.safetensors + state.json with
    the model config and "quantization"); returns that folder. `state` and `files` are extra state.json
    entries and files, as for save_checkpoint (e.g. the tokenizer, to stay self-contained)."""
    qcfg = quantization_config(model)
    if qcfg is None:
        raise LmforgeError("model is not quantized; call quantize_model first")
    return save_checkpoint(out_dir, step, model, state={**(state or {}), "quantization": qcfg}, files=files)


_NOT_COPIED = {"model.safetensors", "optimizer.safetensors", "state.json"}
_STATE_RESET = {"format", "version", "step", "model_config", "optimizer", "quantization"}


def quantize_checkpoint(src: str | Path, out_dir: str | Path, bits: int = 8, group_size: int = 32,
                        include_lm_head: bool = True) -> Path:
    """Quantize a float checkpoint (any path resolve_checkpoint accepts) into out_dir/step_N/, keeping
    its step, its state entries (tokenizer fingerprint, ...) and its small files (tokenizer.json)."""
    ckpt = resolve_checkpoint(src)
    model, state = load_model(ckpt)
    if quantization_config(model) is not None:
        raise LmforgeError(f"{ckpt} is already quantized")
    quantize_model(model, bits, group_size, include_lm_head)
    files = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file() and p.name not in _NOT_COPIED}
    extra = {k: v for k, v in state.items() if k not in _STATE_RESET}
    extra["quantized_from"] = str(ckpt.resolve())
    return save_quantized(model, out_dir, step=int(state.get("step", 0)), state=extra, files=files)
