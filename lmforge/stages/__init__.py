"""The training stages, in pipeline order: pretrain (any model family), sft, reward, dpo, rl (GRPO
and PPO). Each builds its data and Task and runs through lmforge/train/stage.py's skeleton; later
stages (curation, scaling sweeps) come here too."""
