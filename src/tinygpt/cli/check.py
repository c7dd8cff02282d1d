"""``tinygpt check FILE.py[:NAME] ...``: a learner's own model class, checked for the lecture's
usual bugs (``tinygpt.learner``). One file is checked here; several files (or a folder) each in
a process of its own, with a time limit and a memory cap, into one table."""

from __future__ import annotations

import argparse
import json
import sys

from tinygpt.cli.common import EXIT_USAGE, Command

EXIT_FAILED = 1


def add_check_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE.py[:NAME]",
                   help="a Python file, with the class to check after a colon (default: its one "
                   "nn.Module class with forward and generate); several files, or a folder")
    p.add_argument("--json", action="store_true", help="print one JSON object (one per file)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="with several files: seconds each may take before it is stopped "
                   "(default: 60)")
    p.add_argument("--memory", default="8G", metavar="SIZE",
                   help="with several files: the address space each may use, e.g. 4G, 0 for no "
                   "cap (default: 8G)")


def _bytes(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().rstrip("b")
    try:
        n = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"--memory must be a size like 4G or 512M (0: no cap), got {text!r}")
    return int(n)


def cmd_check(args: argparse.Namespace) -> int:
    from tinygpt.learner.many import expand

    if not args.timeout > 0:
        raise ValueError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    memory = _bytes(args.memory)
    specs = expand(args.files)
    if len(specs) == 1 and len(args.files) == 1 and specs == args.files:
        return _check_one(specs[0], args.json)
    if not specs:
        raise ValueError(f"no .py files in {', '.join(args.files)}")
    return _check_many(specs, args.json, args.timeout, memory)


def _check_one(spec: str, as_json: bool) -> int:
    from tinygpt.learner.checks import check_spec, format_report
    from tinygpt.learner.source import LearnerFileError

    try:
        report = check_spec(spec)
    except LearnerFileError as e:
        if not as_json:
            raise
        print(json.dumps({"file": spec, "error": str(e)}))
        return EXIT_USAGE
    print(json.dumps(report.to_dict()) if as_json else format_report(report))
    return 0 if report.ok else EXIT_FAILED


def _check_many(specs: list[str], as_json: bool, timeout: float, memory: int) -> int:
    from tinygpt.learner.many import check_in_process, format_table

    rows = []
    for spec in specs:
        if not as_json:
            print(f"checking {spec} ...", file=sys.stderr, flush=True)
        rows.append(check_in_process(spec, timeout, memory or None))
    if as_json:
        print(json.dumps({"files": rows}))
    else:
        print(format_table(rows))
    bad = [r for r in rows if "error" in r or not r.get("ok")]
    return EXIT_FAILED if bad else 0


CHECK = Command(
    "check", "check your own model class (FILE.py[:NAME]) for the lecture's usual bugs",
    add_check_flags, cmd_check,
    description="Check a model class of your own, written as in the lecture (forward(idx, "
    "targets=None) -> (logits, loss), generate(idx, max_new_tokens)): it builds, its shapes and "
    "loss, the causal mask, every parameter learns, it overfits a batch, generate crops to "
    "block_size, dropout in eval(), the attention scale. Only the file's imports, classes, "
    "functions and constants run, never its script part; that code runs as Python runs it: "
    "this is no sandbox. Exit 0: all pass, 1: a check fails, 2: bad input. See docs/course.md.",
)
