"""Retrieval and its evaluation: test collections (SQuAD v1.1 dev as paragraph retrieval, BEIR-layout
folders such as SciFact), BM25 (bm25s), dense retrieval with exact inner-product search (numpy or
faiss) over any `encode(texts) -> vectors` encoder (all-MiniLM-L6-v2 through sentence-transformers),
and the ranking metrics recall@k, MRR@k and nDCG@k. See docs/retrieval.md.

    datasets.py   load_squad, load_beir, load_dataset("squad" | "scifact" | PATH), subsample
    metrics.py    evaluate_run(run, qrels, ["recall@5", "mrr@10", "ndcg@10"]) and its conventions
    bm25.py       BM25Retriever
    dense.py      DenseRetriever, MiniLMEncoder, SentenceTransformerEncoder
    evaluate.py   evaluate_retriever: run, metrics, queries/s, index build time
"""
