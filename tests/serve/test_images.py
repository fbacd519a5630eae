"""The server's image policy: data URLs and base64 only by default, never private hosts, pixel limit first."""

from __future__ import annotations

import base64
import io
import time

import pytest
from PIL import Image

from unime.serve.errors import RequestError
from unime.serve.images import ImagePolicy, check_public_host, decode_image, open_checked_image


def _png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color=0).save(buffer, format="PNG")
    return buffer.getvalue()


def test_data_url_and_bare_base64_decode_to_the_same_rgb_image():
    raw = _png((30, 20))
    policy = ImagePolicy(max_pixels=10_000)
    from_url = decode_image("data:image/png;base64," + base64.b64encode(raw).decode(), policy, param="p", index=0)
    bare = decode_image(base64.b64encode(raw).decode(), policy, param="p", index=0)
    assert from_url.size == bare.size == (30, 20) and from_url.mode == bare.mode == "RGB"


def test_a_decompression_bomb_is_refused_from_its_header_without_decoding():
    bomb = _png((20_000, 20_000), mode="1")  # 400 M pixels in a few dozen kilobytes
    assert len(bomb) < 200_000
    start = time.perf_counter()
    with pytest.raises(RequestError) as caught:
        open_checked_image(bomb, 4096 * 4096, param="input[3].image", index=3)
    assert time.perf_counter() - start < 1.0  # far less than decoding 400 M pixels would take
    assert caught.value.status == 413 and caught.value.param == "input[3].image" and caught.value.index == 3
    assert "pixels" in str(caught.value)


@pytest.mark.parametrize(
    "value",
    ["/etc/hosts", "./x.png", "~/x.png", "file:///etc/hosts", "ftp://example.com/x.png", "http://example.com/x.png"],
)
def test_paths_and_urls_are_refused_by_default(value):
    with pytest.raises(RequestError) as caught:
        decode_image(value, ImagePolicy(max_pixels=10_000), param="query.image", index=None)
    assert caught.value.status == 400 and caught.value.param == "query.image"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.png",
        "http://localhost:8000/x.png",
        "https://10.0.0.7/x.png",
        "http://172.16.3.4/x.png",
        "http://192.168.1.1/x.png",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/x.png",
        "http://[fe80::1]/x.png",
        "http://0.0.0.0/x.png",
        "http://224.0.0.1/x.png",
    ],
)
def test_non_public_hosts_are_refused(url):
    with pytest.raises(RequestError, match="non-public"):
        check_public_host(url, param="input[0].image", index=0)


def test_a_public_address_passes_the_host_check():
    check_public_host("http://93.184.215.14/x.png", param="input[0].image", index=0)  # an IP: no DNS needed
