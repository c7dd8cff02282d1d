"""Data-parallel training with torchrun on CPUs: gloo, two processes on 127.0.0.1.

The global batch of a step depends only on (seed, step), so one process with batch 16, two with
8 rows each, and one with two micro-batches of 8 take the same steps; they differ only in the
order floats are summed (the gradient average is computed in another order), which after 20 AdamW
steps of this tiny model stays below 1e-4 in every weight. The same two-process command, killed
and resumed, repeats the exact arithmetic (one thread per process on a 2-core machine), so its
weights are bitwise those of a run never killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from .resume_helpers import (
    env,
    flags,
    losses,
    main_in_process,
    tiny_settings,
    train_in_process,
    weights_digest,
)

DDP = dict(dropout=0.0, batch_size=16, max_steps=20, eval_interval=10)


def launch(*train_args) -> list[str]:
    return [sys.executable, "-m", "tinygpt", "launch", "--standalone", "--nproc-per-node", "2",
            "train", *map(str, train_args)]


def run_launch(*train_args, extra_env: dict | None = None, timeout: float = 300):
    return run_job(launch(*train_args), extra_env, timeout)


def run_job(cmd: list[str], extra_env: dict | None = None, timeout: float = 300):
    """Run a launcher in its own process group, and leave no process of it behind."""
    proc = subprocess.Popen(cmd, env=env(**(extra_env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "last" / "model.safetensors"))


def max_weight_gap(a, b) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def loss_gap(a, b) -> float:
    la, lb = losses(a), losses(b)
    assert [x[0] for x in la] == [x[0] for x in lb]  # the same evaluation steps
    return max(abs(x[i] - y[i]) for x, y in zip(la, lb) for i in (1, 2))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One uninterrupted two-process run, shared by the tests below."""
    root = tmp_path_factory.mktemp("ddp")
    text = root / "corpus.txt"
    text.write_text("".join(f"line {i}: the quick brown fox, naive cafe {i * 7}\n"
                            for i in range(300)), encoding="utf-8")
    run = root / "two"
    proc = run_launch(*flags(tiny_settings(text, run, **DDP)))
    assert proc.returncode == 0, proc.stderr
    return text, run, proc


def test_two_processes_train_one_model_and_rank_0_alone_reports(two_ranks):
    _, run, proc = two_ranks
    assert proc.stdout.count("done: 20 steps") == 1  # rank 0 prints, rank 1 does not
    assert [x[0] for x in losses(run)] == [0, 10, 20]
    assert (run / "loss.png").is_file() and (run / "config.json").is_file()


def test_the_update_does_not_depend_on_the_world_size(two_ranks, tmp_path):
    """1 x 16, 2 x 8 and 1 x (2 micro-batches of 8): the same steps up to summation order."""
    text, two, _ = two_ranks
    one = tmp_path / "one"
    train_in_process(text, one, **DDP)
    accum = tmp_path / "accum"
    train_in_process(text, accum, grad_accum=2, **DDP)
    assert max_weight_gap(one, two) < 1e-4 and loss_gap(one, two) < 1e-4
    assert max_weight_gap(one, accum) < 1e-4 and loss_gap(one, accum) < 1e-4


@pytest.mark.slow  # 25-60 s on a 2-core AVX2 machine
def test_a_killed_worker_then_the_same_command_with_resume_ends_bitwise_identical(
        two_ranks, tmp_path):
    text, ref, _ = two_ranks
    run = tmp_path / "run"
    args = flags(tiny_settings(text, run, **DDP))
    proc = run_launch(*args, extra_env={"TINYGPT_FAULT_AFTER": "step@13",
                                        "TINYGPT_FAULT_RANK": "1"})
    assert proc.returncode == 128 + signal.SIGKILL, proc.stderr  # torchrun stopped the others
    assert (run / "last").resolve().name == "step-000010"
    single = tmp_path / "single"
    shutil.copytree(run, single, symlinks=True)
    resumed = run_launch(*args, "--resume", run)
    assert resumed.returncode == 0, resumed.stderr
    assert weights_digest(run) == weights_digest(ref)
    assert losses(run) == losses(ref)

    # The same checkpoint continued by one process: the same batches, other summation order.
    assert main_in_process("train", "--resume", single, "--out", single) == 0
    assert loss_gap(single, ref) < 1e-4 and max_weight_gap(single, ref) < 1e-4


