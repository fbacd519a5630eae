"""Photo folders for the MLLM generator's tests: real photos, a corrupt file and a near-duplicate copy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image


def make_photo_folder(folder: Path, photos: list[Path]) -> Path:
    """`a00.jpg`, `a01.jpg`, ... (copies of `photos`), `zz-copy-of-a00.png` (a00 resized: a near-duplicate) and
    `broken.jpg` (the first 2 kB of a00: a truncated JPEG)."""
    folder.mkdir(parents=True)
    for index, photo in enumerate(photos):
        shutil.copy(photo, folder / f"a{index:02d}.jpg")
    with Image.open(photos[0]) as image:
        image.convert("RGB").resize((180, 180)).save(folder / "zz-copy-of-a00.png")
    (folder / "broken.jpg").write_bytes(photos[0].read_bytes()[:2048])
    return folder


@pytest.fixture(scope="session")
def ten_photo_paths(real_photo_paths) -> list[Path]:
    """The three `real_photo_paths` and the next seven photos of the same package."""
    folder = real_photo_paths[0].parent
    more = [path for path in sorted(folder.glob("*.jpg")) if path not in real_photo_paths][:7]
    return list(real_photo_paths) + more
