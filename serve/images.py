"""The server's image-source policy, stricter than `unime.inputs` (which trusts its caller's files).

Over HTTP an image arrives as a data URL (`data:image/png;base64,...`) or bare base64; an `http(s)://` URL only
when the operator allows remote images, and then never to a loopback, private, link-local or reserved
address (no requests into the server's own network); a local path never. The size is read from the image
header and checked before any pixel is decoded, so a small file that would expand to gigabytes (a
decompression bomb) is refused without decoding it.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
import warnings
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from PIL import Image, UnidentifiedImageError

from unime.serve.errors import RequestError

MAX_REDIRECTS = 3


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from and how large they may be."""

    max_pixels: int
    """Largest width x height accepted."""
    allow_remote: bool = False
    """Accept public `http(s)://` URLs."""
    timeout_s: float = 5.0
    """Timeout of one remote download."""
    max_download_bytes: int = 16 * 1024 * 1024
    """Largest remote image file accepted."""


def decode_image(value: object, policy: ImagePolicy, *, param: str, index: int | None) -> Image.Image:
    """An RGB image from a request's image field; every refusal names `param` and `index`."""
    if not isinstance(value, str) or not value:
        raise RequestError(
            f"expected an image as a data URL or base64 string, got {type(value).__name__}", param=param, index=index
        )
    if value.startswith("data:"):
        raw = _data_url_bytes(value, param, index)
    elif value.startswith(("http://", "https://")):
        if not policy.allow_remote:
            raise RequestError(
                "remote image URLs are not allowed on this server; send the image as a data URL or base64",
                param=param,
                index=index,
            )
        raw = fetch_public_image(value, policy, param=param, index=index)
    elif "://" in value[:16] or value.startswith(("/", "./", "../", "~")):
        raise RequestError(
            "images are accepted as data URLs or base64 (or public http(s) URLs where allowed), never as local "
            "paths or other URL schemes",
            param=param,
            index=index,
        )
    else:
        raw = _base64_bytes(value, param, index)
    return open_checked_image(raw, policy.max_pixels, param=param, index=index)


def _data_url_bytes(value: str, param: str, index: int | None) -> bytes:
    header, _, payload = value.partition(",")
    if not header.startswith("data:image/") or not header.endswith(";base64") or not payload:
        raise RequestError("a data URL must look like 'data:image/<type>;base64,<payload>'", param=param, index=index)
    return _base64_bytes(payload, param, index)


def _base64_bytes(payload: str, param: str, index: int | None) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(f"the image is not valid base64 ({err})", param=param, index=index) from err


def open_checked_image(raw: bytes, max_pixels: int, *, param: str, index: int | None) -> Image.Image:
    """Decode image bytes as RGB after checking the header's size against `max_pixels`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise RequestError(
                        f"the image is {width}x{height} = {width * height} pixels; this server accepts at most "
                        f"{max_pixels}",
                        param=param,
                        index=index,
                        status=413,
                    )
                image.load()
                # An RGB image is returned as decoded: convert() would copy every pixel for nothing.
                return image if image.mode == "RGB" else image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise RequestError(f"the image is too large to decode ({err})", param=param, index=index, status=413) from err
    except UnidentifiedImageError as err:
        raise RequestError(
            "the payload is not an image in a format this server reads", param=param, index=index
        ) from err
    except (OSError, SyntaxError, ValueError) as err:
        raise RequestError(f"the image cannot be decoded ({err})", param=param, index=index) from err


def check_public_host(url: str, *, param: str, index: int | None) -> None:
    """Refuse URLs whose host resolves to any non-public address (loopback, private, link-local, ...)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RequestError("only http(s) URLs with a host name are accepted", param=param, index=index)
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except (socket.gaierror, UnicodeError) as err:
        raise RequestError(f"cannot resolve the image host {parts.hostname!r}", param=param, index=index) from err
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global or address.is_multicast:
            raise RequestError(
                f"image URLs may not point to non-public addresses ({parts.hostname} -> {address})",
                param=param,
                index=index,
            )


def fetch_public_image(url: str, policy: ImagePolicy, *, param: str, index: int | None) -> bytes:
    """Download an image from a public host; redirects are followed by hand so that each hop is checked."""
    import httpx

    for _ in range(MAX_REDIRECTS + 1):
        check_public_host(url, param=param, index=index)
        try:
            with httpx.stream("GET", url, timeout=policy.timeout_s, follow_redirects=False) as response:
                if response.is_redirect:
                    url = urljoin(url, response.headers.get("location", ""))
                    continue
                if response.status_code != 200:
                    raise RequestError(f"the image URL answered HTTP {response.status_code}", param=param, index=index)
                chunks, size = [], 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > policy.max_download_bytes:
                        raise RequestError(
                            f"the image file is larger than {policy.max_download_bytes} bytes",
                            param=param,
                            index=index,
                            status=413,
                        )
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.HTTPError as err:
            raise RequestError(f"cannot download the image ({err})", param=param, index=index) from err
    raise RequestError(f"the image URL redirected more than {MAX_REDIRECTS} times", param=param, index=index)
