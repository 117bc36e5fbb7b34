"""Model families over one protocol (protocol.py), registered by name (registry.py):
transformer.py (the decoder-only transformer), lstm.py, ngram.py."""
