"""Response encoding: the fast JSON path writes the numbers the standard library writes."""

from __future__ import annotations

import json

import numpy as np
from fastapi.responses import JSONResponse

from unime.serve.routes import FastJSONResponse, encode_vector


def test_fast_json_response_gives_the_same_numbers_as_the_standard_library() -> None:
    vector = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    content = {
        "data": [{"object": "embedding", "index": 0, "embedding": encode_vector(vector, "float")}],
        "results": [{"index": 1, "relevance_score": 0.123456789012345, "document": {"text": "é ü 漢字"}}],
        "usage": {"prompt_tokens": 7, "total_tokens": 7},
    }
    fast = json.loads(FastJSONResponse(content).body)
    assert fast == json.loads(JSONResponse(content).body)
    assert fast["data"][0]["embedding"] == [float(x) for x in vector]  # float32 values, exactly
    assert fast["results"][0]["document"]["text"] == "é ü 漢字"
