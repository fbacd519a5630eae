"""A Ray cluster address that does not answer fails within `ray.connect_timeout_s`, naming the address (Ray's own
`ray.init` retries such an address for minutes)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from unime.cli import main
from unime.ray_engine import RayClusterError, RaySettings, ray_cluster


@pytest.fixture
def silent_address():
    """A port that accepts connections and never says a word (a hung head, or another service)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for connection in accepted:
        connection.close()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("kind", ["silent", "closed"])
def test_an_address_that_does_not_answer_fails_within_the_timeout(kind, silent_address):
    import ray

    address = silent_address if kind == "silent" else f"127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    with pytest.raises(RayClusterError, match=f"the Ray cluster at {address} did not answer within 1 s"):
        with ray_cluster(RaySettings(address=address, connect_timeout_s=1.0)):
            pass
    assert time.monotonic() - started < 5
    assert not ray.is_initialized()


def test_the_encode_command_names_the_address(silent_address, tiny_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "a red circle"}\n')
    argv = ["encode", str(corpus), str(tmp_path / "store"), "--model", str(tiny_dir), "--engine", "ray"]
    assert main([*argv, "--ray.address", silent_address, "--ray.connect-timeout-s", "0.5"]) == 2
    error = capsys.readouterr().err
    assert f"the Ray cluster at {silent_address} did not answer within 0.5 s (ray.connect_timeout_s)" in error


def test_a_malformed_address_is_named():
    with pytest.raises(Exception, match="ray.address 'head:port'"):
        with ray_cluster(RaySettings(address="head:port")):
            pass


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_workers", 0), ("batch_size", 0), ("cpus_per_worker", 0.0), ("connect_timeout_s", 0.0), ("max_restarts", -1)],
)
def test_bad_pool_settings_are_named(field, value):
    with pytest.raises(ValueError, match=f"ray.{field}"):
        RaySettings(**{field: value})
