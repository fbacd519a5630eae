"""unime's benchmark harness: MMEB, image-text retrieval, SugarCrepe and reranking, on any encoder.

```python
from unime.eval import EvalConfig, UnimeEncoder, run_eval, write_outputs, write_synthetic_benchmark

root = write_synthetic_benchmark("runs/eval-data")             # the offline default (or a real MMEB root)
encoder = UnimeEncoder("runs/stage2/final")                    # or SentenceTransformersEncoder / HTTPEncoder
results = run_eval(encoder, EvalConfig(mmeb_root=str(root), cache_dir="runs/eval-cache"))
write_outputs(results, "runs/eval")                            # results.json, results.md, plots/
```
"""

from __future__ import annotations

from unime.eval.embedding import EmbedStats, ItemTable, embed_distinct
from unime.eval.encoders import Encoder, EncoderError, HTTPEncoder, SentenceTransformersEncoder, UnimeEncoder
from unime.eval.runner import EvalConfig, run_eval, write_outputs
from unime.eval.synthetic import write_synthetic_benchmark

__all__ = [
    "EmbedStats",
    "Encoder",
    "EncoderError",
    "EvalConfig",
    "HTTPEncoder",
    "ItemTable",
    "SentenceTransformersEncoder",
    "UnimeEncoder",
    "embed_distinct",
    "run_eval",
    "write_outputs",
    "write_synthetic_benchmark",
]
