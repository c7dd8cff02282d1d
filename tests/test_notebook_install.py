"""The notebook's first cell: it installs tinygpt only where it is missing, and from where."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "notebooks" / "course.ipynb"


def install_cell() -> str:
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    return "".join(nb["cells"][1]["source"])


@pytest.fixture
def pip_calls(monkeypatch):
    """Run the cell as where tinygpt is missing; the pip commands it would run are recorded."""
    calls: list[list[str]] = []
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tinygpt" else real(name, *a))
    monkeypatch.setattr(subprocess, "check_call", lambda cmd: calls.append(cmd) or 0)
    monkeypatch.delenv("TINYGPT_SOURCE", raising=False)
    monkeypatch.delenv("TINYGPT_REPOSITORY", raising=False)
    return calls


def run_cell(cwd: Path, monkeypatch) -> None:
    monkeypatch.chdir(cwd)
    exec(compile(install_cell(), "course.ipynb[1]", "exec"), {"__name__": "__main__"})


def test_a_checkout_around_the_notebook_is_installed(pip_calls, tmp_path, monkeypatch):
    checkout = tmp_path / "tinygpt"
    (checkout / "src" / "tinygpt").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("", encoding="utf-8")
    (checkout / "docs" / "notebooks").mkdir(parents=True)
    run_cell(checkout / "docs" / "notebooks", monkeypatch)
    assert [c[-4:] for c in pip_calls] == [["pip", "install", "-q", str(checkout)]]


def test_without_a_checkout_the_repository_address_is_installed(pip_calls, tmp_path, monkeypatch):
    monkeypatch.setenv("TINYGPT_REPOSITORY", "https://example.org/tinygpt.git")
    run_cell(tmp_path, monkeypatch)
    assert pip_calls[0][-1] == "git+https://example.org/tinygpt.git"
    monkeypatch.setenv("TINYGPT_SOURCE", str(tmp_path / "tinygpt-0.1.0-py3-none-any.whl"))
    run_cell(tmp_path, monkeypatch)
    assert pip_calls[1][-1] == str(tmp_path / "tinygpt-0.1.0-py3-none-any.whl")


def test_with_nothing_else_it_installs_the_pypi_release_and_says_so(pip_calls, tmp_path,
                                                                    monkeypatch, capsys):
    run_cell(tmp_path, monkeypatch)
    assert [c[-4:] for c in pip_calls] == [["pip", "install", "-q", "tinygpt"]]
    out = capsys.readouterr().out
    assert "installing the tinygpt release from PyPI" in out and "set REPOSITORY" in out


def test_a_failed_install_says_what_to_set(pip_calls, tmp_path, monkeypatch):
    def refuse(cmd):  # what pip does where no release is published (or PyPI is out of reach)
        pip_calls.append(cmd)
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(subprocess, "check_call", refuse)
    with pytest.raises(RuntimeError, match="could not install tinygpt from tinygpt: set REPOSITORY"):
        run_cell(tmp_path, monkeypatch)
    assert len(pip_calls) == 1


def test_another_project_of_the_same_name_is_refused(pip_calls, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tinygpt", "tinygpt.lessons")
                        else real(name, *a))
    with pytest.raises(RuntimeError, match="is not this course's tinygpt"):
        run_cell(tmp_path, monkeypatch)
    assert [c[-1] for c in pip_calls] == ["tinygpt"]


def test_where_tinygpt_is_installed_the_cell_installs_nothing(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(subprocess, "check_call", lambda cmd: calls.append(cmd) or 0)
    run_cell(tmp_path, monkeypatch)
    assert calls == []
