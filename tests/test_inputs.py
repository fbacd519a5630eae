"""The one input record (`unime.inputs.Input`): what training rows, benchmark items and encode inputs share."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from unime.inputs import Input, parse_input


def test_equal_records_dedupe_whether_or_not_the_image_size_was_read(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (4, 3), "red").save(image)
    parsed = parse_input(0, {"text": "a red square", "image": str(image)})
    assert parsed.image_pixels == 12  # the parser reads the header; a record built from a row does not
    built = Input(text="a red square", image=image)
    assert parsed == built and len({parsed, built}) == 1
    # Role and instruction are part of what a record is: the same content in another role is another item.
    assert len({built, Input(text="a red square", image=image, role="query")}) == 2
    assert built != Input(text="a red square", image=image, instruction="Find it.")


def test_a_record_needs_a_text_or_an_image() -> None:
    with pytest.raises(ValueError, match="needs a text, an image or both"):
        Input(instruction="Find it.")
    assert Input(text="").text == ""  # an empty text is a text: prompt templates render one


def test_to_dict_gives_the_public_input_with_the_keys_it_has(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    assert Input(text="x.png", role="query").to_dict() == {"text": "x.png"}  # kept as text, not read as a path
    assert Input(image=image, instruction="Find it.").to_dict() == {"image": image}
    assert Input(text="t", image=image).to_dict() == {"text": "t", "image": image}
