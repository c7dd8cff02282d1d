"""The paths Apple's MPS takes, decided without a Mac: the decisions are functions of the device,
the PyTorch and the macOS versions, so each is forced here. (What has run on real hardware is in
docs/devices.md.)"""

from __future__ import annotations

import platform
import re

import pytest
import torch

from tinygpt import device as dev
from tinygpt.device import autocast_dtype, compile_supported, draw_device, mps_autocast_dtype
from tinygpt.errors import TinyGPTError
from tinygpt.generate import make_generator, sample_next
from tinygpt.sampling import SamplingConfig

MPS = torch.device("mps")  # a device object needs no MPS to exist


@pytest.fixture
def versions(monkeypatch):
    def set_versions(torch_version: str, macos: str) -> None:
        monkeypatch.setattr(torch, "__version__", torch_version)
        monkeypatch.setattr(platform, "mac_ver", lambda: (macos, ("", "", ""), ""))

    return set_versions


def test_auto_and_float32_are_float32_on_mps_whatever_the_versions(versions, monkeypatch):
    monkeypatch.setenv(dev.NATIVE_BF16_ENV, "1")  # even where bf16 is said to be native
    for torch_version, macos in (("2.4.1", "13.6"), ("2.13.0", "15.1")):
        versions(torch_version, macos)
        assert autocast_dtype("auto", MPS) is None
        assert autocast_dtype("float32", MPS) is None


@pytest.mark.parametrize(("torch_version", "macos", "message"), [
    ("2.5.1", "15.0", "needs PyTorch 2.6 or newer (this is 2.5.1)"),
    ("2.6.0", "13.6", "needs macOS 14 or newer (this is 13.6)"),
])
def test_bfloat16_on_mps_is_refused_in_one_line_where_it_would_quietly_not_autocast(
        versions, torch_version, macos, message):
    versions(torch_version, macos)
    with pytest.raises(TinyGPTError, match=re.escape("--dtype bfloat16 on MPS " + message)):
        autocast_dtype("bfloat16", MPS)


def test_bfloat16_and_float16_on_mps_where_pytorch_and_macos_have_them(versions):
    versions("2.13.0+cpu", "14.5")
    assert mps_autocast_dtype("bfloat16") is torch.bfloat16
    assert mps_autocast_dtype("float16") is torch.float16
    versions("2.7.1", "15.0")  # float16 training needs the gradient scaler on MPS (2.8)
    with pytest.raises(TinyGPTError, match="float16 on MPS needs PyTorch 2.8"):
        mps_autocast_dtype("float16")


def test_mps_does_not_compile_and_draws_on_the_cpu():
    assert not compile_supported(MPS) and not compile_supported("mps")
    assert compile_supported("cpu") and compile_supported("cuda:1")
    assert draw_device(MPS) == torch.device("cpu") and draw_device("mps:0").type == "cpu"
    assert draw_device("cuda:1") == torch.device("cuda:1") and draw_device("cpu").type == "cpu"
    assert make_generator(3, MPS).device.type == "cpu"  # no MPS needed to make it


def test_the_draw_happens_on_the_generators_device_and_the_token_comes_back():
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    cfg = SamplingConfig(temperature=1.0)
    a = sample_next(logits, cfg, make_generator(5, "cpu"))
    b = sample_next(logits, cfg, make_generator(5, MPS))  # a CPU generator: the same draws
    assert torch.equal(a, b) and a.shape == (3,) and a.device == logits.device


def test_a_torchrun_job_refuses_mps_in_one_line(monkeypatch):
    from tinygpt import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(TinyGPTError, match="a torchrun job cannot train on MPS; pass --device cpu"):
        distributed.setup("mps")
