"""Hard-negative mining: embed a corpus (cached), search each query's top-K (faiss), drop false negatives
by a margin to the positive and by a judge, sample negatives, and write them with their scores."""
