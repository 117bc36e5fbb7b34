"""Post-training data and transforms: chat conversations and their sources, synthetic tasks with
checkable answers, safety data, preference pairs and their batches, and LoRA. The stages that
train on them are in lmforge/stages/."""