@pytest.mark.slow  # 25-60 s on a 2-core AVX2 machine
def test_max_restarts_continues_from_the_newest_checkpoint(two_ranks, tmp_path):
    """torchrun --max-restarts reruns the same command after a worker dies: the run continues
    from its checkpoint (instead of refusing to overwrite it) and ends as if never stopped."""
    text, ref, _ = two_ranks
    run = tmp_path / "run"
    cmd = launch(*flags(tiny_settings(text, run, **DDP)))
    cmd.insert(cmd.index("train"), "--max-restarts=1")
    proc = run_job(cmd, {"TINYGPT_FAULT_AFTER": "step@13", "TINYGPT_FAULT_RANK": "1",
                         "TINYGPT_FAULT_ONCE": str(tmp_path / "fired")})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "fired").exists()  # a worker did die once
    assert weights_digest(run) == weights_digest(ref)
    assert losses(run) == losses(ref)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_sigterm_to_the_launcher_saves_one_checkpoint_that_every_rank_agrees_on(
        two_ranks, tmp_path, request):
    """The ranks agree on the step to stop at (a signal on any rank stops all at the same step);
    rank 0 saves it and alone reports it; the launcher exits 143 once both workers have left on
    their own. torchrun waits 30 s for a worker that does not end on SIGTERM, then kills it and
    says so: a worker that ended its group while gloo's threads were still releasing the last
    collective did that in 7 of 37 jobs on a busy CPU (docs/distributed.md)."""
    text, _, _ = two_ranks
    run = tmp_path / "run"
    settings = tiny_settings(text, run, **{**DDP, "max_steps": 100_000, "eval_interval": 100_000,
                                           "save_every": "300ms"})
    proc = subprocess.Popen(launch(*flags(settings)), env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    request.addfinalizer(lambda: _kill_group(proc))
    deadline = time.monotonic() + 120
    seen = 0
    while seen == 0 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
        if (run / "last").exists():
            seen = json.loads((run / "last" / "state.json").read_text())["step"]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "forcefully exiting" not in err, err
    lines = [x for x in err.splitlines() if "stopped by SIGTERM" in x]
    assert len(lines) == 1  # one report, from rank 0
    step = json.loads((run / "last" / "state.json").read_text())["step"]
    assert step >= seen > 0 and f"at step {step}, checkpoint saved (step {step})" in lines[0]
    assert "the same launch command with train --resume" in lines[0]


def test_a_bad_data_path_stops_the_whole_job_with_one_line(tmp_path):
    proc = run_launch("--data", tmp_path / "missing.txt", "--out", tmp_path / "run", timeout=120)
    assert proc.returncode == 2
    errors = [x for x in proc.stderr.splitlines() if "error" in x.lower()]
    assert errors == [f"tinygpt launch: error: no such file or directory: {tmp_path / 'missing.txt'}"]
    assert "Traceback" not in proc.stderr
    # Plain torchrun: each rank says what is wrong and the job ends (torchrun's own exit status).
    start = time.monotonic()
    plain = run_job([sys.executable, "-m", "torch.distributed.run", "--standalone",
                     "--nproc-per-node", "2", "-m", "tinygpt", "train", "--data",
                     str(tmp_path / "missing.txt"), "--out", str(tmp_path / "run")], timeout=120)
    assert plain.returncode != 0 and time.monotonic() - start < 120
    assert "tinygpt train: error: no such file or directory" in plain.stderr


def test_a_batch_that_does_not_split_is_refused_before_any_process_starts(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("abcdefgh" * 200, encoding="utf-8")
    proc = run_launch(*flags(tiny_settings(text, tmp_path / "run", batch_size=9)), timeout=120)
    assert proc.returncode == 2
    assert "--batch-size 9 does not split into 2 process(es)" in proc.stderr
    assert not (tmp_path / "run").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_rendezvous_on_localhost(two_ranks, tmp_path, request):
    """Two launches with --nnodes 2 (one process each) meet at a c10d rendezvous on 127.0.0.1
    and train the same model as one launch with two processes."""
    text, ref, _ = two_ranks
    run = tmp_path / "run"
    endpoint = f"127.0.0.1:{_free_port()}"
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "tinygpt", "launch", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
               "--rdzv-id", "tinygpt-test", "train", *flags(tiny_settings(text, run, **DDP))]
        procs.append(subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, start_new_session=True))
        request.addfinalizer(lambda p=procs[-1]: _kill_group(p))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert max_weight_gap(run, ref) < 1e-4


def test_the_environment_of_one_process_is_a_world_of_one():
    from tinygpt.distributed import SINGLE, env_from_torchrun

    assert os.environ.get("WORLD_SIZE") is None and env_from_torchrun() == SINGLE
    assert SINGLE.share(32) == slice(0, 32)


