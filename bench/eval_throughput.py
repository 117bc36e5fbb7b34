"""Benchmark: multiple-choice scoring throughput, lmforge vs a direct transformers loop, one run.

The same model (the `cpu` preset; the one bench/eval_vs_lm_eval.py trains if it is in --work,
else a random one with a BPE tokenizer trained here) scores the first N questions of HellaSwag,
ARC-Easy and MMLU three ways:
  1. direct transformers: one forward pass per (context, choice), the plain loop, on the model
     exported to a Hugging Face folder;
  2. lmforge.eval with the HFModel adapter on that folder (same transformers forward, batched:
     requests sorted by length, the four choices of a question side by side in one batch);
  3. lmforge.eval on the lmforge checkpoint itself (batched rows, and each shared context run
     once through the KV cache when the answers are short next to it: ARC, MMLU).
Reports examples (questions) per second, the speed-up over (1), and the largest difference of a
choice's log-likelihood from (1) (they must agree: same model, same strings).

    python bench/eval_throughput.py [--items 200] [--tasks hellaswag,arc_easy,mmlu] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmforge.eval.harness import HFModel, LmforgeModel, loglikelihoods  # noqa: E402
from lmforge.eval.tasks import default_data_root, load_mc_task  # noqa: E402


def model_folders(work: Path) -> tuple[Path, Path]:
    """(lmforge checkpoint, HF folder): the trained benchmark model if present, else a random one."""
    from lmforge.hf import export_hf

    run, hf = work / "run", work / "hf"
    if (hf / "config.json").is_file():
        return run, hf
    from lmforge.models.transformer import GPT, get_config
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.checkpoint import save_checkpoint

    run, hf = work / "random_run", work / "random_hf"
    if not (hf / "config.json").is_file():
        text = (default_data_root() / "tinyshakespeare" / "input.txt").read_text()
        tok = Tokenizer.train([text], 4096, show_progress=False)
        torch.manual_seed(0)
        model = GPT(get_config("cpu", vocab_size=tok.vocab_size))
        tok.save(work / "random_tok.json")
        save_checkpoint(run / "checkpoints", 0, model, state={"tokenizer_fingerprint": tok.fingerprint},
                        files={"tokenizer.json": (work / "random_tok.json").read_bytes()})
        export_hf(run, hf)
    return run, hf


@torch.inference_mode()
def direct_transformers(hf_dir: Path, requests, max_length: int) -> list[float]:
    """The plain loop: per request, tokenize (lm-eval's split), one forward, sum the log-probs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    out = []
    for ctx, cont in requests:
        ctx_ids = tok(ctx)["input_ids"]
        whole = tok(ctx + cont)["input_ids"]
        n = len(whole) - len(ctx_ids)
        seq = whole[-(max_length + 1):]
        logp = torch.log_softmax(model(torch.tensor([seq[:-1]])).logits[0, -n:].float(), -1)
        out.append(float(logp.gather(1, torch.tensor(seq[-n:])[:, None]).sum()))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=200, help="questions per task")
    ap.add_argument("--tasks", default="hellaswag,arc_easy,mmlu")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    ap.add_argument("--work", default="/tmp/lmforge_eval_bench")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "eval_throughput.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    run, hf_dir = model_folders(work)
    lm = LmforgeModel.load(run)
    hf = HFModel(hf_dir)
    print(f"model {hf_dir} ({lm.model.num_params() / 1e6:.2f}M params, window {lm.max_length}), "
          f"{args.threads} thread(s), batch {args.batch_size}, first {args.items} questions per task")
    out = {"items": args.items, "threads": args.threads, "batch_size": args.batch_size, "model": str(hf_dir),
           "tasks": {}}
    for task in args.tasks.split(","):
        items = load_mc_task(task, source="local")[:args.items]
        requests = [(c, t) for it in items for c, t in zip(it.contexts, it.continuations)]
        # warm-up (allocator, lazy init) on a few requests, not timed
        loglikelihoods(lm, requests[:8], batch_size=8)
        direct_transformers(hf_dir, requests[:4], lm.max_length)
        runs = {
            "direct transformers loop":
                lambda requests=requests: direct_transformers(hf_dir, requests, lm.max_length),
            "lmforge.eval, HF adapter (batched rows)":
                lambda requests=requests: [
                    r.logprob for r in loglikelihoods(hf, requests, batch_size=args.batch_size)],
            "lmforge.eval, lmforge checkpoint":
                lambda requests=requests: [
                    r.logprob for r in loglikelihoods(lm, requests, batch_size=args.batch_size)],
        }
        timings, lls = {}, {}
        for name, fn in runs.items():
            t0 = time.perf_counter()
            lls[name] = fn()
            timings[name] = time.perf_counter() - t0
        base = timings["direct transformers loop"]
        print(f"{task}: {len(items)} questions, {len(requests)} choices")
        rows = {}
        for name, sec in timings.items():
            diff = max(abs(a - b) for a, b in zip(lls[name], lls["direct transformers loop"]))
            rows[name] = {"seconds": sec, "examples_per_s": len(items) / sec, "speedup": base / sec,
                          "max_abs_ll_diff_vs_direct": diff}
            print(f"  {name:42s} {len(items) / sec:7.1f} examples/s  ({base / sec:.2f}x)  max |dll| {diff:.1e}")
        out["tasks"][task] = rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
