"""Data pipeline: document sources -> tokenized shards -> memory-mapped training batches."""
from lmforge.data.loader import BatchLoader, TokenSplit, eval_batches
from lmforge.data.prepare import MANIFEST_NAME, load_manifest, prepare_shards, split_documents
from lmforge.data.sources import (
    SUPPORTED_SUFFIXES,
    SourceStats,
    iter_documents,
    iter_file,
    iter_hf_dataset,
    parse_hf_spec,
    stdlib_files,
)

__all__ = [
    "BatchLoader",
    "MANIFEST_NAME",
    "SUPPORTED_SUFFIXES",
    "SourceStats",
    "TokenSplit",
    "eval_batches",
    "iter_documents",
    "iter_file",
    "iter_hf_dataset",
    "load_manifest",
    "parse_hf_spec",
    "prepare_shards",
    "split_documents",
    "stdlib_files",
]
