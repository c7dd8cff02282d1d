"""One decision for "does this device multiply bf16 natively", forced into each of its answers."""

from __future__ import annotations

import pytest
import torch

from tinygpt import device as dev
from tinygpt.device import autocast_dtype, native_bf16, pick_device
from tinygpt.errors import TinyGPTError


@pytest.fixture
def cpu_flags(monkeypatch):
    """Pretend the CPU reports the given CPUID flags (AMX tiles, AVX512-BF16)."""
    monkeypatch.delenv(dev.NATIVE_BF16_ENV, raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)

    def set_flags(amx: bool, avx512_bf16: bool) -> None:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16,
                            raising=False)
        dev.cpu_has_native_bf16.cache_clear()

    yield set_flags
    dev.cpu_has_native_bf16.cache_clear()


@pytest.mark.parametrize(("amx", "avx512_bf16", "native"), [
    (False, False, False),  # AVX2 only: AMD EPYC/Ryzen, most Intel Core laptops
    (True, False, True),  # AMX (Sapphire Rapids and later Xeons)
    (False, True, True),  # AVX512-BF16 (Cooper Lake, Zen 4)
])
def test_a_cpu_is_native_bf16_only_with_amx_or_avx512_bf16(cpu_flags, amx, avx512_bf16, native):
    cpu_flags(amx, avx512_bf16)
    assert native_bf16(torch.device("cpu")) is native
    assert autocast_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else None)
    assert autocast_dtype("float32", torch.device("cpu")) is None
    assert autocast_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16  # asked for: obeyed


def test_libraries_limited_to_avx2_make_bf16_emulated(cpu_flags, monkeypatch):
    cpu_flags(True, True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    dev.cpu_has_native_bf16.cache_clear()
    assert not native_bf16("cpu")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    dev.cpu_has_native_bf16.cache_clear()
    assert native_bf16("cpu")


@pytest.mark.parametrize(("capability", "native"), [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_cuda_is_native_bf16_from_ampere_on(monkeypatch, capability, native):
    monkeypatch.delenv(dev.NATIVE_BF16_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert native_bf16(torch.device("cuda")) is native
    assert native_bf16(torch.device("cuda:1")) is native


def test_mps_is_not_native_bf16_and_the_override_wins(monkeypatch, cpu_flags):
    cpu_flags(True, True)
    assert native_bf16(torch.device("mps")) is False
    monkeypatch.setenv(dev.NATIVE_BF16_ENV, "0")
    assert native_bf16("cpu") is False
    monkeypatch.setenv(dev.NATIVE_BF16_ENV, "1")
    assert native_bf16("mps") is True


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "CPU", "", "cuda:-1"])
def test_unknown_device_names_are_one_line_errors(name):
    with pytest.raises(TinyGPTError, match="unknown device"):
        pick_device(name)


def test_cpu_and_auto_pick_a_device_here():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(TinyGPTError, match="CUDA is not available"):
            pick_device("cuda:0")


def test_usable_cpus_follows_the_affinity_and_falls_back_to_the_count(monkeypatch):
    import os

    if hasattr(os, "sched_getaffinity"):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})
        assert dev.usable_cpus() == 3
        monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    assert dev.usable_cpus() == 7
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # the count is unknown
    assert dev.usable_cpus() == 1
