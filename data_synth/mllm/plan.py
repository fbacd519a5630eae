"""What one generation pass is asked to produce: a task, a modality combination and a language (mmE5).

mmE5 configures these per sample so that the data covers every task, combination and language; the model may
keep the suggestion or pick another allowed value when the photo cannot support it. The suggestion is drawn
from a generator seeded by the run's seed and the image's key, so a resumed or sharded run suggests the same
plan for the same image in any process.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from unime.errors import ConfigError

Task = Literal["classification", "vqa", "retrieval"]
Combination = Literal["T->I", "I->T", "IT->I", "IT->T", "I->I", "T->IT", "IT->IT"]

TASKS: tuple[str, ...] = ("classification", "vqa", "retrieval")
COMBINATIONS: tuple[str, ...] = ("T->I", "I->T", "IT->I", "IT->T", "I->I", "T->IT", "IT->IT")
DEFAULT_LANGUAGES: tuple[str, ...] = ("English", "Chinese", "Spanish", "French", "German", "Japanese")


@dataclass(frozen=True)
class Sides:
    """Which modalities the query and the candidate of a combination carry."""

    query_text: bool
    query_image: bool
    candidate_text: bool
    candidate_image: bool


def sides_of(combination: str) -> Sides:
    """`"IT->T"` -> query has image and text, candidate has text."""
    if combination not in COMBINATIONS:
        raise ConfigError(f"unknown modality combination {combination!r}; expected one of {list(COMBINATIONS)}")
    query, candidate = combination.split("->")
    return Sides("T" in query, "I" in query, "T" in candidate, "I" in candidate)


@dataclass(frozen=True)
class Plan:
    """The suggested configuration of one generation pass."""

    task: str
    combination: str
    language: str


@dataclass(frozen=True)
class PlanChoices:
    """The values a run allows; the answer schema restricts the model's choices to them."""

    tasks: tuple[str, ...] = TASKS
    """Task types to generate."""
    combinations: tuple[str, ...] = COMBINATIONS
    """Modality combinations to generate."""
    languages: tuple[str, ...] = DEFAULT_LANGUAGES
    """Languages to write instructions, queries and candidates in."""

    def __post_init__(self) -> None:
        for name, values, allowed in (
            ("tasks", self.tasks, TASKS),
            ("combinations", self.combinations, COMBINATIONS),
            ("languages", self.languages, None),
        ):
            if not values:
                raise ConfigError(f"{name}: needs at least one value")
            if len(set(values)) != len(values):
                raise ConfigError(f"{name}: has repeated values {list(values)}")
            unknown = [value for value in values if allowed is not None and value not in allowed]
            if unknown:
                raise ConfigError(f"{name}: unknown value(s) {unknown}; expected some of {list(allowed)}")
            if any(not isinstance(value, str) or not value.strip() for value in values):
                raise ConfigError(f"{name}: values must be non-empty strings")


def suggest_plan(key: str, seed: int, choices: PlanChoices) -> Plan:
    """The same plan for the same (key, seed) in every process: `random.Random` seeds strings by their bytes."""
    rng = random.Random(f"{seed}:{key}")
    return Plan(rng.choice(choices.tasks), rng.choice(choices.combinations), rng.choice(choices.languages))
