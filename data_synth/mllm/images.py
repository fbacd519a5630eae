"""The input photos: listing a folder, decoding, near-duplicate detection and the second view.

Near-duplicate photos (re-encodes, resizes, small edits) are found by a 64-bit difference hash (dHash) before
any model call. The decision is made over the whole folder in sorted order (the first photo wins), so every
`--shard i/N` process reaches the same decision for the same photo, whichever shard owns it.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
HASH_BANDS = 8
"""dHash bands for candidate lookup: two hashes within (HASH_BANDS - 1) bits share at least one whole band."""


@dataclass(frozen=True)
class Photo:
    """One file of the input folder."""

    key: str
    """Its path relative to the folder, with '/' separators: the idempotent key of its record."""
    path: Path


def list_photos(folder: str | os.PathLike) -> list[Photo]:
    """Image files under `folder` (recursively, by extension), sorted by key."""
    root = Path(folder)
    photos = [
        Photo(path.relative_to(root).as_posix(), path)
        for path in root.rglob("*")
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
    ]
    return sorted(photos, key=lambda photo: photo.key)


def open_photo(path: Path) -> Image.Image:
    """Decode fully as RGB (a truncated file fails here, not later); raises OSError on an unreadable file."""
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise OSError(f"{path}: not a readable image ({err})") from err


def difference_hash(image: Image.Image) -> int:
    """64-bit dHash: whether each pixel of a 9x8 greyscale thumbnail is brighter than its right neighbour."""
    small = image.convert("L").resize((9, 8), Image.Resampling.LANCZOS)
    pixels = small.tobytes()  # one byte per pixel, row by row
    bits = 0
    for row in range(8):
        for col in range(8):
            bits = (bits << 1) | (pixels[row * 9 + col] > pixels[row * 9 + col + 1])
    return bits


def find_near_duplicates(hashes: dict[str, int], max_distance: int) -> dict[str, str]:
    """{key: the earlier key it duplicates} for hashes within `max_distance` bits of an earlier one (key order)."""
    if max_distance < 0:
        return {}
    if max_distance >= HASH_BANDS:
        raise ValueError(f"max_distance must be < {HASH_BANDS}, got {max_distance}")
    band_bits = 64 // HASH_BANDS
    buckets: dict[tuple[int, int], list[str]] = defaultdict(list)
    duplicates: dict[str, str] = {}
    for key in sorted(hashes):
        value = hashes[key]
        bands = [(band, (value >> (band * band_bits)) & ((1 << band_bits) - 1)) for band in range(HASH_BANDS)]
        match = None
        for band in bands:
            for earlier in buckets[band]:
                if (hashes[earlier] ^ value).bit_count() <= max_distance and (match is None or earlier < match):
                    match = earlier
        if match is not None:
            duplicates[key] = match
            continue  # a duplicate is not indexed: it is never the original of a later photo
        for band in bands:
            buckets[band].append(key)
    return duplicates


def second_view(image: Image.Image) -> Image.Image:
    """The positive of an image->image combination: the central 80% of the photo, mirrored left to right."""
    width, height = image.size
    left, top = round(width * 0.1), round(height * 0.1)
    crop = image.crop((left, top, max(left + 1, width - left), max(top + 1, height - top)))
    return ImageOps.mirror(crop)
