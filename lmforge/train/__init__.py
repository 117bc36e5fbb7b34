"""Training infrastructure every stage shares: the loop (Trainer, Task), the stage skeleton,
optimizers, checkpoints, distributed processes, precision and compilation policy, logs, and the
memory/FLOPs budget. The stages themselves are in lmforge/stages/."""
