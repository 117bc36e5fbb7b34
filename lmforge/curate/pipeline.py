"""The curation run: raw web files in, curated jsonl out, every decision counted.

Two phases, so that the expensive part runs anywhere and the part that needs every document runs once:

1. **Per input file** (a *task*; in parallel worker processes, or one slice of them per machine with
   `--shard i/n`): extract the main text, identify the language, apply the Gopher, C4 and FineWeb
   rules, scrub PII and compute the deduplication signature. A task writes its folder
   `DIR/tasks/<t>/` (surviving documents, removed documents with the reason, measured features,
   signatures) and, last, `stats.json`: a task with that file is finished and is never redone.
2. **Once, over all tasks**: exact and near-duplicate removal across the whole corpus, the model-based
   quality score, and the output `DIR/curated/part-<t>.jsonl` (the format `lmforge data prepare`
   reads) with `DIR/report.md`. This phase is cheap next to the first and is simply redone.

`DIR/curate.json` records the inputs and the settings of phase 1; a re-run with other inputs or
other phase-1 settings is refused rather than mixing two corpora's tasks. Phase-2 settings (the
quality model's threshold, ...) may change between runs.
"""
from __future__ import annotations

import heapq
import json
import os
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.common import LmforgeError, atomic_write_bytes, atomic_write_json, read_json
from lmforge.curate.config import CurateConfig
from lmforge.curate.types import StepCount, StepResult

RUN_FORMAT = "lmforge-curate"
TASK_FORMAT = "lmforge-curate-task"
VERSION = 1
SNIPPET_CHARS = 300  # how much of a removed document the report may quote

# The per-document steps, in the order FineWeb runs them (extraction comes first, in the reader).
DOC_STEPS = ("language", "gopher_repetition", "gopher_quality", "c4", "fineweb", "pii")
# Settings that change what phase 1 writes; the others only change phase 2.
PHASE1_STEPS = ("extract",) + DOC_STEPS + ("dedup",)


def _step_function(name: str):
    from lmforge.curate import filters, language, pii

    return {
        "language": language.identify_language,
        "gopher_repetition": filters.gopher_repetition,
        "gopher_quality": filters.gopher_quality,
        "c4": filters.c4_lines,
        "fineweb": filters.fineweb,
        "pii": pii.scrub_pii,
    }[name]


def parse_shard(spec: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(p) for p in spec.split("/"))
    except ValueError:
        raise LmforgeError(f"--shard must look like i/n (e.g. 0/4), got {spec!r}") from None
    if n < 1 or not 0 <= i < n:
        raise LmforgeError(f"--shard {spec}: need 0 <= i < n")
    return i, n


def _phase1_settings(cfg: CurateConfig) -> dict:
    d = cfg.to_dict()
    return {k: d[k] for k in PHASE1_STEPS}


def _open_run(out: Path, inputs: list[Path], cfg: CurateConfig) -> None:
    record = {
        "format": RUN_FORMAT,
        "version": VERSION,
        "inputs": [[str(p), p.stat().st_size] for p in inputs],
        "phase1": _phase1_settings(cfg),
    }
    path = out / "curate.json"
    if path.exists():
        old = read_json(path, "curation run", fmt=RUN_FORMAT, version=VERSION)
        # JSON round trip so tuples compare equal to the lists they were saved as
        if json.loads(json.dumps(record)) != {k: old.get(k) for k in record}:
            changed = "inputs" if old.get("inputs") != json.loads(json.dumps(record["inputs"])) else "settings"
            raise LmforgeError(f"{out} holds a curation run with other {changed}; use a new --out or delete it")
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)


# -- phase 1: one input file ------------------------------------------------------------------------

PROGRESS_EVERY = 200  # documents between calls of run_task's `progress`


