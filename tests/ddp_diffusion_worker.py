"""Run by tests/test_diffusion.py under torchrun: pretrain a tiny masked diffusion model on each DDP
rank, then write that rank's trained weights and the diffusion times it drew, for the test to compare.

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_diffusion_worker.py DATA_DIR OUT
"""
import json
import sys
from pathlib import Path

import torch

from lmforge.common import dist_info
from lmforge.models.diffusion import MaskedDiffusionLM
from lmforge.stages.pretrain import PretrainOptions, pretrain
from lmforge.train.config import TrainConfig

data_dir, out = sys.argv[1], Path(sys.argv[2])
times = []
draw = MaskedDiffusionLM.sample_times


def recorded(self, batch_size, device):
    t = draw(self, batch_size, device)
    times.append(t.tolist())
    return t


MaskedDiffusionLM.sample_times = recorded
result = pretrain(PretrainOptions(data_dir=data_dir, model="diffusion", preset="tiny", batch_size=2, seq_len=24,
                                  eval_tokens=1024),
                  TrainConfig(out_dir=str(out / "run"), max_steps=4, ckpt_every=0, eval_every=0, log_every=1,
                              warmup_steps=1, dtype="fp32", compile="off", progress=False, device="cpu"))
rank = dist_info()[0]
torch.save(result["model"].state_dict(), out / f"weights{rank}.pt")
(out / f"times{rank}.json").write_text(json.dumps(times))
