"""The model's answer: its JSON schema, and the checks that decide whether it becomes a training row.

The schema goes to the backend (vLLM structured outputs, or an endpoint's `response_format`), but every answer
is still parsed and checked here: endpoints may ignore the schema, and a schema cannot say that the texts a
combination needs are non-empty or that the self-evaluation passed. A rejected answer gets one reason, the
name of its first problem (e.g. `invalid_json`, `missing_field:final.query`), counted in the manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from unime.data_synth.mllm.plan import PlanChoices, sides_of

EXAMPLE_FIELDS = ("instruction", "query", "positive", "hard_negative")


def answer_schema(choices: PlanChoices) -> dict[str, Any]:
    """The JSON schema of one answer, with the run's allowed tasks, combinations and languages as enums."""
    example = {
        "type": "object",
        "properties": {name: {"type": "string"} for name in EXAMPLE_FIELDS},
        "required": list(EXAMPLE_FIELDS),
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {
            "description": {"type": "string"},
            "task": {"type": "string", "enum": list(choices.tasks)},
            "combination": {"type": "string", "enum": list(choices.combinations)},
            "language": {"type": "string", "enum": list(choices.languages)},
            "draft": example,
            "evaluation": {
                "type": "object",
                "properties": {
                    "score": {"type": "integer", "minimum": 1, "maximum": 5},
                    "issues": {"type": "string"},
                },
                "required": ["score", "issues"],
                "additionalProperties": False,
            },
            "final": example,
        },
        "required": ["description", "task", "combination", "language", "draft", "evaluation", "final"],
        "additionalProperties": False,
    }


@dataclass(frozen=True)
class Example:
    """The revised example of an accepted answer."""

    instruction: str
    query: str
    positive: str
    hard_negative: str


@dataclass(frozen=True)
class Answer:
    """An accepted answer."""

    description: str
    task: str
    combination: str
    language: str
    score: int
    """The model's own evaluation of its draft, 1-5."""
    final: Example


