"""Inference: the cached generation engine, sampling and scoring, the tools a model calls and the
sandbox model-written code runs in, and the continuous-batching scheduler the server uses."""
