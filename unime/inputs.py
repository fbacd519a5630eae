"""Turn what users pass to `encode`/`rank` into validated, named inputs.

An input is a text, an image, or both (DESIGN.md, contract 4). Accepted forms, mixed freely in one call:
- `str`: a text; except, as in sentence-transformers, a single word ending in an image extension
  (`.jpg`, `.png`, ...) is an image file path and a `data:image/...;base64,` URI is an image. A string that
  looks like an image path but names no file is an error, not a text: wrap it as `{"text": ...}` to embed it;
- `PIL.Image.Image`: an image;
- `pathlib.Path` (any `os.PathLike`): an image file;
- `{"text": str, "image": PIL image | path | data URI}`: either key or both; `text` is always text.
Every problem is reported with the input's index in the call; nothing is skipped.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError

from unime.errors import InvalidInputError

ImageRef = Image.Image | Path
Role = Literal["query", "document"]
DICT_KEYS = frozenset({"text", "image"})
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tiff", ".webp")


@dataclass(frozen=True)
class Input:
    """The one input record: a text, an image, or both, with how to prompt it.

    One type serves every place that names something to embed or rerank: a side of a training row
    (`unime.data`), a benchmark item (`unime.eval`) and a parsed `encode`/`predict`/server input. So:
    - `instruction` and `role` are optional and say how to prompt the input: a training row or benchmark may
      give each input its own instruction, and a benchmark says which side of a pair an item is (`role`), so
      that an encoder gives queries and documents their configured instructions. `encode` and the server take
      the instruction per call, so the inputs they parse leave both None.
    - `image_pixels` is derived from the image (its header's width x height), not part of what the input is:
      it is left out of equality and hashing, so two records of the same text, image, instruction and role
      are equal (a benchmark embeds each distinct item once) whether or not the size was read. Only the
      parsers read it (0 when unread), for batching by size and for token estimates.
    """

    text: str | None = None
    image: ImageRef | None = None
    """A decoded image, or an image file (absolute or caller-relative) still to read."""
    instruction: str | None = None
    """The instruction to embed or rerank it with; None for the caller's default."""
    role: Role | None = None
    """Which side of a pair it is, for encoders that prompt queries and documents differently."""
    image_pixels: int = field(default=0, compare=False)
    """Width x height of the image (0 without one, or when not read), read from the header; used to batch by
    size."""

    def __post_init__(self) -> None:
        if self.text is None and self.image is None:
            raise ValueError("an input needs a text, an image or both")

    @property
    def has_image(self) -> bool:
        return self.image is not None

    @property
    def modality(self) -> str:
        if self.image is not None and self.text is not None:
            return "image_text"
        return "image" if self.image is not None else "text"

    def to_dict(self) -> dict[str, Any]:
        """The input as the public `encode`/`predict` APIs (and sentence-transformers) take it: a `{"text",
        "image"}` dict with the keys it has. A dict's text is always text, where a one-word string ending in
        ".png" would be read as an image path."""
        return {key: value for key, value in (("text", self.text), ("image", self.image)) if value is not None}


def is_single_input(inputs: Any) -> bool:
    """sentence-transformers semantics: one input (not in a list) gives one vector, not a matrix."""
    return isinstance(inputs, (str, dict, Image.Image, os.PathLike))


def parse_inputs(inputs: Sequence[Any]) -> list[Input]:
    """Validate every input up front, so that a bad one fails the call before any compute is spent."""
    if isinstance(inputs, (bytes, bytearray)) or not isinstance(inputs, Sequence):
        raise InvalidInputError(
            None, f"expected a list of inputs (str, PIL image, path or dict), got {type(inputs).__name__}"
        )
    return [parse_input(index, item) for index, item in enumerate(inputs)]


def parse_input(index: int, item: Any) -> Input:
    if isinstance(item, str):
        if item.startswith("data:image/"):
            return _image_input(index, decode_data_uri(index, item))
        if _looks_like_image_path(item):
            if not os.path.isfile(item):
                raise InvalidInputError(
                    index,
                    f"{item!r} looks like an image file path but no such file exists; pass {{'text': ...}} "
                    "to embed it as text",
                )
            path = Path(item)
            return Input(image=path, image_pixels=_probe_image_file(index, path))
        return Input(text=_check_text(index, item))
    if isinstance(item, Image.Image):
        return _image_input(index, item)
    if isinstance(item, os.PathLike):
        path = Path(item)
        return Input(image=path, image_pixels=_probe_image_file(index, path))
    if isinstance(item, dict):
        return _parse_dict(index, item)
    raise InvalidInputError(
        index,
        f"expected a text (str), an image (PIL image or pathlib.Path) or a dict with 'text' and/or 'image', "
        f"got {type(item).__name__}",
    )


def _parse_dict(index: int, item: dict) -> Input:
    unknown = sorted(str(key) for key in set(item) - DICT_KEYS)
    if unknown:
        raise InvalidInputError(index, f"unknown key(s) {unknown} in dict input; expected 'text' and/or 'image'")
    text, image = item.get("text"), item.get("image")
    if text is None and image is None:
        raise InvalidInputError(index, "dict input has neither 'text' nor 'image'")
    if text is not None:
        if not isinstance(text, str):
            raise InvalidInputError(index, f"'text' must be a str, got {type(text).__name__}")
        text = _check_text(index, text)
    pixels = 0
    if image is not None:
        if isinstance(image, str) and image.startswith("data:image/"):
            image = decode_data_uri(index, image)
        if isinstance(image, Image.Image):
            pixels = image.width * image.height
        elif isinstance(image, (str, os.PathLike)):
            image = Path(image)
            pixels = _probe_image_file(index, image)
        else:
            raise InvalidInputError(index, f"'image' must be a PIL image or a file path, got {type(image).__name__}")
    return Input(text=text, image=image, image_pixels=pixels)


def _image_input(index: int, image: Image.Image) -> Input:
    if image.width < 1 or image.height < 1:
        raise InvalidInputError(index, f"image has no pixels ({image.width}x{image.height})")
    return Input(image=image, image_pixels=image.width * image.height)


def _looks_like_image_path(text: str) -> bool:
    return text.lower().endswith(IMAGE_EXTENSIONS) and not any(ch.isspace() for ch in text)


def decode_data_uri(index: int, uri: str) -> Image.Image:
    """Decode a `data:image/<type>;base64,<payload>` URI into an RGB image."""
    header, _, payload = uri.partition(",")
    if not header.endswith(";base64") or not payload:
        raise InvalidInputError(index, "image data URI must look like 'data:image/<type>;base64,<payload>'")
    try:
        raw = base64.b64decode(payload, validate=True)
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            return image.convert("RGB")
    except (binascii.Error, UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise InvalidInputError(index, f"image data URI cannot be decoded ({err})") from err


def _check_text(index: int, text: str) -> str:
    if not text.strip():
        raise InvalidInputError(index, "empty text; pass a non-empty string, or an image")
    return text


def _probe_image_file(index: int, path: Path) -> int:
    """Read only the header: catches missing and non-image files cheaply; full decoding comes later."""
    if not path.is_file():
        raise InvalidInputError(index, f"image file {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            return image.width * image.height
    except (UnidentifiedImageError, OSError) as err:
        raise InvalidInputError(index, f"image file {str(path)!r} is not a readable image ({err})") from err


def load_image(index: int, image: ImageRef) -> Image.Image:
    """Decode an image fully, as RGB; a truncated or corrupt file fails here with its index and path."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    try:
        with Image.open(image) as opened:
            opened.load()
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise InvalidInputError(index, f"image file {str(image)!r} cannot be decoded ({err})") from err
