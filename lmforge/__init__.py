"""lmforge: a complete, hackable large-language-model stack."""

__version__ = "0.1.0"