def run_task(index: int, path: str, cfg_dict: dict, out: str, progress=None) -> dict:
    """Curate one input file into DIR/tasks/<index>/; returns its stats (also written, last).
    `progress(documents read so far)`, if given, is called every PROGRESS_EVERY documents:
    a single big WARC file takes minutes, and the progress bar would otherwise stand still."""
    from lmforge.curate.dedup import dedup_signature, save_signatures
    from lmforge.curate.extract import ExtractCounts, iter_raw

    cfg = CurateConfig.from_dict(cfg_dict)
    folder = Path(out) / "tasks" / f"{index:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    steps = [(name, _step_function(name), getattr(cfg, name)) for name in DOC_STEPS if getattr(cfg, name).enabled]
    counts = {name: StepCount() for name, _, _ in steps}
    features: dict[str, list[float]] = defaultdict(list)
    keys, signatures = [], []
    extract_counts = ExtractCounts()
    start = time.perf_counter()
    kept_tmp, removed_tmp = folder / ".docs.jsonl.tmp", folder / ".removed.jsonl.tmp"
    with open(kept_tmp, "w", encoding="utf-8") as kept, open(removed_tmp, "w", encoding="utf-8") as removed:
        for n, doc in enumerate(iter_raw(Path(path), cfg.extract, extract_counts)):
            if progress is not None and n % PROGRESS_EVERY == 0:
                progress(n)
            key = f"{index}:{n}"  # unique in the run whatever ids the input carries
            text = doc["text"]
            for name, step, step_cfg in steps:
                count = counts[name]
                size = len(text.encode("utf-8", "replace"))
                count.docs_in += 1
                count.bytes_in += size
                try:
                    result = step(text, step_cfg)
                except Exception as e:  # one odd document must not end a long run; it is counted
                    result = StepResult(text, f"error:{type(e).__name__}", {})
                for feature, value in result.features.items():
                    features[f"{name}.{feature}"].append(float(value))
                if result.reason is not None:
                    count.reasons[result.reason] += 1
                    removed.write(json.dumps({
                        "key": key, "id": doc["id"], "source": doc["source"], "step": name,
                        "reason": result.reason, "bytes": size, "snippet": text[:SNIPPET_CHARS],
                    }, ensure_ascii=False) + "\n")
                    break
                text = result.text
                count.docs_out += 1
                count.bytes_out += len(text.encode("utf-8", "replace"))
                _record_meta(doc["meta"], name, result, step_cfg)
            else:
                doc["text"] = text
                doc["key"] = key
                kept.write(json.dumps(doc, ensure_ascii=False) + "\n")
                if cfg.dedup.enabled:
                    keys.append(key)
                    signatures.append(dedup_signature(text, cfg.dedup))
    os.replace(kept_tmp, folder / "docs.jsonl")
    os.replace(removed_tmp, folder / "removed.jsonl")
    save_signatures(folder / "signatures.npz", keys, signatures)
    buf = _npz_bytes({k: np.asarray(v, dtype=np.float32) for k, v in features.items()})
    atomic_write_bytes(folder / "features.npz", buf)
    stats = {
        "format": TASK_FORMAT,
        "version": VERSION,
        "input": str(path),
        "input_bytes": Path(path).stat().st_size,
        "extract": extract_counts.to_dict(),
        "steps": {name: c.to_dict() for name, c in counts.items()},
        "seconds": time.perf_counter() - start,
    }
    atomic_write_json(folder / "stats.json", stats)  # last: its presence marks the task finished
    return stats


def _record_meta(meta: dict, step: str, result: StepResult, step_cfg) -> None:
    """What later stages and users want to see of a step on the document itself."""
    if step == "language":
        from lmforge.curate.language import language_meta

        meta.update(language_meta(result.text, step_cfg))  # cached: the step just classified this text


def _npz_bytes(arrays: dict) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _task_done(out: Path, index: int) -> bool:
    return (out / "tasks" / f"{index:05d}" / "stats.json").is_file()


def run_tasks(inputs: list[Path], out: Path, cfg: CurateConfig, todo: list[int], workers: int,
              show_progress: bool) -> None:
    """Phase 1 for the task indices in `todo`, `workers` at a time, with a progress bar over input bytes."""
    from tqdm import tqdm

    sizes = {t: inputs[t].stat().st_size for t in todo}
    bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="curating", disable=not show_progress,
               dynamic_ncols=True)
    cfg_dict = cfg.to_dict()
    try:
        if workers <= 1 or len(todo) <= 1:
            for t in todo:
                run_task(t, str(inputs[t]), cfg_dict, str(out), progress=lambda n: bar.set_postfix(documents=n))
                bar.update(sizes[t])
            return
        from concurrent.futures import ProcessPoolExecutor, as_completed
        from multiprocessing import get_context

        # spawn, not fork: the parent may hold threads (torch, tqdm) that a fork would copy mid-lock
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(run_task, t, str(inputs[t]), cfg_dict, str(out)): t for t in todo}
            for future in as_completed(futures):
                future.result()
                bar.update(sizes[futures[future]])
    finally:
        bar.close()


