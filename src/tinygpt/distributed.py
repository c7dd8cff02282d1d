"""Data-parallel training under ``torchrun``: one model replica per process, gradients averaged.

``torchrun --nproc_per_node=N -m tinygpt train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` in their environment. ``setup`` joins them
into one process group -- gloo on CPUs, NCCL on CUDA with one GPU per local rank -- and gives a
CPU rank its share of the cores. Without those variables nothing happens: one process trains as
it always did, and every helper here is then a no-op.

What stays the same whatever the world size:

- the *global* batch of step s is drawn from a generator seeded by (seed, s) alone, and rank r of
  W takes rows r*B/W .. (r+1)*B/W of it (``share``); ``--grad-accum K`` splits a rank's rows into
  K micro-batches;
- dropout masks come from a generator seeded by (seed, step, rank, micro-batch), so no batch or
  dropout random state needs saving, and resuming on another world size continues the same
  sequence of global batches;
- DDP averages gradients before the optimizer step, so every replica applies the same update to
  the same weights: the optimizer states (AdamW moments, Muon momentum) stay identical on every
  rank, and rank 0's checkpoint is everyone's.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as dist

from tinygpt.device import usable_cpus
from tinygpt.errors import TinyGPTError


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints, writes metrics, pictures and checkpoints."""
        return self.rank == 0

    def share(self, batch_size: int) -> slice:
        """The rows of a global batch that this rank trains on."""
        n = batch_size // self.world_size
        return slice(self.rank * n, (self.rank + 1) * n)


SINGLE = DistEnv()
DEFAULT_TIMEOUT_S = 600.0  # how long a rank waits for the others (--dist-timeout's default)


def env_from_torchrun() -> DistEnv:
    """The job as ``torchrun`` describes it in the environment (one process if it does not)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError as e:
        raise TinyGPTError(f"cannot read the torchrun environment: {e}") from None
    if world < 1 or not 0 <= rank < world:
        raise TinyGPTError(f"RANK {rank} and WORLD_SIZE {world} do not describe a job")
    return DistEnv(rank, world, local_rank, local_world)


def setup(device_name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[DistEnv, str]:
    """Join the process group torchrun describes; returns it and the device this rank uses.

    ``device_name`` is ``--device``: under torchrun ``auto`` and ``cuda`` become this rank's own
    GPU (``cuda:LOCAL_RANK``). ``timeout_s`` (``--dist-timeout``) is how long a rank waits for the
    others, at the rendezvous and in every collective, before the run fails: a stalled rank
    stops the job in that time.
    """
    env = env_from_torchrun()
    if not env.enabled:
        return SINGLE, device_name
    cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if cuda or device_name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TinyGPTError(f"--device {device_name} asked for, but CUDA is not available here")
        device_name = f"cuda:{env.local_rank}"
        torch.cuda.set_device(env.local_rank)
    elif device_name == "auto":
        device_name = "cpu"
    elif device_name == "mps":  # gloo and nccl exchange CPU or CUDA tensors only
        raise TinyGPTError("a torchrun job cannot train on MPS; pass --device cpu (or train "
                           "without torchrun on MPS)")
    if device_name == "cpu":
        # torchrun leaves one thread per process; this rank's share of the cores is better.
        torch.set_num_threads(max(1, usable_cpus() // env.local_world_size))
    if not dist.is_initialized():
        # Imported before the group exists: imported afterwards (as DistributedDataParallel
        # does), torch._dynamo keeps the group and its threads alive past shutdown (see leave).
        importlib.import_module("torch._dynamo")

        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(
            backend="nccl" if device_name.startswith("cuda") else "gloo",
            store=_attempt_store(env, timeout), rank=env.rank, world_size=env.world_size,
            timeout=timeout,
            **({"device_id": torch.device(device_name)} if device_name.startswith("cuda") else {}),
        )
    return env, device_name


def _attempt_store(env: DistEnv, timeout: datetime.timedelta) -> dist.Store:
    """The job's key-value store, with its keys under this attempt's name: after a restart
    (``torchrun --max-restarts``) the processes must not find the addresses the processes of the
    failed attempt published there."""
    try:
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError):
        raise TinyGPTError("MASTER_ADDR and MASTER_PORT are not set: start with torchrun") from None
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(host, port, env.world_size, is_master=not agent_store and env.rank == 0,
                          timeout=timeout)
    return dist.PrefixStore(f"tinygpt/attempt-{restart_count()}", store)


def restart_count() -> int:
    """How many times torchrun has restarted this job (``--max-restarts``); 0 without torchrun."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def leave(code: int) -> NoReturn:
    """End a torchrun worker process with exit status ``code``, skipping the interpreter's shutdown.

    The worker's process group is still alive: the CLI does not end it first (``shutdown``).
    Why: gloo's worker threads live as long as the group, and the group lives while anything holds
    it: a ``DistributedDataParallel`` wrapper not yet freed (an exception's traceback keeps the
    training frames, and so the wrapper, alive), or torch._dynamo imported only after the group
    was made (``setup`` imports it first). A gloo thread that releases a finished collective's
    tensors needs the interpreter lock (torch 2.13). If the group ends in the main thread at
    that moment (freeing the last holder), the main thread waits for the gloo thread while holding
    the lock: the worker hangs until torchrun kills it. If Python shuts down at that moment,
    the thread exits inside a C++ destructor and the process aborts ("terminate called without
    an active exception", exit -6). Both happen after the run has finished and saved (how often:
    docs/distributed.md). By the time a worker leaves, everything it writes is written
    (checkpoints are fsynced and renamed as they are saved), so only the output buffers need
    flushing.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken pipe: nothing left to flush
            stream.flush()
    os._exit(code)


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def sum_all(env: DistEnv, values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums of ``values`` over all ranks (float64, so the order barely matters)."""
    if not env.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def max_all(env: DistEnv, value: int, device: torch.device) -> int:
    """The largest ``value`` of any rank: all ranks agree, e.g., that a signal arrived."""
    if not env.enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def step_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (seed, step, ...): different tuples, unrelated seeds."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def batch_generator(seed: int, step: int) -> torch.Generator:
    """The generator of the global batch of ``step``: a function of (seed, step) only."""
    return torch.Generator().manual_seed(step_seed(seed, step))


def seed_dropout(seed: int, step: int, rank: int, micro: int) -> None:
    """Seed the global generators that dropout draws from for one micro-batch of one rank."""
    torch.manual_seed(step_seed(seed, step, rank, micro, 1))


def no_sync(model: torch.nn.Module, sync: bool):
    """DDP's ``no_sync`` for a micro-batch whose gradients are not yet to be averaged."""
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def micro_batches(x: torch.Tensor, y: torch.Tensor, k: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Split a rank's rows (B/W, T) into ``k`` micro-batches of (B/W/k, T)."""
    yield from zip(x.chunk(k), y.chunk(k))
