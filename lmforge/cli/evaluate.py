"""Evaluation commands:

    lmforge eval         benchmark tasks, perplexity / bits per byte; JSON + markdown results
    lmforge judge        pairwise LLM-as-a-judge comparison of two models, both orders
    lmforge report-card  markdown summary of a run with plots
"""
from __future__ import annotations

import os
from pathlib import Path

from lmforge.cli.common import nonneg_int, positive_int


def _write_json(path: str, obj) -> None:
    from lmforge.common import atomic_write_json

    atomic_write_json(path, obj)


def cmd_eval(args):
    from lmforge.common import LmforgeError
    from lmforge.eval.harness import LmforgeModel, load_eval_model
    from lmforge.eval.run import parse_tasks, results_markdown, run_tasks

    if not args.tasks and not args.text and not args.data_dir:
        raise LmforgeError("nothing to evaluate: give --tasks (e.g. hellaswag,arc_easy), --text FILE or --data-dir DIR")
    tasks = parse_tasks(args.tasks) if args.tasks else []
    lm = load_eval_model(args.checkpoint, device=args.device, dtype=args.dtype)
    if (tasks or args.text) and isinstance(lm, LmforgeModel):
        from lmforge.models.protocol import require_text_probabilities

        require_text_probabilities(lm.model, "benchmarks and --text")
    results = run_tasks(lm, tasks, limit=args.limit, fewshot=args.fewshot, seed=args.seed,
                        batch_size=args.batch_size, data_root=args.data_root, source=args.source,
                        max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
                        keep_predictions=args.predictions, hub_mirror=args.hub_mirror)
    if args.text:
        from lmforge.eval.lm import evaluate_text_file

        for path in args.text:
            results["tasks"][f"text:{path}"] = {"metrics": evaluate_text_file(
                lm, path, stride=args.stride, batch_size=args.batch_size, progress=not args.no_progress)}
    if args.data_dir:
        from lmforge.eval.lm import evaluate_shards

        if not isinstance(lm, LmforgeModel):
            raise LmforgeError("--data-dir shards are lmforge-tokenized: evaluate an lmforge checkpoint "
                               "(for a Hugging Face model use --text)")
        results["tasks"][f"shards:{args.data_dir}@{args.split}"] = {"metrics": evaluate_shards(
            lm.model, lm.tokenizer, args.data_dir, args.split, max_tokens=args.max_tokens, batch_size=args.batch_size,
            seq_len=lm.train_seq_len, **({"draws": args.bound_draws} if args.bound_draws else {}))}
    out = Path(args.out)
    _write_json(str(out), results)
    md = results_markdown(results)
    out.with_suffix(".md").write_text(md)
    print(md, end="")
    print(f"results: {out} and {out.with_suffix('.md')}")


def _read_answers(path: str, n: int) -> list[str]:
    from lmforge.common import LmforgeError, json_lines

    p = Path(path)
    if not p.is_file():
        raise LmforgeError(f"answers file not found: {p}")
    answers = []
    for _, obj in json_lines(p.read_text().splitlines(), p):
        answers.append(obj["answer"] if isinstance(obj, dict) and "answer" in obj else obj)
    if len(answers) < n or not all(isinstance(a, str) for a in answers):
        raise LmforgeError(f"{p} must hold at least {n} answers, one JSON string or {{\"answer\": ...}} per line")
    return answers[:n]


def cmd_judge(args):
    from lmforge.common import LmforgeError
    from lmforge.eval.harness import load_eval_model
    from lmforge.eval.judge import compare, load_judge, load_mt_bench_questions, load_questions_file
    from lmforge.eval.tasks import default_data_root

    if args.questions == "mt_bench":
        questions = load_mt_bench_questions(args.data_root or default_data_root(), args.limit)
    else:
        questions = load_questions_file(args.questions, args.limit)
    answers = []
    for model, file in ((args.model_a, args.answers_a), (args.model_b, args.answers_b)):
        if (model is None) == (file is None):
            raise LmforgeError("give each side as either --model-a/--model-b or --answers-a/--answers-b")
        if file:
            answers.append(_read_answers(file, len(questions)))
        else:
            lm = load_eval_model(model, device=args.device)
            answers.append([a.strip() for a in lm.generate(questions, args.max_new_tokens, chat=args.chat)])
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    judge = load_judge(args.judge, device=args.device, model_name=args.judge_model, api_key=api_key)
    report = compare(judge, questions, answers[0], answers[1], progress=not args.no_progress)
    s = report.summary()
    s["unparsed_verdicts"] = getattr(judge, "unparsed", 0)
    _write_json(args.out, {**s, "pairs": [p.__dict__ for p in report.pairs]})
    print(f"model A vs model B over {s['n']} questions, each judged in both orders by {args.judge}")
    print(f"  A wins {s['wins']}, ties {s['ties']}, losses {s['losses']}  (win rate {s['win_rate']:.3f})")
    print(f"  judge contradicts itself when the order is swapped: {s['contradiction_rate']:.1%} "
          f"(opposite verdicts {s['flip_rate']:.1%}); picks the first answer in {s['first_position_rate']:.1%} "
          "of decisive verdicts")
    lw = s["longer_wins_rate"]
    print(f"  mean answer length: A {s['mean_length_1']:.0f} chars, B {s['mean_length_2']:.0f} chars; "
          f"the longer answer won {'–' if lw is None else f'{lw:.1%}'} of decided pairs")
    print(f"details: {args.out}")


