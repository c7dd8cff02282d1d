"""Which device to run on, whether it multiplies bfloat16 natively, and the autocast dtype.

Every command (train, sample, eval, serve) reads ``--device`` through ``pick_device``, so a bad
name gives the same one-line error everywhere. ``native_bf16`` is the one place that decides
whether bfloat16 pays on a device: ``--dtype auto`` and Muon's Newton-Schulz iterations both ask
it. On a CPU without AMX or AVX512-BF16 (most laptops: AVX2 only) a bf16 matrix product is
emulated and runs tens of times slower than float32, so the answer there must be *no*.

Apple's MPS takes the paths known to work there (docs/devices.md has the table of what each
device supports and what has run on real hardware): float32 unless a mixed precision is asked for
and this PyTorch and macOS autocast it (``mps_autocast_dtype``), no ``torch.compile``
(``compile_supported``), and sampling draws on the CPU (``draw_device``): ``torch.multinomial``
on MPS has returned tokens of probability zero.
"""

from __future__ import annotations

import functools
import os
import platform
import re

import torch

from tinygpt.errors import TinyGPTError

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"
# Forces the answer of native_bf16 ("0" or "1"): for tests, and for measuring the float32 path
# on a CPU that has bf16 hardware.
NATIVE_BF16_ENV = "TINYGPT_NATIVE_BF16"


def check_device_name(name: str) -> str:
    """``name`` if it is a device name tinygpt understands; else a one-line ``TinyGPTError``."""
    if not DEVICE_PATTERN.fullmatch(str(name)):
        raise TinyGPTError(f"unknown device {name!r}; use {DEVICE_HELP}")
    return str(name)


def usable_cpus() -> int:
    """How many CPUs this process may run on (its affinity where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` prefers CUDA, then Apple's MPS, then the CPU; an explicit name must exist here."""
    check_device_name(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TinyGPTError(f"--device {name} asked for, but CUDA is not available here")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise TinyGPTError(
                f"--device {name} asked for, but this machine has {torch.cuda.device_count()} "
                f"CUDA device(s)"
            )
    if name == "mps" and not mps_available():
        raise TinyGPTError("--device mps asked for, but MPS is not available here")
    return torch.device(name)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX tiles or AVX512-BF16), by CPUID.

    When oneDNN is limited to an older instruction set (``ONEDNN_MAX_CPU_ISA=AVX2``, as when
    measuring how an AVX2-only CPU behaves) its bf16 products are emulated too, so the answer is no.
    """
    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if isa and isa != "ALL" and not any(k in isa for k in ("BF16", "AMX", "FP16", "AVX10")):
        return False
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in (
        "_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware, so that bf16 pays.

    - CPU: AMX or AVX512-BF16 (read from CPUID by PyTorch); AVX2-only CPUs emulate bf16.
    - CUDA: compute capability 8.0 (Ampere) or newer; older cards emulate it.
    - MPS: no (bf16 matrix products are not faster than float32 there).
    ``$TINYGPT_NATIVE_BF16`` (0 or 1) overrides the answer for every device.
    """
    forced = os.environ.get(NATIVE_BF16_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_capability(index) >= (8, 0)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--dtype name`` on ``device``; None means plain float32.

    ``auto``: bfloat16 where it is native (``native_bf16``); float16 on a CUDA GPU without it
    that has tensor cores (compute capability 7.0+: V100, T4, the RTX 20 series), which needs the
    gradient scaler ``tinygpt.runs`` builds; float32 everywhere else. Never float16 on a CPU:
    there it is emulated (``--dtype float16`` asked for explicitly still is, for tests). MPS has
    its own rules (``mps_autocast_dtype``).
    """
    if torch.device(device).type == "mps":
        return mps_autocast_dtype(name)
    if name == "bfloat16" or (name == "auto" and native_bf16(device)):
        return torch.bfloat16
    if name == "float16" or (name == "auto" and _cuda_tensor_cores(torch.device(device))):
        return torch.float16
    return None


def _cuda_tensor_cores(device: torch.device) -> bool:
    """A CUDA device that multiplies float16 on tensor cores (compute capability 7.0 or newer)."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= (7, 0)


# ---------------------------------------------------------------------------------- Apple's MPS

# The first PyTorch that autocasts each dtype on MPS and trains with it (float16 needs the gradient
# scaler, which reached MPS later), and the first macOS with bfloat16 on the GPU.
MPS_AUTOCAST_TORCH = {"bfloat16": (2, 6), "float16": (2, 8)}
MPS_BF16_MACOS = (14, 0)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:2])


def mps_autocast_dtype(name: str) -> torch.dtype | None:
    """The autocast dtype for ``--dtype name`` on MPS: float32 (None) for ``auto`` -- no MPS
    multiplies bfloat16 faster than float32 -- and a one-line error for a mixed precision this
    PyTorch or macOS cannot autocast there (PyTorch would otherwise warn and quietly run float32)."""
    if name in ("auto", "float32"):
        return None
    need = MPS_AUTOCAST_TORCH.get(name)
    if need is None:
        raise TinyGPTError(f"unknown --dtype {name!r}")
    if _version(torch.__version__) < need:
        raise TinyGPTError(
            f"--dtype {name} on MPS needs PyTorch {'.'.join(map(str, need))} or newer (this is "
            f"{torch.__version__}); upgrade PyTorch or use --dtype float32"
        )
    mac = platform.mac_ver()[0]
    if name == "bfloat16" and mac and _version(mac) < MPS_BF16_MACOS:
        raise TinyGPTError(
            f"--dtype bfloat16 on MPS needs macOS 14 or newer (this is {mac}); use --dtype float32"
        )
    return torch.bfloat16 if name == "bfloat16" else torch.float16


def compile_supported(device: torch.device | str) -> bool:
    """Whether ``--compile`` compiles on ``device``: not on MPS, where PyTorch's compiler backend
    is still a prototype (training there runs the model as it is, with a warning)."""
    return torch.device(device).type != "mps"


def draw_device(device: torch.device | str) -> torch.device:
    """Where sampling draws its random tokens for logits on ``device``: the device itself, except
    MPS, whose ``torch.multinomial`` has drawn tokens of probability zero -- there the draw is on
    the CPU (a (B, V) copy per token; the model still runs on the GPU)."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device
