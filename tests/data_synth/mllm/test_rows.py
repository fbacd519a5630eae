"""Answer -> training row: where the one real photo (and its second view) go for each combination."""

from __future__ import annotations

import json

import pytest

from unime.data.dataset import load_examples
from unime.data_synth.mllm.answer import Answer, Example
from unime.data_synth.mllm.images import open_photo, second_view
from unime.data_synth.mllm.plan import COMBINATIONS
from unime.data_synth.mllm.rows import text_signature, training_row

FINAL = Example("Find the match.", "a question", "the answer", "a wrong answer")

# combination: (query text?, query image, positive text?, positive image, negative (text, image) or None)
EXPECTED = {
    "T->I": (True, None, False, "photo", None),
    "I->T": (False, "photo", True, None, ("a wrong answer", None)),
    "IT->I": (True, "photo", False, "view", None),
    "IT->T": (True, "photo", True, None, ("a wrong answer", None)),
    "I->I": (False, "photo", False, "view", None),
    "T->IT": (True, None, True, "photo", ("a wrong answer", "photo")),
    "IT->IT": (True, "photo", True, "view", ("a wrong answer", "view")),
}


def test_every_combination_is_covered():
    assert set(EXPECTED) == set(COMBINATIONS)


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_the_photo_goes_where_the_combination_puts_it(tmp_path, real_photo_paths, combination):
    image = open_photo(real_photo_paths[0])
    image.save(tmp_path / "photo.jpg")
    second_view(image).save(tmp_path / "view.jpg")
    answer = Answer("a photo", "retrieval", combination, "English", 5, FINAL)
    row = training_row(answer, "photo.jpg", "view.jpg")
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    [example], report = load_examples([tmp_path / "rows.jsonl"])  # the training loader accepts it
    assert report.kept == 1

    query_text, query_image, positive_text, positive_image, negative = EXPECTED[combination]
    assert example.query.instruction == "Find the match."
    assert example.query.text == ("a question" if query_text else None)
    assert example.query.image == (tmp_path / f"{query_image}.jpg" if query_image else None)
    assert example.positive.text == ("the answer" if positive_text else None)
    assert example.positive.image == (tmp_path / f"{positive_image}.jpg" if positive_image else None)
    if negative is None:
        assert example.negatives == ()
    else:
        [side] = example.negatives
        assert side.text == negative[0]
        assert side.image == (tmp_path / f"{negative[1]}.jpg" if negative[1] else None)
    assert example.source == f"mllm_synthetic/retrieval/{combination}/English"


def test_a_combination_with_images_on_both_sides_needs_the_view():
    answer = Answer("a photo", "retrieval", "I->I", "English", 5, FINAL)
    with pytest.raises(ValueError, match="second view"):
        training_row(answer, "photo.jpg", None)


def test_the_signature_ignores_case_punctuation_and_image_paths():
    answer = Answer("a photo", "vqa", "IT->T", "English", 5, FINAL)
    loud = Example("FIND the match!", "A question?", "The answer", "x")
    shouted = Answer("a photo", "vqa", "IT->T", "English", 5, loud)
    other = Answer("a photo", "vqa", "IT->T", "English", 5, Example("Find the match.", "a question", "another", "x"))
    signature = text_signature(training_row(answer, "one.jpg", None))
    assert text_signature(training_row(shouted, "two.jpg", None)) == signature
    assert text_signature(training_row(other, "one.jpg", None)) != signature
