"""Word embeddings trained from scratch: word2vec (skip-gram and CBOW with negative sampling) in
lmforge/embed/word2vec.py, word-vector queries in vectors.py, and the standard evaluations (Google
analogies, WordSim-353) in evaluate.py. `lmforge embed ...` is the command line (lmforge/cli/embed.py)."""