class Rejected(Exception):
    """An answer that does not become data; `reason` is counted in the manifest."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def parse_answer(text: str, choices: PlanChoices, *, min_score: int = 4, truncated: bool = False) -> Answer:
    """Parse and check one answer; raises `Rejected` naming the first problem.

    Args:
        text: the model's answer.
        choices: the run's allowed values.
        min_score: the lowest self-evaluation score that is kept.
        truncated: the backend stopped at its token limit (an invalid answer is then `truncated_answer`).
    """
    obj = _object(_load_json(text, truncated), "answer")
    description = _string(obj, "description", "")
    task = _choice(obj, "task", choices.tasks)
    combination = _choice(obj, "combination", choices.combinations)
    language = _choice(obj, "language", choices.languages)
    _object(_field(obj, "draft", ""), "draft")  # the draft must be there, but only the final version is used
    evaluation = _object(_field(obj, "evaluation", ""), "evaluation")
    score = _field(evaluation, "score", "evaluation.")
    if not isinstance(score, int) or isinstance(score, bool) or not 1 <= score <= 5:
        raise Rejected("wrong_type:evaluation.score", f"expected an integer 1-5, got {score!r}")
    _string(evaluation, "issues", "evaluation.")
    final_raw = _object(_field(obj, "final", ""), "final")
    final = Example(*(_string(final_raw, name, "final.") for name in EXAMPLE_FIELDS))

    sides = sides_of(combination)
    needed = ["instruction", "hard_negative"]
    needed += ["query"] if sides.query_text else []
    needed += ["positive"] if sides.candidate_text else []
    for name in needed:
        if not getattr(final, name).strip():
            raise Rejected(f"empty_field:final.{name}", f"combination {combination} needs it")
    if not description.strip():
        raise Rejected("empty_field:description")
    if score < min_score:
        raise Rejected("self_evaluation_failed", f"score {score} < {min_score}")
    if sides.candidate_text and _normalise(final.hard_negative) == _normalise(final.positive):
        raise Rejected("negative_equals_positive")
    return Answer(description, task, combination, language, score, final)


def _load_json(text: str, truncated: bool) -> Any:
    try:
        # strict=False: control characters inside strings (a raw tab, say) are accepted; guided decoding lets a
        # model write them (xgrammar's string excludes only quote, backslash and line breaks).
        return json.loads(_strip_code_fence(text), strict=False)
    except (json.JSONDecodeError, RecursionError) as err:
        reason = "truncated_answer" if truncated else "invalid_json"
        raise Rejected(reason, f"{err.__class__.__name__}: {err}") from None


def _strip_code_fence(text: str) -> str:
    """Chat models often wrap JSON in a ```json fence even when told not to; the content is still an answer."""
    stripped = text.strip()
    if stripped.startswith("```") and stripped.endswith("```"):
        stripped = stripped[3:-3]
        if stripped.startswith("json"):
            stripped = stripped[4:]
    return stripped


def _field(obj: dict, name: str, prefix: str) -> Any:
    if name not in obj:
        raise Rejected(f"missing_field:{prefix}{name}")
    return obj[name]


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise Rejected(f"wrong_type:{where}", f"expected an object, got {type(value).__name__}")
    return value


def _string(obj: dict, name: str, prefix: str) -> str:
    value = _field(obj, name, prefix)
    if not isinstance(value, str):
        raise Rejected(f"wrong_type:{prefix}{name}", f"expected a string, got {type(value).__name__}")
    return value


def _choice(obj: dict, name: str, allowed: tuple[str, ...]) -> str:
    value = _string(obj, name, "")
    if value not in allowed:
        raise Rejected(f"invalid_choice:{name}", f"{value!r} is not one of {list(allowed)}")
    return value


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


# -- the pages mode: queries that find a page image ----------------------------------------------------------

PAGE_QUERY_FIELDS = ("query", "fact")
MAX_QUERY_CHARS = 200
"""The default longest query of the pages mode (ColPali's and mmE5's queries are one sentence)."""


def page_text_limits(max_query_chars: int) -> dict[str, int]:
    """The longest text of each field of a pages answer: a query, its fact (twice that), the page's description
    (five times that)."""
    return {"query": max_query_chars, "fact": 2 * max_query_chars, "description": 5 * max_query_chars}


def _bounded_string(max_chars: int) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": max_chars}


def page_answer_schema(
    choices: PlanChoices, queries_per_page: int, max_query_chars: int = MAX_QUERY_CHARS
) -> dict[str, Any]:
    """The JSON schema of one answer of the pages mode: exactly `queries_per_page` queries, each with its fact.

    Every text is bounded (`page_text_limits`): under guided decoding (vLLM's xgrammar) an unbounded string lets a
    rambling model (or a random test model) write until `max_tokens` cuts the answer, which is then lost; with
    the bounds every string closes and the whole answer fits in `max_tokens` when that covers (5 + 3 x
    queries_per_page) x `max_query_chars` characters (a token is at least one), plus the JSON around them.
    """
    limits = page_text_limits(max_query_chars)
    query = {
        "type": "object",
        "properties": {name: _bounded_string(limits[name]) for name in PAGE_QUERY_FIELDS},
        "required": list(PAGE_QUERY_FIELDS),
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {
            "description": _bounded_string(limits["description"]),
            "language": {"type": "string", "enum": list(choices.languages)},
            "queries": {
                "type": "array",
                "items": query,
                "minItems": queries_per_page,
                "maxItems": queries_per_page,
            },
        },
        "required": ["description", "language", "queries"],
        "additionalProperties": False,
    }


@dataclass(frozen=True)
class PageQuery:
    """One query of an accepted page answer."""

    query: str
    """What a user would type to find the page."""
    fact: str
    """The fact on the page that answers it."""


@dataclass(frozen=True)
class PageAnswer:
    """An accepted answer of the pages mode."""

    description: str
    language: str
    queries: tuple[PageQuery, ...]


def parse_page_answer(
    text: str,
    choices: PlanChoices,
    queries_per_page: int,
    *,
    truncated: bool = False,
    max_query_chars: int = MAX_QUERY_CHARS,
) -> PageAnswer:
    """Parse and check one answer of the pages mode; raises `Rejected` naming the first problem (the same
    reasons as `parse_answer`, plus `wrong_count:queries`, `too_long:<field>` (past `page_text_limits`: an
    endpoint may ignore the schema) and `repeated_query`)."""
    limits = page_text_limits(max_query_chars)
    obj = _object(_load_json(text, truncated), "answer")
    description = _limited(_string(obj, "description", ""), limits["description"], "description")
    language = _choice(obj, "language", choices.languages)
    items = _field(obj, "queries", "")
    if not isinstance(items, list):
        raise Rejected("wrong_type:queries", f"expected an array, got {type(items).__name__}")
    if len(items) != queries_per_page:
        raise Rejected("wrong_count:queries", f"expected {queries_per_page} queries, got {len(items)}")
    queries = []
    for index, item in enumerate(items):
        where = f"queries[{index}]"
        item = _object(item, where)
        query = PageQuery(
            *(_limited(_string(item, name, f"{where}."), limits[name], f"{where}.{name}") for name in PAGE_QUERY_FIELDS)
        )
        for name in PAGE_QUERY_FIELDS:
            if not getattr(query, name).strip():
                raise Rejected(f"empty_field:{where}.{name}")
        queries.append(query)
    if not description.strip():
        raise Rejected("empty_field:description")
    if len({_normalise(query.query) for query in queries}) < len(queries):
        raise Rejected("repeated_query", "two queries of the page are the same")
    return PageAnswer(description, language, tuple(queries))


def _limited(value: str, max_chars: int, where: str) -> str:
    if len(value) > max_chars:
        raise Rejected(f"too_long:{where}", f"{len(value)} characters, at most {max_chars}")
    return value
