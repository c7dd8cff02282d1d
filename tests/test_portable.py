"""Runs where Windows puts them: no symbolic links for ``best`` and ``last``, no ``fcntl``.

On Linux the tests take both away -- ``os.symlink`` raises the error an ordinary Windows account
gets, and ``import fcntl`` fails -- and then train, resume, sample, evaluate, export, plot, draw
attention and fine-tune through the pointer files that stand in for the links. The run lock is
tested across processes with ``msvcrt``'s locking contract (a stand-in built on POSIX record
locks, since the real module exists only on Windows).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tinygpt.checkpoint import (
    link_target,
    point_link,
    read_pointer,
    resolve_link,
    resolve_run_path,
    sweep_partials,
)
from tinygpt.errors import TinyGPTError
from tinygpt.runs import prepare_run_dir

from .resume_helpers import env, leftovers, main_in_process, train_in_process

SYMLINK_REFUSED = "A required privilege is not held by the client"  # Windows' words (WinError 1314)


def _refuse_symlink(*args, **kwargs):
    raise OSError(errno.EPERM, SYMLINK_REFUSED)


def windows_like_process(monkeypatch) -> None:
    """This process as on Windows without developer mode: no symbolic links, no fcntl."""
    monkeypatch.setattr(os, "symlink", _refuse_symlink)
    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError


@pytest.fixture
def windows_like(monkeypatch):
    windows_like_process(monkeypatch)


def listing(run: Path) -> dict[str, str]:
    """What the run directory holds: each entry's kind, and a pointer file's text."""
    out = {}
    for p in sorted(run.iterdir()):
        if p.is_symlink():
            out[p.name] = f"symlink -> {os.readlink(p)}"
        elif p.is_dir():
            out[p.name + "/"] = ", ".join(sorted(q.name for q in p.iterdir()))
        elif p.name in ("best", "last"):
            out[p.name] = f"pointer file: {p.read_text(encoding='utf-8')!r}"
        else:
            out[p.name] = f"file, {p.stat().st_size} bytes"
    return out


def digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_without_symlinks_best_and_last_are_pointer_files_every_reader_follows(
        windows_like, monkeypatch, small_text, tmp_path, capsys):
    run = tmp_path / "run"
    train_in_process(small_text, run, max_steps=20, keep=5)
    assert main_in_process("train", "--resume", run, "--max-steps", 30) == 0  # resumed, no links
    print("\n".join(f"{k:18} {v}" for k, v in listing(run).items()), file=sys.__stdout__)
    for name in ("best", "last"):
        assert (run / name).is_file() and not (run / name).is_symlink()
    assert (run / "last").read_text(encoding="utf-8") == "step-000030\n"
    state = json.loads((link_target(run, "last") / "state.json").read_text())
    assert read_pointer(run / "best") == f"step-{state['best_step']:06d}"
    assert leftovers(run) == []  # no temporary pointer files or links left behind

    # The same run and resume where symbolic links work: the same weights, bit for bit.
    monkeypatch.undo()
    ref = tmp_path / "ref"
    train_in_process(small_text, ref, max_steps=20, keep=5)
    assert main_in_process("train", "--resume", ref, "--max-steps", 30) == 0
    assert os.readlink(ref / "last") == "step-000030"
    assert digest(link_target(run, "last")) == digest(ref / "last")
    assert digest(link_target(run, "best")) == digest(ref / "best")
    windows_like_process(monkeypatch)

    # Readers take `best` from the pointer, not the newest folder: point it at an older one.
    (run / "best").write_text("step-000010\n", encoding="utf-8")
    capsys.readouterr()
    for which, step in (("best", 10), ("last", 30)):
        assert main_in_process("eval", run, "--json", "--checkpoint", which) == 0
        result = json.loads(capsys.readouterr().out)
        assert Path(result["checkpoint"]) == run / f"step-{step:06d}" and result["step"] == step
    assert main_in_process("eval", run / "best", "--json") == 0  # the pointer file's own path
    assert json.loads(capsys.readouterr().out)["step"] == 10
    assert main_in_process("sample", run / "last", "--num-chars", 5, "--seed", 3) == 0
    assert main_in_process("sample", run, "--num-chars", 5, "--seed", 3) == 0
    assert main_in_process("export", run, tmp_path / "hf") == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert main_in_process("plot", run, "--out", tmp_path / "loss.png") == 0
    assert main_in_process("attention", run / "best", "--prompt", "To be") == 0
    assert (run / "step-000010" / "attention.png").is_file()  # beside the checkpoint it read
    fine = tmp_path / "fine"
    assert main_in_process("train", "--data", small_text, "--out", fine, "--init-from", run / "best",
                           "--max-steps", 5, "--eval-interval", 5, "--eval-iters", 1,
                           "--sample-chars", 0, "--device", "cpu") == 0
    assert "step-000010" in capsys.readouterr().out  # "weights from RUN/step-000010 ..."
    assert read_pointer(fine / "last") == "step-000005"


def test_resume_drops_a_best_pointer_to_a_folder_that_is_gone(windows_like, small_text, tmp_path):
    run = tmp_path / "run"
    train_in_process(small_text, run, max_steps=20, keep=5)
    (run / "best").write_text("step-000999\n", encoding="utf-8")  # names a folder never made
    assert link_target(run, "best") is None
    assert main_in_process("train", "--resume", run, "--max-steps", 30) == 0
    assert read_pointer(run / "last") == "step-000030"
    assert read_pointer(run / "best") is not None and link_target(run, "best") is not None


def test_a_new_run_refuses_pointer_files_and_overwrite_removes_them(windows_like, tmp_path):
    run = tmp_path / "run"
    (run / "step-000003").mkdir(parents=True)
    point_link(run, "last", "step-000003")
    assert read_pointer(run / "last") == "step-000003"
    with pytest.raises(TinyGPTError, match="already holds a run"):
        prepare_run_dir(run, overwrite=False)
    prepare_run_dir(run, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == []


def test_pointer_files_name_only_step_folders_beside_them(tmp_path):
    (tmp_path / "step-000001").mkdir()
    (tmp_path / "elsewhere").mkdir()
    for text in ("../elsewhere", "elsewhere", str(tmp_path / "step-000001"), "", "step-1x"):
        (tmp_path / "best").write_text(text, encoding="utf-8")
        assert read_pointer(tmp_path / "best") is None and resolve_link(tmp_path / "best") is None
    (tmp_path / "best").write_text("step-000001\r\n", encoding="utf-8")  # as Notepad saves it
    assert resolve_link(tmp_path / "best") == tmp_path / "step-000001"
    assert resolve_run_path(tmp_path / "best") == tmp_path / "step-000001"
    assert resolve_run_path(tmp_path / "elsewhere") == tmp_path / "elsewhere"
    (tmp_path / ".best.x1y2.tmp").write_text("step-000001", encoding="utf-8")  # a save cut short
    assert [p.name for p in sweep_partials(tmp_path)] == [".best.x1y2.tmp"]


def test_where_links_work_they_are_still_links(small_text, tmp_path):
    run = tmp_path / "run"
    train_in_process(small_text, run, max_steps=10)
    assert os.readlink(run / "last") == "step-000010"
    assert link_target(run, "last") == run / "step-000010"


# ------------------------------------------------------------------- the run lock, as on Windows

# Put first on PYTHONPATH, this makes a process Windows-like: no fcntl, no symbolic links, and an
# `msvcrt` whose locking() keeps the Windows contract (LK_NBLCK raises OSError when another
# process holds the byte range; the lock goes with the process) on POSIX record locks.
SITECUSTOMIZE = textwrap.dedent(f"""
    import errno, os, sys, types
    import subprocess  # before `msvcrt` exists: the standard library looks for it to detect Windows
    import fcntl as _posix
    sys.modules["fcntl"] = None
    def _refuse(*args, **kwargs):
        raise OSError(errno.EPERM, {SYMLINK_REFUSED!r})
    os.symlink = _refuse
    msvcrt = types.ModuleType("msvcrt")
    msvcrt.LK_UNLCK, msvcrt.LK_NBLCK = 0, 2
    def locking(fd, mode, nbytes):
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        with open(os.environ["MSVCRT_LOG"], "a") as log:
            log.write(f"{{os.getpid()}} {{mode}} {{pos}} {{nbytes}}\\n")
        if mode == msvcrt.LK_UNLCK:
            return _posix.lockf(fd, _posix.LOCK_UN, nbytes, pos)
        try:
            _posix.lockf(fd, _posix.LOCK_EX | _posix.LOCK_NB, nbytes, pos)
        except OSError:
            raise OSError(errno.EACCES, "Permission denied") from None
    msvcrt.locking = locking
    sys.modules["msvcrt"] = msvcrt
