"""From an accepted answer to a training row (`unime.data.schema`): where the one real photo goes.

With one real photo per generation pass (mmE5 sampled several images per sample), each combination places it
like this; "view" is `images.second_view` of the photo, saved beside the shards:

| combination | query                  | positive              | hard negative                     |
|-------------|------------------------|-----------------------|-----------------------------------|
| T->I        | text                   | photo                 | none (image negatives come from mining) |
| I->T        | photo                  | text                  | text                              |
| IT->I       | photo + text           | view                  | none (mining)                     |
| IT->T       | photo + text           | text                  | text                              |
| I->I        | photo                  | view                  | none (mining)                     |
| T->IT       | text                   | photo + text          | photo + negative text             |
| IT->IT      | photo + text           | view + text           | view + negative text              |

When both sides carry an image, the candidate gets the view, so that the pair is not matched by identical
pixels. The instruction goes on the query side.

The pages mode writes one row per query: text query -> the page image (`page_query_row`).
"""

from __future__ import annotations

import re
from typing import Any

from unime.data_synth.mllm.answer import Answer, PageQuery
from unime.data_synth.mllm.plan import sides_of
from unime.data_synth.pages import QUERY_INSTRUCTION

SOURCE_PREFIX = "mllm_synthetic"
PAGES_SOURCE = "Generated-VisDoc"
"""The source of the pages mode's rows (the drawn pages' rows are "Synthetic-VisDoc")."""


def training_row(answer: Answer, photo: str, view: str | None) -> dict[str, Any]:
    """The row for `answer`; `photo` and `view` are image paths as they go into the row (relative to the
    shard folder). `view` is needed when the combination has an image on both sides."""
    sides = sides_of(answer.combination)
    final = answer.final
    both_images = sides.query_image and sides.candidate_image
    if both_images and view is None:
        raise ValueError(f"combination {answer.combination} needs a second view of the photo")
    candidate_image = (view if both_images else photo) if sides.candidate_image else None

    query: dict[str, Any] = {"instruction": final.instruction}
    if sides.query_text:
        query["text"] = final.query
    if sides.query_image:
        query["image"] = photo
    positive: dict[str, Any] = {}
    if sides.candidate_text:
        positive["text"] = final.positive
    if candidate_image is not None:
        positive["image"] = candidate_image
    negatives = []
    if sides.candidate_text:
        negative = {"text": final.hard_negative}
        if candidate_image is not None:
            negative["image"] = candidate_image
        negatives.append(negative)
    return {
        "query": query,
        "positive": positive,
        "negatives": negatives,
        "source": f"{SOURCE_PREFIX}/{answer.task}/{answer.combination}/{answer.language}",
    }


def page_query_row(query: PageQuery, page: str) -> dict[str, Any]:
    """The row of one query of the pages mode: the query text (with the drawn pages' instruction, so that both
    kinds of page data train and evaluate alike) finds the page image. No negative: page negatives come from
    mining, as for the image-only candidates of the tasks mode."""
    return {
        "query": {"text": query.query, "instruction": QUERY_INSTRUCTION},
        "positive": {"image": page},
        "negatives": [],
        "source": PAGES_SOURCE,
    }


def page_query_signature(row: dict[str, Any]) -> str:
    """Near-duplicate signature of a pages-mode row: its normalised query alone. The same query written for two
    pages cannot find either of them, so the second is rejected."""
    return f"{row['source']}|{_normalise(row['query']['text'])}"


def text_signature(row: dict[str, Any]) -> str:
    """Near-duplicate signature of a generated row: its normalised texts (instruction, query, positive) and
    combination, without image paths. Photos are already unique (near-duplicate photos are removed before
    generation), so two rows with this signature equal say the same thing about different photos, which is
    what a model that answers generically produces."""
    parts = [row["source"].split("/")[2]]
    for side in (row["query"], row["positive"]):
        parts += [_normalise(side.get("instruction")), _normalise(side.get("text"))]
    return "|".join(parts)


def _normalise(text: str | None) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text or "").lower().split())
