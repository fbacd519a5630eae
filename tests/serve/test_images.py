"""The server's image policy: data URLs and base64 only by default, five formats, never private hosts (checked and
pinned at every hop), pixel limit first."""

from __future__ import annotations

import base64
import contextlib
import datetime
import io
import ipaddress
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from unime.serve.errors import RequestError
from unime.serve.images import (
    IMAGE_FORMATS,
    ImagePolicy,
    check_public_host,
    decode_image,
    fetch_public_image,
    open_checked_image,
)


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


def _encoded(fmt: str, size: tuple[int, int] = (12, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color=(200, 30, 40)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", IMAGE_FORMATS)
def test_the_allowed_formats_decode(fmt):
    image = open_checked_image(_encoded(fmt), 10_000, param="input[0].image", index=0)
    assert image.size == (12, 8) and image.mode == "RGB"


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 12 8\n0 0 moveto 12 8 lineto stroke\nshowpage\n%%EOF\n"


@pytest.mark.parametrize("fmt", ["TIFF", "PPM", "ICO", "TGA", "PCX", "EPS"])
def test_other_formats_are_refused_unread(fmt, monkeypatch):
    from PIL import EpsImagePlugin

    def no_ghostscript(*args, **kwargs):
        raise AssertionError("an EPS image from the network reached Ghostscript")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_ghostscript)
    raw = EPS if fmt == "EPS" else _encoded(fmt)
    value = "data:image/x;base64," + base64.b64encode(raw).decode()
    with pytest.raises(RequestError) as caught:
        decode_image(value, ImagePolicy(max_pixels=10_000), param="input[2].image", index=2)
    assert caught.value.status == 400 and (caught.value.param, caught.value.index) == ("input[2].image", 2)
    assert "PNG, JPEG, WebP, GIF or BMP" in str(caught.value)


# --------------------------------------------------------------------------------------------------------
# Remote images: the address checked is the address connected to (no DNS rebinding), at every hop
# --------------------------------------------------------------------------------------------------------


class _ImageHost(ThreadingHTTPServer):
    """A loopback HTTP server: `/start` redirects to `redirect_to`, `/x.png` is a PNG; it records each request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.redirect_to = ""
        super().__init__(("127.0.0.1", 0), _ImageHandler)

    @property
    def port(self) -> int:
        return self.server_address[1]


class _ImageHandler(BaseHTTPRequestHandler):
    server: _ImageHost

    def do_GET(self) -> None:  # noqa: N802 - the http.server name
        self.server.requests.append((self.path, self.headers["Host"]))
        if self.path == "/start":
            self.send_response(302)
            self.send_header("Location", self.server.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = _png((30, 20))
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args) -> None:  # noqa: A002 - quiet
        pass


@pytest.fixture
def image_host():
    server = _ImageHost()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


class _RebindingDNS:
    """`socket.getaddrinfo` in which each test name resolves to `first` once, then to `later` (DNS rebinding).

    Other names (the IP literals a client connects to) resolve as usual.
    """

    def __init__(self, names: set[str], first: str, later: str) -> None:
        self.names, self.first, self.later = names, first, later
        self.calls: list[str] = []
        self.real = socket.getaddrinfo

    def __call__(self, host, port, *args, **kwargs):
        if host not in self.names:
            return self.real(host, port, *args, **kwargs)
        address = self.later if host in self.calls else self.first
        self.calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, int(port)))]


def test_a_name_rebound_to_loopback_after_the_check_is_never_connected(image_host, monkeypatch):
    """The check sees a public address; a second lookup would give loopback, where the image host listens."""
    dns = _RebindingDNS({"images.example"}, first="93.184.215.14", later="127.0.0.1")
    monkeypatch.setattr(socket, "getaddrinfo", dns)
    policy = ImagePolicy(max_pixels=10_000, allow_remote=True, timeout_s=0.5)
    with pytest.raises(RequestError) as caught:  # the public address is not reachable from here
        fetch_public_image(f"http://images.example:{image_host.port}/x.png", policy, param="input[0].image", index=0)
    assert caught.value.param == "input[0].image"
    assert dns.calls == ["images.example"]  # resolved once: for the check
    assert image_host.requests == []  # nothing reached the rebound address


def test_every_redirect_hop_connects_to_the_address_it_checked(image_host, monkeypatch):
    """Where the check allows loopback (here only 127.0.0.1), a fetch through a redirect reaches the image; were a
    name looked up again, it would resolve to 127.0.0.2, where nothing listens."""
    dns = _RebindingDNS({"first.example", "second.example"}, first="127.0.0.1", later="127.0.0.2")
    monkeypatch.setattr(socket, "getaddrinfo", dns)
    image_host.redirect_to = f"http://second.example:{image_host.port}/x.png"
    policy = ImagePolicy(max_pixels=10_000, allow_remote=True, timeout_s=5)
    raw = fetch_public_image(
        f"http://first.example:{image_host.port}/start",
        policy,
        param="query.image",
        index=None,
        address_allowed=lambda address: address == ipaddress.ip_address("127.0.0.1"),
    )
    assert Image.open(io.BytesIO(raw)).size == (30, 20)
    assert dns.calls == ["first.example", "second.example"]  # one lookup per hop, each the one checked
    port = image_host.port
    assert image_host.requests == [("/start", f"first.example:{port}"), ("/x.png", f"second.example:{port}")]


def test_a_redirect_to_a_non_public_address_is_refused(image_host, monkeypatch):
    dns = _RebindingDNS({"first.example"}, first="127.0.0.1", later="127.0.0.1")
    monkeypatch.setattr(socket, "getaddrinfo", dns)
    image_host.redirect_to = "http://10.0.0.1/x.png"
    with pytest.raises(RequestError, match="non-public"):
        fetch_public_image(
            f"http://first.example:{image_host.port}/start",
            ImagePolicy(max_pixels=10_000, allow_remote=True),
            param="input[1].image",
            index=1,
            address_allowed=lambda address: address.is_loopback,
        )
    assert [path for path, _ in image_host.requests] == ["/start"]


def test_https_keeps_the_host_name_for_sni_while_connecting_to_the_checked_address(monkeypatch, tmp_path):
    """A TLS server on 127.0.0.1 sees the URL's name as SNI; its self-signed certificate is then refused."""
    cert, key = _self_signed(tmp_path, "images.example")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    names: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def accept_one() -> None:
            conn, _ = listener.accept()
            with contextlib.suppress(ssl.SSLError, OSError), context.wrap_socket(conn, server_side=True):
                pass

        thread = threading.Thread(target=accept_one, daemon=True)
        thread.start()
        monkeypatch.setattr(socket, "getaddrinfo", _RebindingDNS({"images.example"}, "127.0.0.1", "127.0.0.2"))
        with pytest.raises(RequestError, match="cannot download") as caught:
            fetch_public_image(
                f"https://images.example:{port}/x.png",
                ImagePolicy(max_pixels=10_000, allow_remote=True, timeout_s=5),
                param="input[0].image",
                index=0,
                address_allowed=lambda address: address.is_loopback,
            )
        thread.join(5)
    assert names == ["images.example"]
    assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)


def _self_signed(folder, name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path
