"""tinygpt as a wheel: built from the source (``python -m build``), installed into a fresh virtual
environment and run from a directory that has no checkout in it.

The end-to-end test (build, install, then --version, train, sample and serve, each a process that
imports torch) takes about half a minute of CPU time, so it is marked slow; CI runs it on its own
(``pytest -m slow tests/test_wheel.py`` in ``.ci/run``). The cheap tests, in the default suite,
check what the wheel is made from: the files the playground serves are declared as package data,
and the version is written in one place.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import signal
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tinygpt import __version__

REPO = Path(__file__).resolve().parents[1]
STATIC = REPO / "src" / "tinygpt" / "serve" / "static"

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_every_playground_file_is_declared_as_package_data():
    from tinygpt.serve.playground import STATIC_FILES

    globs = pyproject()["tool"]["setuptools"]["package-data"]["tinygpt.serve"]
    shipped = sorted(p.name for p in STATIC.iterdir() if p.is_file())
    assert {"index.html", *STATIC_FILES} <= set(shipped)
    for name in shipped:
        assert any(fnmatch.fnmatch(f"static/{name}", g) for g in globs), (
            f"{name} would be left out of the wheel: add it to package-data"
        )


def test_the_version_is_written_once():
    project = pyproject()
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "tinygpt.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+([a-z]+\d+)?", __version__)


def test_version_flag(capsys):
    from tinygpt.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"tinygpt {__version__}"


# ------------------------------------------------------------------------------- the wheel itself


def _log(lines: list[str], text: str) -> None:
    lines.append(text)
    print(text, flush=True)


def _build(tmp: Path, log: list[str]) -> tuple[Path, Path]:
    """The wheel and sdist of a copy of the source (the build writes egg-info beside it)."""
    pytest.importorskip("build", reason="the wheel test needs the `build` package (dev extra)")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp / "dist"
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(source)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    wheels, sdists = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
    assert [w.name for w in wheels] == [f"tinygpt-{__version__}-py3-none-any.whl"]
    assert [s.name for s in sdists] == [f"tinygpt-{__version__}.tar.gz"]
    _log(log, f"built {wheels[0].name} and {sdists[0].name} from a copy of {REPO}")
    return wheels[0], sdists[0]


def _venv(tmp: Path, wheel: Path, log: list[str]) -> Path:
    """A fresh environment that reuses the installed torch, with tinygpt from ``wheel`` only."""
    env_dir = tmp / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / ("python.exe" if os.name == "nt" else "python")
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _log(log, f"installed {wheel.name} into {env_dir} (its site-packages: {site})")
    return bin_dir


def _clean_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(TINYGPT_HOME=str(home), OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    return env


def _run(bin_dir: Path, args: list[str], cwd: Path, env: dict, log: list[str]) -> str:
    exe = bin_dir / ("tinygpt.exe" if os.name == "nt" else "tinygpt")
    done = subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"tinygpt {' '.join(args)}:\n{done.stderr[-3000:]}"
    _log(log, f"$ tinygpt {' '.join(args)}  (in {cwd})\n  " + done.stdout.strip()[-400:].replace(
        "\n", "\n  "))
    return done.stdout


def _serve(bin_dir: Path, run: Path, cwd: Path, env: dict, log: list[str]) -> None:
    import httpx

    exe = bin_dir / ("tinygpt.exe" if os.name == "nt" else "tinygpt")
    proc = subprocess.Popen([str(exe), "serve", str(run), "--port", "0"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        m = re.search(r" at (http://\S+?)/?(\s|$)", line)
        assert m, f"no URL printed: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        url = m.group(1)
        page = httpx.get(url + "/", timeout=30)
        assert page.status_code == 200 and "/static/app.js" in page.text
        for name in ("app.js", "style.css"):
            r = httpx.get(f"{url}/static/{name}", timeout=30)
            assert r.status_code == 200
            assert r.content == (STATIC / name).read_bytes()  # the package's own file
            _log(log, f"served {url}/static/{name}: {len(r.content)} bytes, {r.headers['content-type']}")
        _log(log, f"served {url}/: {len(page.content)} bytes of HTML")
        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        r = httpx.post(url + "/v1/completions",
                       json={"model": model, "prompt": "To be", "max_tokens": 8}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8
        _log(log, f"POST {url}/v1/completions: {r.json()['choices'][0]['text']!r}")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@pytest.mark.slow
def test_the_wheel_trains_samples_and_serves_without_the_checkout(tmp_path):
    pytest.importorskip("fastapi")
    log: list[str] = []
    wheel, sdist = _build(tmp_path, log)
    bin_dir = _venv(tmp_path, wheel, log)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = _clean_env(tmp_path / "home")
    python = bin_dir / ("python.exe" if os.name == "nt" else "python")
    where = subprocess.run([str(python), "-c", "import tinygpt; print(tinygpt.__file__)"], cwd=work,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    _log(log, f"tinygpt imported from {where}")
    assert Path(where).resolve().is_relative_to((tmp_path / "venv").resolve())
    assert not Path(where).resolve().is_relative_to(REPO.resolve())
    assert _run(bin_dir, ["--version"], work, env, log).strip() == f"tinygpt {__version__}"

    text = work / "poem.txt"
    text.write_text("".join(f"To be, or not to be, line {i}: that is the question.\n"
                            for i in range(200)), encoding="utf-8")
    run = work / "runs" / "poem"
    _run(bin_dir, ["train", "--data", str(text), "--out", str(run), "--max-steps", "20",
                   "--eval-interval", "10", "--eval-iters", "2", "--batch-size", "8",
                   "--block-size", "16", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
                   "--sample-chars", "0", "--device", "cpu"], work, env, log)
    assert (run / "step-000020" / "manifest.json").is_file()
    out = _run(bin_dir, ["sample", str(run), "--prompt", "To be", "--num-chars", "40",
                         "--seed", "1", "--device", "cpu"], work, env, log)
    assert out.startswith("To be") and len(out) >= 40
    _serve(bin_dir, run, work, env, log)
    assert sdist.stat().st_size > 0
