"""The server's image-source policy, stricter than `unime.inputs` (which trusts its caller's files).

Over HTTP an image arrives as a data URL (`data:image/png;base64,...`) or bare base64; an `http(s)://` URL only
when the operator allows remote images, and then never to a loopback, private, link-local or reserved
address (no requests into the server's own network); a local path never. A remote host is resolved once, every
address it resolves to is checked, and the download connects to a checked address (the name goes in the Host
header and, for https, in TLS SNI and certificate checks): a DNS server that answers differently the second
time (DNS rebinding) is never asked a second time. Only PNG, JPEG, WebP, GIF and BMP are read: the imaging
library knows many more formats, some with decoders that were never meant for untrusted input (EPS would start
Ghostscript where it is installed). The size is read from the image header and checked before any pixel is
decoded, so a small file that would expand to gigabytes (a decompression bomb) is refused without decoding it.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
from PIL import Image, UnidentifiedImageError

from unime.serve.errors import RequestError

MAX_REDIRECTS = 3
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
"""The formats decoded from requests (Pillow's names); every other format is refused unread."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


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
            with Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS) as image:
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
            "the payload is not a PNG, JPEG, WebP, GIF or BMP image (the formats this server reads)",
            param=param,
            index=index,
        ) from err
    except (OSError, SyntaxError, ValueError) as err:
        raise RequestError(f"the image cannot be decoded ({err})", param=param, index=index) from err


def is_public_address(address: IPAddress) -> bool:
    """A global unicast address: not loopback, private, link-local, reserved, shared or multicast."""
    return address.is_global and not address.is_multicast


def check_public_host(
    url: str, *, param: str, index: int | None, address_allowed: Callable[[IPAddress], bool] = is_public_address
) -> IPAddress:
    """The address to connect to for `url`: its host resolved once, and refused unless every address it resolves
    to is allowed (by default: public), so that no address of the answer reaches into the server's network."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RequestError("only http(s) URLs with a host name are accepted", param=param, index=index)
    try:
        infos = socket.getaddrinfo(
            parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM
        )
    except (socket.gaierror, UnicodeError, ValueError) as err:
        raise RequestError(f"cannot resolve the image host {parts.hostname!r}", param=param, index=index) from err
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses:
        raise RequestError(f"cannot resolve the image host {parts.hostname!r}", param=param, index=index)
    for address in addresses:
        if not address_allowed(address):
            raise RequestError(
                f"image URLs may not point to non-public addresses ({parts.hostname} -> {address})",
                param=param,
                index=index,
            )
    return addresses[0]


@contextmanager
def pinned_stream(url: str, address: IPAddress, timeout_s: float) -> Iterator[Any]:
    """GET `url` from `address` (already resolved and checked) without resolving its host again.

    The request goes to the address literally; the host name is kept where the server sees it: the Host header,
    and for https the TLS server name (SNI), against which the certificate is verified. Proxies from the
    environment are not used: a proxy would resolve the name itself.
    """
    target = httpx.URL(url)
    host = target.raw_host.decode("ascii")
    extensions = {}
    if target.scheme == "https" and not _is_ip_literal(host):
        extensions["sni_hostname"] = host
    with (
        httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client,
        client.stream(
            "GET",
            target.copy_with(host=str(address)),
            headers={"Host": target.netloc.decode("ascii")},
            extensions=extensions,
        ) as response,
    ):
        yield response


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def fetch_public_image(
    url: str,
    policy: ImagePolicy,
    *,
    param: str,
    index: int | None,
    address_allowed: Callable[[IPAddress], bool] = is_public_address,
) -> bytes:
    """Download an image from a public host; redirects are followed by hand so that each hop is checked and pinned.

    `address_allowed` decides which resolved addresses may be connected to (public ones; tests allow loopback).
    """
    for _ in range(MAX_REDIRECTS + 1):
        address = check_public_host(url, param=param, index=index, address_allowed=address_allowed)
        try:
            with pinned_stream(url, address, policy.timeout_s) as response:
                if response.is_redirect:
                    url = urljoin(url, response.headers.get("location", ""))
                    continue
                if response.status_code != 200:
                    raise RequestError(f"the image URL answered HTTP {response.status_code}", param=param, index=index)
                return _read_limited(response, policy.max_download_bytes, param=param, index=index)
        except httpx.HTTPError as err:
            raise RequestError(f"cannot download the image ({err})", param=param, index=index) from err
    raise RequestError(f"the image URL redirected more than {MAX_REDIRECTS} times", param=param, index=index)


def _read_limited(response: Any, limit: int, *, param: str, index: int | None) -> bytes:
    chunks, size = [], 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"the image file is larger than {limit} bytes", param=param, index=index, status=413)
        chunks.append(chunk)
    return b"".join(chunks)
