"""Checkpoints: weights and optimizer tensors in safetensors, everything else in one JSON.

A checkpoint is a folder `checkpoints/step_000123/` holding
  model.safetensors      model weights (a tied output head is stored once)
  optimizer.safetensors  optimizer state tensors (absent for weights-only exports)
  state.json             model config, step, data position, RNG states, optimizer hyper-parameters,
                         training config and anything the stage adds (tokenizer fingerprint, ...)
It is written into `step_000123.tmp/` and renamed into place only when complete, so a crash
mid-save leaves the previous checkpoint as the latest valid one.
"""
from __future__ import annotations

import base64
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.common import LmforgeError, atomic_write_json, read_json
from lmforge.model import GPT, GPTConfig

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
    """Optimizer state dicts -> (flat tensors for safetensors, JSON-able remainder)."""
    tensors, meta = {}, []
    for i, opt in enumerate(optimizers):
        sd = opt.state_dict()
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


def model_state_for_saving(model: GPT) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)  # same tensor as embed_tokens.weight
    return sd


def save_checkpoint(ckpt_root: str | Path, step: int, model: GPT, optimizers=None, state: dict | None = None,
                    keep: int | None = None, files: dict[str, bytes] | None = None) -> Path:
    """Write checkpoints/step_{step}/ atomically; prune to the newest `keep` checkpoints.
    `files` are extra small files stored alongside (the tokenizer, so a checkpoint is self-contained)."""
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f"step_{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(model_state_for_saving(model), str(tmp / "model.safetensors"))
    for name, data in (files or {}).items():
        (tmp / name).write_bytes(data)
    full_state = {"format": "lmforge-checkpoint", "version": 1, "step": step,
                  "model_config": model.config.to_dict(), **(state or {})}
    if optimizers:
        tensors, meta = _split_optimizer_state(optimizers)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        full_state["optimizer"] = meta
    atomic_write_json(tmp / "state.json", full_state)  # last file: its presence marks completeness
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if keep:
        for old in list_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete checkpoints under ckpt_root, oldest first."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = CKPT_RE.match(p.name)
        if m and (p / "state.json").is_file() and (p / "model.safetensors").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder, a `checkpoints/` folder or a run folder; return the newest
    complete checkpoint folder."""
    path = Path(path)
    if (path / "state.json").is_file() and (path / "model.safetensors").is_file():
        return path
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    if not path.exists():
        raise LmforgeError(f"checkpoint not found: {path}")
    raise LmforgeError(f"no complete checkpoint in {path} (expected step_NNNNNN/ folders with "
                       "model.safetensors and state.json)")


def read_checkpoint_state(ckpt_dir: str | Path) -> dict:
    return read_json(Path(ckpt_dir) / "state.json", "checkpoint state", fmt="lmforge-checkpoint", version=1)


def checkpoint_model_config(ckpt_dir: Path, state: dict) -> GPTConfig:
    """The model shape recorded in a checkpoint's state.json, or one clear error saying it is not there."""
    where = Path(ckpt_dir) / "state.json"
    config = state.get("model_config")
    if not isinstance(config, dict):
        raise LmforgeError(f"{where} has no 'model_config' (the model's shape), so the weights cannot be "
                           "loaded; the file is damaged or was not written by lmforge")
    try:
        return GPTConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise LmforgeError(f"{where}: 'model_config' is not a valid model configuration: {e}") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise LmforgeError(f"cannot read {path}: {e}") from None


def load_model_weights(model: GPT, ckpt_dir: str | Path) -> None:
    sd = _load_tensors(Path(ckpt_dir) / "model.safetensors")
    if model.config.tie_embeddings:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise LmforgeError(f"checkpoint {ckpt_dir} does not fit the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")


def load_model(path: str | Path, device: str = "cpu") -> tuple[GPT, dict]:
    """Build the model described by a checkpoint and load its weights. Returns (model, state)."""
    ckpt = resolve_checkpoint(path)
    state = read_checkpoint_state(ckpt)
    model = GPT(checkpoint_model_config(ckpt, state))
    if state.get("quantization"):
        from lmforge.quantize import prepare_quantized  # empty quantized layers to load into

        prepare_quantized(model, state["quantization"])
    load_model_weights(model, ckpt)
    return model.to(device).eval(), state


def load_checkpoint_tokenizer(ckpt_dir: str | Path):
    """The tokenizer stored in a checkpoint folder, checked against the fingerprint recorded at training."""
    from lmforge.tokenizer import Tokenizer

    ckpt_dir = resolve_checkpoint(ckpt_dir)
    path = ckpt_dir / "tokenizer.json"
    if not path.is_file():
        raise LmforgeError(f"checkpoint {ckpt_dir} has no tokenizer.json")
    tok = Tokenizer.load(path)
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
    tensors = _load_tensors(Path(ckpt_dir) / "optimizer.safetensors")
    for i, opt in enumerate(optimizers):
        opt.load_state_dict(_join_optimizer_state(tensors, meta, i))