def cmd_report_card(args):
    from lmforge.eval.report import write_report_card

    path = write_report_card(args.run, args.results, args.out)
    print(f"report card: {path}")


def add_commands(sub) -> None:
    ev = sub.add_parser("eval", help="benchmarks (HellaSwag, ARC, MMLU, GSM8K, ...), perplexity and bits per byte")
    ev.add_argument("--checkpoint", required=True, help="lmforge run/checkpoint folder or Hugging Face model folder")
    ev.add_argument("--tasks", default=None, help="comma-separated: hellaswag, arc_easy, arc_challenge, mmlu, piqa, "
                    "openbookqa, copa, winogrande, siqa, commonsense_qa, boolq, gsm8k, mt_bench_ref, wikitext")
    ev.add_argument("--limit", type=positive_int, default=None, help="only the first N items of each task")
    ev.add_argument("--fewshot", type=nonneg_int, default=0, help="solved examples before each question")
    ev.add_argument("--seed", type=int, default=1234, help="fixes the few-shot examples")
    ev.add_argument("--batch-size", type=positive_int, default=16, help="sequences per forward pass")
    ev.add_argument("--max-new-tokens", type=positive_int, default=256, help="generation length (gsm8k, mt_bench_ref)")
    ev.add_argument("--text", action="append", default=[],
                    help="perplexity / bits per byte of a text file (repeatable)")
    ev.add_argument("--stride", type=positive_int, default=None, help="--text window stride (default: the window)")
    ev.add_argument("--data-dir", default=None, help="perplexity / bits per byte of a prepared shard folder")
    ev.add_argument("--split", default="val")
    ev.add_argument("--max-tokens", type=positive_int, default=None, help="--data-dir: at most this many tokens")
    ev.add_argument("--bound-draws", type=positive_int, default=None,
                    help="--data-dir on a masked diffusion model: draws (a time and a mask each) per window of its "
                         "bound (at least 2; default lmforge.eval.lm.BOUND_DRAWS); more draws, a smaller error")
    ev.add_argument("--data-root", default=None,
                    help="benchmark data folder (default: $LMFORGE_SHARED_DATA or ../shared/data)")
    ev.add_argument("--source", choices=["auto", "local", "hub"], default="auto",
                    help="local files, the Hugging Face hub, or local when present (auto)")
    ev.add_argument("--hub-mirror", default=None, help="read hub datasets from this folder (MIRROR/owner/name, "
                    "laid out as on the hub) instead of the network (default: $LMFORGE_HUB_MIRROR)")
    ev.add_argument("--out", default="eval_results.json", help="results JSON (a .md table is written next to it)")
    ev.add_argument("--predictions", action="store_true", help="keep per-item predictions in the JSON")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=cmd_eval)

    ju = sub.add_parser("judge", help="pairwise LLM-as-a-judge comparison of two models (both orders)")
    ju.add_argument("--judge", required=True, help="lmforge checkpoint, Hugging Face folder, or an OpenAI-compatible "
                    "URL such as http://localhost:8000/v1")
    ju.add_argument("--judge-model", default="judge", help="model name sent to an endpoint judge")
    ju.add_argument("--api-key-env", default=None, help="environment variable holding the endpoint's API key")
    ju.add_argument("--model-a", default=None, help="model whose answers are judged (or --answers-a)")
    ju.add_argument("--model-b", default=None)
    ju.add_argument("--answers-a", default=None,
                    help="JSON lines: one answer string (or {\"answer\": ...}) per question")
    ju.add_argument("--answers-b", default=None)
    ju.add_argument("--questions", default="mt_bench",
                    help="mt_bench (first turns) or a JSON-lines file of {\"question\": ...}")
    ju.add_argument("--limit", type=positive_int, default=None)
    ju.add_argument("--chat", action="store_true", help="ask the models through their chat template")
    ju.add_argument("--max-new-tokens", type=positive_int, default=128)
    ju.add_argument("--data-root", default=None)
    ju.add_argument("--out", default="judge_results.json")
    ju.add_argument("--device", default="cpu")
    ju.add_argument("--no-progress", action="store_true")
    ju.set_defaults(func=cmd_judge)

    rc = sub.add_parser("report-card", help="markdown summary of a run and its eval results, with plots")
    rc.add_argument("--run", default=None, help="run folder (checkpoints, log.jsonl)")
    rc.add_argument("--results", required=True, help="JSON written by `lmforge eval`")
    rc.add_argument("--out", required=True, help="folder for report.md and the PNGs")
    rc.set_defaults(func=cmd_report_card)
