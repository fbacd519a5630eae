"""The answer schema and the checks that turn a model's answer into a row or a rejection reason."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest

from unime.data_synth.mllm.answer import Rejected, answer_schema, parse_answer
from unime.data_synth.mllm.plan import PlanChoices

CHOICES = PlanChoices(languages=("English", "German"))


def valid_answer(combination: str = "IT->T") -> dict:
    example = {
        "instruction": "Answer the question about the image.",
        "query": "How many cups are on the table?",
        "positive": "Two cups.",
        "hard_negative": "Three cups.",
    }
    return {
        "description": "Two white cups on a wooden table, morning light.",
        "task": "vqa",
        "combination": combination,
        "language": "English",
        "draft": dict(example, positive="2"),
        "evaluation": {"score": 4, "issues": "the draft's answer was a bare digit"},
        "final": example,
    }


def reason_of(answer, **kwargs) -> str:
    text = answer if isinstance(answer, str) else json.dumps(answer)
    with pytest.raises(Rejected) as caught:
        parse_answer(text, CHOICES, **kwargs)
    return caught.value.reason


def test_a_valid_answer_keeps_the_revised_example():
    answer = parse_answer(json.dumps(valid_answer()), CHOICES)
    assert (answer.task, answer.combination, answer.language, answer.score) == ("vqa", "IT->T", "English", 4)
    assert answer.final.positive == "Two cups."  # the final version, not the draft's "2"
    jsonschema.validate(valid_answer(), answer_schema(CHOICES))


def test_a_json_code_fence_is_accepted():
    assert parse_answer("```json\n" + json.dumps(valid_answer()) + "\n```", CHOICES).final.query


def mutated(change) -> dict:
    answer = copy.deepcopy(valid_answer())
    change(answer)
    return answer


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ('{"description": "a cup", "task": ', "invalid_json"),
        ("I cannot help with that.", "invalid_json"),
        ("[1, 2]", "wrong_type:answer"),
        (mutated(lambda a: a.pop("final")), "missing_field:final"),
        (mutated(lambda a: a["final"].pop("hard_negative")), "missing_field:final.hard_negative"),
        (mutated(lambda a: a["evaluation"].pop("score")), "missing_field:evaluation.score"),
        (mutated(lambda a: a["evaluation"].update(score="5")), "wrong_type:evaluation.score"),
        (mutated(lambda a: a["evaluation"].update(score=9)), "wrong_type:evaluation.score"),
        (mutated(lambda a: a["final"].update(query=3)), "wrong_type:final.query"),
        (mutated(lambda a: a.update(combination="T->T")), "invalid_choice:combination"),
        (mutated(lambda a: a.update(language="Klingon")), "invalid_choice:language"),
        (mutated(lambda a: a.update(task="grounding")), "invalid_choice:task"),
        (mutated(lambda a: a["final"].update(query="  ")), "empty_field:final.query"),
        (mutated(lambda a: a["final"].update(positive="")), "empty_field:final.positive"),
        (mutated(lambda a: a["evaluation"].update(score=3)), "self_evaluation_failed"),
        (mutated(lambda a: a["final"].update(hard_negative="two  CUPS.")), "negative_equals_positive"),
    ],
)
def test_bad_answers_are_rejected_with_the_first_problem(answer, reason):
    assert reason_of(answer) == reason


def test_schema_level_problems_are_also_schema_violations():
    """Whatever the schema forbids, the parser rejects too (endpoints may ignore the schema)."""
    schema = answer_schema(CHOICES)
    for change in (
        lambda a: a.pop("final"),
        lambda a: a["evaluation"].update(score="5"),
        lambda a: a.update(combination="T->T"),
        lambda a: a.update(language="Klingon"),
        lambda a: a["final"].update(query=3),
    ):
        answer = mutated(change)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(answer, schema)
        assert reason_of(answer)


def test_texts_a_combination_does_not_use_may_be_empty():
    """I->T: the query is the photo alone, so an empty query text is fine; T->I: an empty positive is fine."""
    image_to_text = mutated(lambda a: (a.update(combination="I->T"), a["final"].update(query="")))
    assert parse_answer(json.dumps(image_to_text), CHOICES).final.query == ""
    text_to_image = mutated(lambda a: (a.update(combination="T->I"), a["final"].update(positive="")))
    assert parse_answer(json.dumps(text_to_image), CHOICES).combination == "T->I"


def test_a_truncated_answer_is_named_so():
    assert reason_of('{"description": "two cups', truncated=True) == "truncated_answer"


def test_the_minimum_score_is_configurable():
    answer = json.dumps(mutated(lambda a: a["evaluation"].update(score=2)))
    assert parse_answer(answer, CHOICES, min_score=2).score == 2
