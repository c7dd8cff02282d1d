"""Many learners' files at once (the instructor's case): each is checked in its own process,
with a time limit and a memory cap, so that a file that hangs, crashes or exits the interpreter
does not stop the others. The results are one table.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tinygpt.learner.checks import CHECKS, FAIL, SYMBOL
from tinygpt.learner.spec import parse_spec

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MEMORY = 8 << 30  # bytes of address space per checked file


def expand(specs: list[str]) -> list[str]:
    """Files and folders (every ``*.py`` under a folder, sorted) as ``FILE.py[:NAME]`` specs."""
    out = []
    for spec in specs:
        path, _ = parse_spec(spec)
        p = Path(path)
        if p.is_dir():
            out += [str(f) for f in sorted(p.rglob("*.py"))]
        else:
            out.append(spec)
    return out


def _limit_memory(limit: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def check_in_process(spec: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                     memory: int | None = DEFAULT_MEMORY) -> dict:
    """``tinygpt check --json SPEC`` in a child process; a row whatever becomes of it."""
    cmd = [sys.executable, "-m", "tinygpt", "check", "--json", spec]
    here = str(Path(__file__).resolve().parents[2])  # the child imports this same tinygpt
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    limit = (lambda: _limit_memory(memory)) if memory and os.name == "posix" else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True, preexec_fn=limit)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"file": spec, "error": f"timed out after {timeout_s:g} s (killed)"}
    try:
        row = json.loads(out.strip().splitlines()[-1])
        if isinstance(row, dict):
            return row
    except (ValueError, IndexError):
        pass
    last = (err.strip().splitlines() or [""])[-1][:160]
    code = proc.returncode
    how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
    how = f"the file's code ended the process ({how})"
    if "MemoryError" in err or "Cannot allocate memory" in err:
        how += " (out of memory under the cap)"
    return {"file": spec, "error": f"{how}{': ' + last if last else ''}"}


def format_table(rows: list[dict]) -> str:
    """One line per file: file, class, each check (ok/warn/FAIL/skip), parameters, loss at init;
    then every failure's message, numbered by file."""
    head = ["file", "class", *CHECKS, "params", "init loss"]
    table = [head]
    notes = []
    for i, r in enumerate(rows, 1):
        if "error" in r:
            table.append([r["file"], "-", *["-"] * len(CHECKS), "-", "-"])
            notes.append(f"[{i}] {r['file']}: {r['error']}")
            continue
        status = {c["name"]: c for c in r["checks"]}
        cells = [SYMBOL[status[n]["status"]].strip() if n in status else "-" for n in CHECKS]
        loss = r.get("init_loss")
        table.append([r["file"], r.get("class") or "-", *cells,
                      f"{r['params']:,}" if r.get("params") is not None else "-",
                      f"{loss:.3f}" if loss is not None else "-"])
        for c in r["checks"]:
            if c["status"] == FAIL:
                notes.append(f"[{i}] {r['file']}: {c['name']}: {c['message']}")
    widths = [max(len(row[j]) for row in table) for j in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines + ([""] + notes if notes else []))
