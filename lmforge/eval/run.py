"""Run a list of tasks on one model and collect the results (what `lmforge eval` does)."""
from __future__ import annotations

import time
from pathlib import Path

from lmforge.common import LmforgeError
from lmforge.eval.harness import EvalModel
from lmforge.eval.tasks import MC_TASKS, DataUnavailable, default_data_root, iter_limit, load_gsm8k, load_mc_task

GENERATIVE_TASKS = {"gsm8k": "GSM8K test, few-shot chain of thought, exact match",
                    "mt_bench_ref": "MT-bench first turns with GPT-4 references: BLEU, ROUGE-1/2/L"}
LM_TASKS = {"wikitext": "WikiText-2 validation text: perplexity, bits per byte"}


def known_tasks() -> dict[str, str]:
    return {**{k: v.description for k, v in MC_TASKS.items()}, **GENERATIVE_TASKS, **LM_TASKS}


def parse_tasks(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    known = known_tasks()
    bad = [t for t in names if t not in known]
    if bad or not names:
        raise LmforgeError(f"unknown task(s) {', '.join(bad) or '(none given)'}; known: {', '.join(known)}")
    return names


def run_tasks(lm: EvalModel, tasks: list[str], *, limit: int | None = None, fewshot: int = 0, seed: int = 1234,
              batch_size: int = 16, data_root: str | Path | None = None, source: str = "auto",
              max_new_tokens: int = 256, progress: bool = True, keep_predictions: bool = False,
              hub_mirror: str | Path | None = None) -> dict:
    """Results as a JSON-able dict: {"model", "params", "settings", "tasks": {name: {"metrics": ...}}}.
    A task whose data is not available raises tasks.DataUnavailable."""
    root = Path(data_root) if data_root is not None else default_data_root()
    results = {"model": lm.name, "params": lm.num_params(),
               "settings": {"limit": limit, "fewshot": fewshot, "seed": seed, "source": source},
               "tasks": {}}
    for name in tasks:
        t0 = time.perf_counter()
        if name in MC_TASKS:
            from lmforge.eval.multiple_choice import evaluate_multiple_choice

            pool = load_mc_task(name, root, source, hub_mirror=hub_mirror)
            r = evaluate_multiple_choice(lm, iter_limit(pool, limit), fewshot=fewshot, seed=seed,
                                         batch_size=batch_size, progress=progress, desc=name, pool=pool)
            out = {"metrics": r.metrics, "predictions": r.predictions}
        elif name == "gsm8k":
            from lmforge.eval.generative import evaluate_gsm8k

            test = iter_limit(load_gsm8k(root, source, "test", hub_mirror=hub_mirror), limit)
            shots = load_gsm8k(root, source, "train", hub_mirror=hub_mirror) if fewshot else []
            out = evaluate_gsm8k(lm, test, shots, fewshot=fewshot, seed=seed, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, progress=progress)
        elif name == "mt_bench_ref":
            from lmforge.eval.generative import evaluate_reference_generation, load_mt_bench_references

            if not all((root / "eval" / "mt_bench" / f).is_file() for f in ("question.jsonl", "gpt-4.jsonl")):
                raise DataUnavailable(name, f"{root / 'eval' / 'mt_bench'} has no question.jsonl + gpt-4.jsonl",
                                      "set LMFORGE_SHARED_DATA / --data-root to a folder with eval/mt_bench/")
            prompts, refs = load_mt_bench_references(root)
            prompts, refs = iter_limit(prompts, limit), iter_limit(refs, limit)
            out = evaluate_reference_generation(lm, prompts, refs, max_new_tokens=max_new_tokens,
                                                batch_size=batch_size, progress=progress)
        elif name == "wikitext":
            from lmforge.eval.lm import evaluate_text

            path = root / "eval" / "wikitext-2" / "valid.txt"
            if not path.is_file():
                raise DataUnavailable(name, f"{path} not found", "set LMFORGE_SHARED_DATA / --data-root to a "
                                      "folder with eval/wikitext-2/valid.txt")
            text = path.read_text(encoding="utf-8")
            if limit is not None:  # --limit N: the first N lines
                text = "".join(text.splitlines(keepends=True)[:limit])
            out = {"metrics": evaluate_text(lm, text, batch_size=batch_size, progress=progress)}
        else:
            raise LmforgeError(f"unknown task {name!r}")
        out["metrics"]["seconds"] = round(time.perf_counter() - t0, 2)
        if not keep_predictions:
            out.pop("predictions", None)
        results["tasks"][name] = out
    return results


def results_markdown(results: dict) -> str:
    """A markdown table: one row per task and metric."""
    lines = [f"model: `{results.get('model')}` ({results.get('params', 0):,} parameters); settings: "
             + ", ".join(f"{k}={v}" for k, v in results.get("settings", {}).items()), "",
             "| task | n | metric | value | stderr |", "|---|---|---|---|---|"]
    for name, r in results["tasks"].items():
        m = r["metrics"]
        for k, v in m.items():
            if k.endswith("_stderr") or k in ("n", "seconds"):
                continue
            err = m.get(f"{k}_stderr")
            val = f"{v:.4f}" if isinstance(v, float) else str(v)
            lines.append(f"| {name} | {m.get('n', '')} | {k} | {val} | {'' if err is None else f'{err:.4f}'} |")
    return "\n".join(lines) + "\n"
