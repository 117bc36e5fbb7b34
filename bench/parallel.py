"""Benchmark: parallelism at 2 processes: pipeline schedules' idle time against theory, and what each
process holds and how long a step takes, DDP against FSDP2.

Pipeline: the `cpu` preset cut into two stages of two blocks (GPT.pipeline_stage), a global batch of
16 x 256 in m micro-batches, GPipe and 1F1B. Idle fraction = 1 - (m x the time the slower stage
takes for one micro-batch alone, forward + backward) / the measured step time; the theory for p
stages is (p - 1) / (m + p - 1). Communication and the stages' imbalance count as idle here.

For the `cpu` preset and the GPT-2-small-shaped `gpt2-classic` preset (124M), two gloo processes on
this CPU each train a few steps on random tokens (batch 4 x 256 per process, Muon + AdamW as in
pretraining, fp32), wrapped by DDP (every process holds everything) or sharded by FSDP2
(`lmforge.train.parallel.shard_model`). Reported per process: parameter + gradient + optimizer-state
bytes it holds after a step, its peak RSS, and the median step time. The same script measures one
process alone as the reference. Each configuration runs in fresh processes.

Then an FSDP2 checkpoint of the last preset, saved either way: gathered whole to the first process
(`--checkpoint-format full`) or each process writing its own shards with torch.distributed.checkpoint
(`sharded`): save time and how far saving raises each process's peak RSS.

    python bench/parallel.py [--presets cpu gpt2-classic] [--steps 6] [--pipeline-only | --no-pipeline]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, os, resource, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import torch, torch.distributed as dist
from lmforge.models.transformer import GPT, get_config
from lmforge.train.optim import build_optimizers
from lmforge.train.parallel import shard_model

preset, mode, steps = sys.argv[2], sys.argv[3], int(sys.argv[4])
world = int(os.environ.get("WORLD_SIZE", "1"))
if world > 1:
    dist.init_process_group("gloo")
rank = dist.get_rank() if world > 1 else 0
torch.manual_seed(0)
model = GPT(get_config(preset, vocab_size=50304 if preset == "gpt2-classic" else 4096, block_size=256))
if mode == "fsdp":
    shard_model(model, world, "cpu")
    step_model = model
elif mode == "ddp":
    from torch.nn.parallel import DistributedDataParallel as DDP
    step_model = DDP(model)
else:
    step_model = model
opts = build_optimizers(model, name="muon", lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), muon_lr=0.02,
                        muon_momentum=0.95)
g = torch.Generator().manual_seed(rank)
times = []
for _ in range(steps):
    x = torch.randint(0, model.config.vocab_size, (4, 256), generator=g)
    t0 = time.perf_counter()
    step_model(x, x).backward()
    for o in opts:
        o.step()
    held = sum(t.numel() * t.element_size() for t in (
        [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
        + [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in model.parameters()
           if p.grad is not None]
        + [v.to_local() if hasattr(v, "to_local") else v for o in opts for s in o.state.values()
           for v in s.values() if torch.is_tensor(v)]))
    for o in opts:
        o.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t0)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
report = {"rank": rank, "held_mib": held / 2**20, "rss_mib": rss, "step_s": statistics.median(times[1:])}
if len(sys.argv) > 5:  # then save a checkpoint the given way: its time and how far it raises the peak RSS
    from lmforge.train import checkpoint as ckpt_io
    from lmforge.train.parallel import full_optimizer_state, full_state_dict
    root = sys.argv[5]
    dist.barrier()
    t0 = time.perf_counter()
    if sys.argv[6] == "sharded":
        ckpt_io.save_sharded_checkpoint(root, 1, model, opts, {})
    else:
        full, states = full_state_dict(model), [full_optimizer_state(o) for o in opts]
        if rank == 0:
            ckpt_io.save_checkpoint(root, 1, model, states, {}, state_dict=full)
        dist.barrier()
    report["save_s"] = time.perf_counter() - t0
    report["save_peak_rise_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss
open(f"{os.environ['BENCH_OUT']}.{rank}", "w").write(json.dumps(report))  # not stdout: ranks' lines interleave
if world > 1:
    dist.destroy_process_group()
"""


