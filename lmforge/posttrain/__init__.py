"""Post-training: chat SFT, LoRA, tool calls, safety data, preference tuning and RL."""