""")

HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from tinygpt.runs import run_lock
    with run_lock(Path(sys.argv[1])):
        print("locked", flush=True)
        sys.stdin.readline()
""")


@pytest.mark.slow  # 15-20 s on a 2-core AVX2 machine
def test_the_run_lock_on_windows_locking_bars_a_second_process_and_dies_with_its_owner(
        small_text, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    log = tmp_path / "msvcrt.log"
    e = env(MSVCRT_LOG=str(log))
    e["PYTHONPATH"] = str(site) + os.pathsep + e["PYTHONPATH"]
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], env=e, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == "locked\n", holder.stderr.read()
        train = [sys.executable, "-m", "tinygpt", "train", "--data", str(small_text), "--out",
                 str(run), "--max-steps", "2", "--eval-interval", "2", "--eval-iters", "1",
                 "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
                 "--batch-size", "4", "--sample-chars", "0", "--device", "cpu"]
        refused = subprocess.run(train, env=e, capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2
        assert refused.stderr.strip() == (
            f"tinygpt train: error: another tinygpt process is training in {run} (pid "
            f"{holder.pid}); wait for it or stop it first")
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup: the lock must go with the process
        holder.wait()
    done = subprocess.run(train, env=e, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    calls = [line.split() for line in log.read_text().splitlines()]
    assert all(c[2] == str(1 << 20) and c[3] == "1" for c in calls)  # one byte, past the pid
    by_process: dict[str, list[str]] = {}
    for pid, mode, _, _ in calls:
        by_process.setdefault(pid, []).append(mode)
    # The holder locked and was killed; the refused run's try failed; the last run locked and
    # unlocked.
    assert list(by_process.values()) == [["2"], ["2"], ["2", "0"]]
    assert list(by_process)[0] == str(holder.pid)
    assert read_pointer(run / "last") == "step-000002"
    assert (run / ".lock").read_text().split()[0] == list(by_process)[2]
