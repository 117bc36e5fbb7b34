"""Serving: an OpenAI-compatible HTTP API and a web chat page (the scheduler is in lmforge/inference/)."""
