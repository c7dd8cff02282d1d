"""Many files at once: each in its own process; one that hangs or exits does not stop the rest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tinygpt.learner.many import check_in_process, expand, format_table

ZOO = Path(__file__).parent / "zoo"


def test_a_file_that_hangs_is_stopped_at_the_timeout():
    row = check_in_process(str(ZOO / "hangs.py"), timeout_s=1.0)
    assert row == {"file": str(ZOO / "hangs.py"), "error": "timed out after 1 s (killed)"}


def test_a_folder_is_its_python_files_in_order():
    files = expand([str(ZOO), "x.py:Name"])
    assert files[0].endswith("bigram_ok.py") and files[-1] == "x.py:Name"
    assert all(f.endswith(".py") for f in files[:-1]) and len(files) > 10


def test_the_table_has_a_row_per_file_and_the_failures_below():
    ok = {"file": "a.py", "class": "GPT", "params": 1234, "init_loss": 4.17, "ok": True,
          "checks": [{"name": "builds", "status": "pass", "message": ""},
                     {"name": "causal", "status": "fail", "message": "the model sees the future"}]}
    table = format_table([ok, {"file": "b.py", "error": "timed out after 60 s (killed)"}])
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["file", "class", "builds", "forward"]
    assert lines[1].split()[:6] == ["a.py", "GPT", "ok", "-", "-", "FAIL"]
    assert "1,234" in lines[1] and "4.170" in lines[1]
    assert lines[2].split()[0] == "b.py"
    assert "[1] a.py: causal: the model sees the future" in table
    assert "[2] b.py: timed out after 60 s (killed)" in table


@pytest.mark.slow
def test_the_instructors_table(cli):
    files = [ZOO / "bigram_ok.py", ZOO / "crashes.py", ZOO / "hangs.py", ZOO / "no_crop.py"]
    proc = cli("check", *files, "--timeout", "20")
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout
    assert "bigram_ok.py" in out and "the file's code ended the process (exited with status 3)" in out
    assert "hangs.py: timed out after 20 s (killed)" in out
    assert "no_crop.py: generate: generate fails once the text is longer than block_size" in out
    proc = cli("check", ZOO / "bigram_ok.py", ZOO / "gpt_ok.py", "--json")
    rows = json.loads(proc.stdout)["files"]
    assert proc.returncode == 0 and [r["class"] for r in rows] == ["BigramLanguageModel",
                                                                    "GPTLanguageModel"]