PIPE_WORKER = r"""
import json, os, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import torch, torch.distributed as dist, torch.nn.functional as F
from lmforge.models.transformer import GPT, get_config
from lmforge.train.parallel import pipeline

schedule_name, m, batch = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
cfg = get_config("cpu", vocab_size=4096)
x = torch.randint(0, 4096, (batch, 256), generator=torch.Generator().manual_seed(0))

def loss_fn(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))

torch.manual_seed(0)
model = GPT(cfg)
schedule, stage = pipeline(model, rank, world, n_microbatches=m, loss_fn=loss_fn, schedule=schedule_name)
# This stage's own work on one micro-batch, alone: forward and backward, no communication.
mb = x[: batch // m]
inp = mb if rank == 0 else torch.randn(batch // m, 256, cfg.n_embd, requires_grad=True)
alone = []
for _ in range(4):
    t0 = time.perf_counter()
    out = stage(inp)
    (loss_fn(out, mb) if rank == world - 1 else out.square().mean()).backward()
    alone.append(time.perf_counter() - t0)
model.zero_grad()
steps = []
for _ in range(4):
    dist.barrier()
    t0 = time.perf_counter()
    if rank == 0:
        schedule.step(x)
    else:
        schedule.step(target=x, losses=[])
    steps.append(time.perf_counter() - t0)
    model.zero_grad()
t_mb, t_step = statistics.median(alone[1:]), statistics.median(steps[1:])
open(f"{os.environ['BENCH_OUT']}.{rank}", "w").write(json.dumps({"rank": rank, "busy": m * t_mb, "step": t_step}))
dist.destroy_process_group()
"""


def run_pipeline(schedule: str, m: int, batch: int) -> list[dict]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = Path("/tmp") / "lmforge_pipeline_worker.py"
    script.write_text(PIPE_WORKER)
    return _reports([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                     str(script), str(REPO), schedule, str(m), str(batch)])


def _reports(cmd: list[str]) -> list[dict]:
    """Run a benchmark job; each of its processes writes its report to BENCH_OUT.<rank>."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report"
        subprocess.run(cmd, capture_output=True, text=True, check=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1", BENCH_OUT=str(out)))
        return sorted((json.loads(f.read_text()) for f in Path(tmp).glob("report.*")), key=lambda d: d["rank"])


def run(preset: str, mode: str, steps: int, *save) -> list[dict]:
    if mode == "single":
        cmd = [sys.executable, "-c", WORKER, str(REPO), preset, mode, str(steps)]
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        script = Path("/tmp") / "lmforge_parallel_worker.py"
        script.write_text(WORKER)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               str(script), str(REPO), preset, mode, str(steps), *save]
    return _reports(cmd)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["cpu", "gpt2-classic"])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--pipeline-only", action="store_true")
    ap.add_argument("--no-pipeline", action="store_true")
    args = ap.parse_args()
    if not args.no_pipeline:
        pipeline_table()
    if args.pipeline_only:
        return
    memory_table(args)


def pipeline_table():
    print("| schedule | micro-batches m | step s | busy s (m x one micro-batch alone, slower stage) "
          "| measured idle fraction | theory (p-1)/(m+p-1) |")
    print("|---|---|---|---|---|---|")
    for schedule in ("gpipe", "1f1b"):
        for m in (1, 2, 4, 8) if schedule == "gpipe" else (2, 4, 8):  # 1F1B needs m >= stages
            rows = run_pipeline(schedule, m, 16)
            step = max(r["step"] for r in rows)
            busy = max(r["busy"] for r in rows)
            print(f"| {schedule} | {m} | {step:.3f} | {busy:.3f} | {1 - busy / step:.2f} | {1 / (m + 1):.2f} |",
                  flush=True)


def memory_table(args):
    print("| preset | how | processes | held per process MiB (params + grads + optimizer) | peak RSS MiB | step s |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        for mode in ("single", "ddp", "fsdp"):
            rows = run(preset, mode, args.steps)
            held = max(r["held_mib"] for r in rows)
            rss = max(r["rss_mib"] for r in rows)
            step = max(r["step_s"] for r in rows)
            print(f"| {preset} | {mode} | {len(rows)} | {held:,.1f} | {rss:,.0f} | {step:.3f} |", flush=True)
    print("\nFSDP2 checkpoint of the last preset at 2 processes: gathered to the first process (full) or each "
          "process writing its shards (sharded)")
    print("| checkpoint | save s | peak RSS rise per process MiB (first, second) |")
    print("|---|---|---|")
    import tempfile

    for how in ("full", "sharded"):
        with tempfile.TemporaryDirectory() as root:
            rows = run(args.presets[-1], "fsdp", 2, root, how)
        rises = ", ".join(f"{r['save_peak_rise_mib']:,.0f}" for r in rows)
        print(f"| {how} | {max(r['save_s'] for r in rows):.2f} | {rises} |", flush=True)


if __name__ == "__main__":
    main()