# -- phase 2: the whole corpus ----------------------------------------------------------------------

def _iter_task_docs(out: Path, index: int):
    with open(out / "tasks" / f"{index:05d}" / "docs.jsonl", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def deduplicate(out: Path, n_tasks: int, cfg: CurateConfig):
    """The duplicates across every task (None when dedup is off)."""
    from lmforge.curate.dedup import SignatureBatch, find_duplicates, load_signatures

    if not cfg.dedup.enabled:
        return None
    keys, batches = [], []
    for t in range(n_tasks):
        k, batch = load_signatures(out / "tasks" / f"{t:05d}" / "signatures.npz")
        keys.extend(k)
        batches.append(batch)
    signatures = SignatureBatch.concat(batches)
    return find_duplicates(keys, signatures, cfg.dedup)


def _fold(key: str) -> int:
    return zlib.crc32(key.encode()) & 1


def quality_scores(out: Path, n_tasks: int, cfg: CurateConfig, dropped: set[str], seed: int = 0):
    """P(reference) of every surviving document, keyed by document key, and the fold models' metrics.

    Cross-fitted: the web documents are split in two folds by a hash of their key; the model trained
    with one fold's documents as negatives scores the other fold, so no document is scored by a model
    that saw it (a model scores its own training negatives too low, which would bias the cut)."""
    from lmforge.curate.quality import QualityClassifier, reference_texts

    qcfg = cfg.quality_model
    positives = reference_texts(qcfg)
    models, metrics = [], []
    for f in (0, 1):
        # a sample of the fold, drawn while streaming: at most max_train_docs texts in memory
        fold = ((zlib.crc32(f"{seed}#{d['key']}".encode()), d["text"]) for t in range(n_tasks)
                for d in _iter_task_docs(out, t) if d["key"] not in dropped and _fold(d["key"]) == f)
        negatives = [text for _, text in heapq.nsmallest(qcfg.max_train_docs, fold, key=lambda x: x[0])]
        if not negatives:
            models.append(None)
            continue
        model = QualityClassifier.train(positives, negatives, qcfg, seed=seed + f)
        model.save(out / "quality_model" / f"fold{f}")
        models.append(model)
        metrics.append(model.metrics)
    scores: dict[str, float] = {}
    for t in range(n_tasks):
        docs = [d for d in _iter_task_docs(out, t) if d["key"] not in dropped]
        for f in (0, 1):
            part = [d for d in docs if _fold(d["key"]) == f]
            scorer = models[1 - f] or models[f]
            if part and scorer is not None:
                for d, s in zip(part, scorer.score([d["text"] for d in part])):
                    scores[d["key"]] = float(s)
    return scores, metrics


@dataclass
class CurateSummary:
    out: Path
    tasks: int
    tasks_done: int
    finished: bool  # phase 2 ran and DIR/curated is complete
    docs_out: int = 0
    bytes_out: int = 0


def curate(inputs, out, cfg: CurateConfig | None = None, *, workers: int | None = None,
           shard: tuple[int, int] | None = None, show_progress: bool = True, plots: bool = True) -> CurateSummary:
    """Curate the input files into `out` (see the module docstring). With `shard=(i, n)` only phase 1
    of every n-th task runs; the run without a shard, once all are done, does phase 2."""
    from lmforge.curate.extract import list_inputs

    cfg = cfg or CurateConfig()
    out = Path(out)
    files = list_inputs(inputs)
    if not files:
        raise LmforgeError("no input files to curate")
    _open_run(out, files, cfg)
    if cfg.quality_model.enabled and not cfg.quality_model.reference:
        raise LmforgeError("the quality model needs reference text: set [quality_model] reference = [paths] "
                           "(or --reference)")
    mine = range(len(files)) if shard is None else range(shard[0], len(files), shard[1])
    todo = [t for t in mine if not _task_done(out, t)]
    workers = max(1, workers or min(os.cpu_count() or 1, len(todo) or 1))
    if todo:
        run_tasks(files, out, cfg, todo, workers, show_progress)
    done = sum(_task_done(out, t) for t in range(len(files)))
    if shard is not None or done < len(files):
        return CurateSummary(out, len(files), done, finished=False)
    return finish(out, len(files), cfg, plots=plots)


def finish(out: Path, n_tasks: int, cfg: CurateConfig, plots: bool = True) -> CurateSummary:
    """Phase 2: dedup across tasks, quality scores, the curated output and the report."""
    from lmforge.curate.quality import quality_keep
    from lmforge.curate.report import write_report

    dedup = deduplicate(out, n_tasks, cfg)
    dropped: dict[str, tuple[str, str]] = {}  # key -> (step, reason)
    if dedup is not None:
        for key, reason in dedup.removed.items():
            dropped[key] = ("dedup", reason)
    scores, metrics = ({}, [])
    if cfg.quality_model.enabled:
        scores, metrics = quality_scores(out, n_tasks, cfg, set(dropped))
        ordered = sorted(scores)
        keep = quality_keep(np.array([scores[k] for k in ordered]), cfg.quality_model)
        for k, kept in zip(ordered, keep):
            if not kept:
                dropped[k] = ("quality_model", "quality_score")
    counts = {name: StepCount() for name in ("dedup", "quality_model")}
    removed_examples: dict[tuple[str, str], list[dict]] = defaultdict(list)
    docs_out = bytes_out = 0
    (out / "curated").mkdir(exist_ok=True)
    in_clusters = dedup.cluster if dedup is not None else {}
    where: dict[str, str] = {}  # key -> source of each document in a duplicate cluster
    removed_tmp = out / ".removed.jsonl.tmp"
    with open(removed_tmp, "w", encoding="utf-8") as removed_file:
        for t in range(n_tasks):
            lines = []
            for doc in _iter_task_docs(out, t):
                key = doc.pop("key")
                size = len(doc["text"].encode("utf-8", "replace"))
                if key in in_clusters:
                    where[key] = doc["source"]
                if key in scores:
                    doc["meta"]["quality_score"] = round(scores[key], 4)
                for name in counts:
                    if name == "dedup" and dedup is None or name == "quality_model" and not cfg.quality_model.enabled:
                        continue
                    counts[name].docs_in += 1
                    counts[name].bytes_in += size
                    step, reason = dropped.get(key, (None, None))
                    if step == name:
                        record = {"key": key, "id": doc["id"], "source": doc["source"], "step": name, "reason": reason,
                                  "bytes": size, "snippet": doc["text"][:SNIPPET_CHARS]}
                        if name == "dedup":  # the kept copy comes first in input order: already seen
                            record.update(kept=where.get(dedup.kept_id[key]), jaccard=round(dedup.similarity[key], 4))
                        else:
                            record.update(quality_score=round(scores[key], 4))
                        removed_file.write(json.dumps(record, ensure_ascii=False) + "\n")
                        counts[name].reasons[reason] += 1
                        if len(removed_examples[(name, reason)]) < 5:
                            removed_examples[(name, reason)].append(record)
                        break
                    counts[name].docs_out += 1
                    counts[name].bytes_out += size
                else:
                    lines.append(json.dumps(doc, ensure_ascii=False))
                    docs_out += 1
                    bytes_out += size
            text = "\n".join(lines) + "\n" if lines else ""
            atomic_write_bytes(out / "curated" / f"part-{t:05d}.jsonl", text.encode())
    os.replace(removed_tmp, out / "removed.jsonl")  # what dedup and the quality model removed, and why
    global_counts = {name: c.to_dict() for name, c in counts.items() if c.docs_in}
    write_report(out, n_tasks, cfg, global_counts, dict(removed_examples), dedup, scores, metrics, plots=plots)
    return CurateSummary(out, n_tasks, n_tasks, finished=True, docs_out=docs_out, bytes_out=bytes_out)
