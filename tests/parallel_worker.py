"""Run by tests/test_parallel.py under torchrun (2 gloo processes): tensor parallelism's logits
against the whole model's, and what FSDP2 leaves each rank to hold.

    python -m torch.distributed.run --nproc_per_node=2 tests/parallel_worker.py OUT
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lmforge.models.transformer import GPT, get_config
from lmforge.train.optim import build_optimizers
from lmforge.train.parallel import local_numel, shard_model, tensor_parallel

out = Path(sys.argv[1])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
cfg = get_config("tiny", vocab_size=300, n_head=4, n_kv_head=2)
ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
report = {}

torch.manual_seed(0)
whole = GPT(cfg).eval()
with torch.no_grad():
    want = whole(ids)
torch.manual_seed(0)
split = tensor_parallel(GPT(cfg).eval(), world, "cpu")
with torch.no_grad():
    got = split(ids)
report["tp_max_abs_diff"] = (got - want).abs().max().item()
report["tp_local_q_rows"] = split.layers[0].self_attn.q_proj.weight.to_local().shape[0]

torch.manual_seed(0)
model = GPT(get_config("cpu", vocab_size=512))
full = local_numel(model)
shard_model(model, world, "cpu")
opts = build_optimizers(model, name="muon", lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), muon_lr=0.02,
                        muon_momentum=0.95)
x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(rank))
model(x, x).backward()
for o in opts:
    o.step()
grads = sum(p.grad.to_local().numel() for p in model.parameters() if p.grad is not None)
state = sum(v.to_local().numel() if hasattr(v, "to_local") else v.numel()
            for o in opts for s in o.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
report.update(full_params=full, local_params=local_numel(model), local_grads=grads, local_optimizer_state=state)

# FSDP2's mixed precision: blocks gathered and computed in bf16, the shards and their gradients fp32
torch.manual_seed(0)
model = shard_model(GPT(get_config("tiny", vocab_size=300)), world, "cpu", param_dtype=torch.bfloat16)
seen = []
model.layers[0].mlp.register_forward_pre_hook(lambda m, args: seen.append(str(m.up_proj.weight.dtype)))
model(ids, ids).backward()
report["mp_gathered_dtype"] = seen[0]
report["mp_shard_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
report["mp_grad_dtypes"] = sorted({str(p.grad.dtype) for p in model.parameters()})
(out / f"rank{rank}.json").write_text(json.dumps(report))
dist.destroy_process_group()
