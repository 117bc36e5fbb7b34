"""Evaluation: bits per byte, benchmark tasks, text-overlap metrics, an LLM judge, report cards."""