_TEARDOWN = """
import os, sys, torch
from torch.nn.parallel import DistributedDataParallel
from tinygpt import distributed

def gloo_threads():
    names = []
    for t in os.listdir("/proc/self/task"):
        try:
            names.append(open(f"/proc/self/task/{t}/comm").read().strip())
        except OSError:  # a thread that just ended
            pass
    return names.count("pt_gloo_runloop")

env, _ = distributed.setup("cpu")
model = DistributedDataParallel(torch.nn.Linear(4, 4))
model(torch.randn(2, 4)).sum().backward()
before = gloo_threads()
del model  # as train() drops its wrapper when it returns
distributed.shutdown()
with open(os.path.join(sys.argv[1], f"rank{env.rank}.txt"), "w") as f:  # not one shared stdout
    f.write(f"{before} {gloo_threads()}")
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in Linux's /proc")
def test_shutdown_ends_the_groups_threads_after_ddp(tmp_path):
    """Once the DDP wrapper is gone, ``shutdown`` ends gloo's worker threads: importing
    torch._dynamo only after the group exists (as DDP does) would keep the group alive."""
    script = tmp_path / "teardown.py"
    script.write_text(_TEARDOWN, encoding="utf-8")
    proc = run_job([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", "2", str(script), str(tmp_path)], timeout=120)
    assert proc.returncode == 0, proc.stderr
    for rank in (0, 1):
        before, after = map(int, (tmp_path / f"rank{rank}.txt").read_text().split())
        assert before > 0 and after == 0, (rank, before, after)


# A worker of a torchrun job leaves through tinygpt.distributed.leave: without the interpreter's
# shutdown (where a gloo thread kept alive by DDP can abort the process), but with its output.
_LEAVING = """
import atexit, sys
atexit.register(print, "interpreter shutdown ran")
sys.argv = ["tinygpt", *sys.argv[1:]]
from tinygpt.cli import main
print("before", end="")  # no newline: still in the buffer of a piped stdout
raise SystemExit(main())
"""


@pytest.mark.parametrize("world", [None, "2"])
def test_a_torchrun_worker_leaves_without_the_interpreter_shutdown_but_with_its_output(
        tmp_path, world):
    e = env(**({"WORLD_SIZE": world} if world else {}))
    e.pop("PYTHONUNBUFFERED", None)  # a piped stdout is then block-buffered
    proc = subprocess.run([sys.executable, "-c", _LEAVING, "sample", str(tmp_path / "no-run")],
                          env=e, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("tinygpt sample: error:") and "no-run" in proc.stderr
    shutdown_ran = "interpreter shutdown ran" in proc.stdout
    assert proc.stdout.startswith("before") and shutdown_ran == (world is None)


# Rank 1 stalls (as a hung GPU or a stopped process would); rank 0 waits for it in a collective.
_STALL = """
import sys, time, torch
import torch.distributed as dist
from tinygpt import distributed

env, _ = distributed.setup("cpu", float(sys.argv[1]))
if env.rank == 1:
    time.sleep(120)
start = time.monotonic()
try:
    dist.all_reduce(torch.ones(1))
except Exception as e:
    print(f"rank 0 gave up after {time.monotonic() - start:.1f} s: {type(e).__name__}", flush=True)
    raise SystemExit(1)
"""


@pytest.mark.slow  # 15-20 s on a 2-core AVX2 machine
def test_a_stalled_rank_fails_the_job_within_the_chosen_timeout(tmp_path):
    script = tmp_path / "stall.py"
    script.write_text(_STALL, encoding="utf-8")
    proc = run_job([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", "2", str(script), "3"], timeout=100)
    assert proc.returncode != 0
    line = next(x for x in proc.stdout.splitlines() if x.startswith("rank 0 gave up"))
    waited = float(line.split()[5])
    assert 2.5 <= waited < 60, line  # the chosen 3 s, not the 10 minutes of the default


def test_the_process_group_timeout_is_a_train_setting(tmp_path):
    from tinygpt.config import TrainConfig

    cfg = TrainConfig.resolve({"dist_timeout": "90s"})
    assert cfg.run.dist_timeout_s == 90.0
    assert TrainConfig.resolve({}).run.dist_timeout_s == distributed_default()
    with pytest.raises(ValueError, match="cannot read duration"):
        TrainConfig.resolve({"dist_timeout": "-5s"})
    proc = subprocess.run([sys.executable, "-m", "tinygpt", "train", "--help"], env=env(),
                          capture_output=True, text=True, timeout=60)
    assert "--dist-timeout DURATION" in proc.stdout


def distributed_default() -> float:
    from tinygpt.distributed import DEFAULT_TIMEOUT_S

    return DEFAULT_TIMEOUT_S
