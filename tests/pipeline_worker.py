"""Run by tests/test_parallel.py under torchrun (2 gloo processes): one pipeline-parallel step with each
schedule, against the whole model in one process: the loss and this stage's gradients.

    python -m torch.distributed.run --nproc_per_node=2 tests/pipeline_worker.py OUT
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lmforge.models.transformer import GPT, get_config
from lmforge.train.parallel import pipeline

out = Path(sys.argv[1])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
cfg = get_config("tiny", vocab_size=300, n_layer=4)
x = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(1))
y = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(2))


def loss_fn(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


torch.manual_seed(0)
whole = GPT(cfg)
whole(x, y).backward()  # the reference: one process, the whole batch
want = {n: p.grad for n, p in whole.named_parameters()}
report = {}
for name in ("gpipe", "1f1b"):
    torch.manual_seed(0)
    model = GPT(cfg)
    schedule, stage = pipeline(model, rank, world, n_microbatches=4, loss_fn=loss_fn, schedule=name)
    losses = []
    if rank == 0:
        schedule.step(x)
    else:
        schedule.step(target=y, losses=losses)
    mine = {n for n, p in model.named_parameters() if any(p is q for q in stage.parameters())}
    report[name] = {
        "loss": torch.stack(losses).mean().item() if losses else None,
        "want_loss": whole(x, y).item(),
        "params": len(mine),
        "max_grad_diff": max((model.get_parameter(n).grad - want[n]).abs().max().item() for n in mine),
        "others_have_no_grad": all(p.grad is None for n, p in model.named_parameters() if n not in mine),
    }
(out / f"pipe{rank}.json").write_text(json.dumps(report))
dist.destroy_process_group()
