"""Benchmark: lmforge's multiple-choice accuracy against lm-evaluation-harness on the same model.

A small model is pretrained on tinyshakespeare for a few minutes (the `cpu` preset, BPE 4096; reused
from --work when it is there) and exported to a Hugging Face folder with `lmforge.hf.export_hf`.
Then, on the first N items of HellaSwag, ARC-Easy and ARC-Challenge (local files):
  * lmforge: `lmforge.eval` on the lmforge checkpoint;
  * lm-eval: `lm_eval.simple_evaluate` with its `hf` model on the exported folder, through custom
    task YAMLs that read the same items from local JSON lines (written here from lmforge's task
    definitions, so both see identical strings), offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE).
Reports acc and acc_norm from both, the largest accuracy difference (points) and the largest
difference between the two per-choice log-likelihoods.

    pip install lm-eval   # not a project dependency
    python bench/eval_vs_lm_eval.py [--limit 500] [--budget 180] [--work /tmp/lmforge_eval_bench]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmforge.eval.harness import LmforgeModel  # noqa: E402
from lmforge.eval.multiple_choice import evaluate_multiple_choice  # noqa: E402
from lmforge.eval.tasks import default_data_root, load_mc_task  # noqa: E402

TASKS = ("hellaswag", "arc_easy", "arc_challenge")


def trained_model(work: Path, budget: float) -> Path:
    """A cpu-preset model pretrained on tinyshakespeare for `budget` seconds (reused if present)."""
    from lmforge.data.prepare import prepare_shards
    from lmforge.stages.pretrain import PretrainOptions, pretrain
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.checkpoint import list_checkpoints
    from lmforge.train.loop import TrainConfig

    run = work / "run"
    if list_checkpoints(run / "checkpoints"):
        return run
    work.mkdir(parents=True, exist_ok=True)
    text = (default_data_root() / "tinyshakespeare" / "input.txt").read_text()
    Tokenizer.train([text[: int(len(text) * 0.9)]], 4096, show_progress=False).save(work / "tok.json")
    prepare_shards(str(default_data_root() / "tinyshakespeare" / "input.txt"), work / "tok.json", work / "data",
                   val_fraction=0.1, workers=1, show_progress=False)
    print(f"pretraining the cpu preset on tinyshakespeare for {budget:.0f} s ...")
    pretrain(PretrainOptions(data_dir=str(work / "data"), preset="cpu", batch_size=8,
                             model_overrides={"dropout": 0.2}),
             TrainConfig(out_dir=str(run), max_steps=100_000, time_budget=budget, eval_every=0, ckpt_every=0,
                         progress=False, device="cpu", compile="off"))
    return run


def write_lm_eval_tasks(folder: Path, limit: int) -> None:
    """One YAML + JSON-lines file per task; query/choices/gold come from lmforge's own definitions."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in TASKS:
        items = load_mc_task(name, source="local")[:limit]
        with open(folder / f"{name}.jsonl", "w") as f:
            for it in items:
                assert len(set(it.contexts)) == 1 and all(
                    c == " " + t for c, t in zip(it.continuations, it.choice_texts))
                f.write(json.dumps({"query": it.contexts[0], "choices": it.choice_texts, "gold": it.gold}) + "\n")
        (folder / f"local_{name}.yaml").write_text(f"""task: local_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / (name + '.jsonl')}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--budget", type=float, default=180.0, help="pretraining seconds if no model is in --work")
    ap.add_argument("--work", default="/tmp/lmforge_eval_bench")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "eval_vs_lm_eval.json"))
    args = ap.parse_args()
    work = Path(args.work)
    run = trained_model(work, args.budget)
    hf_dir = work / "hf"
    if not (hf_dir / "config.json").is_file():
        from lmforge.hf import export_hf

        export_hf(run, hf_dir)
    lm = LmforgeModel.load(run)
    ours, our_lls = {}, {}
    for name in TASKS:
        t0 = time.perf_counter()
        r = evaluate_multiple_choice(lm, load_mc_task(name, source="local")[:args.limit], batch_size=32)
        m = r.metrics
        our_lls[name] = [p["loglikelihoods"] for p in r.predictions]
        ours[name] = {"acc": m["acc"], "acc_norm": m["acc_norm"], "seconds": time.perf_counter() - t0}
        print(f"lmforge  {name:14s} acc {m['acc']:.4f} acc_norm {m['acc_norm']:.4f}")

    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        sys.exit(f"lm-eval is not installed ({e}); pip install lm-eval")
    write_lm_eval_tasks(work / "lm_eval_tasks", args.limit)
    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},dtype=float32,add_bos_token=True", device="cpu",
        tasks=[f"local_{n}" for n in TASKS], task_manager=TaskManager(include_path=str(work / "lm_eval_tasks")),
        batch_size=32, num_fewshot=0, log_samples=True)
    lm_eval_seconds = time.perf_counter() - t0
    theirs, diffs, ll_diff = {}, [], 0.0
    for name in TASKS:
        r = res["results"][f"local_{name}"]
        theirs[name] = {"acc": r["acc,none"], "acc_norm": r["acc_norm,none"]}
        for sample in res["samples"][f"local_{name}"]:  # per choice: [[loglikelihood, is_greedy]]
            lls = [float(x[0][0]) for x in sample["resps"]]
            ll_diff = max(ll_diff, max(abs(a - b) for a, b in zip(lls, our_lls[name][sample["doc_id"]])))
        for k in ("acc", "acc_norm"):
            diffs.append(abs(theirs[name][k] - ours[name][k]) * 100)
        print(f"lm-eval  {name:14s} acc {theirs[name]['acc']:.4f} acc_norm {theirs[name]['acc_norm']:.4f}")
    print(f"largest per-choice log-likelihood difference: {ll_diff:.2e} nats")
    print(f"largest accuracy difference: {max(diffs):.2f} points over {args.limit} items per task "
          f"(lm-eval {lm_eval_seconds:.0f} s, lmforge {sum(o['seconds'] for o in ours.values()):.0f} s)")
    out = {"limit": args.limit, "model": str(run), "hf_dir": str(hf_dir), "lmforge": ours, "lm_eval": theirs,
           "max_diff_points": max(diffs), "max_abs_loglikelihood_diff": ll_diff,
           "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None,
           "lm_eval_seconds": lm_eval_seconds}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
