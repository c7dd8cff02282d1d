"""The command line as a user meets it: real subprocesses, exit codes, one-line errors."""

import json

import pytest

TINY = [
    "--n-layer",
    "1",
    "--n-head",
    "2",
    "--n-embd",
    "16",
    "--block-size",
    "16",
    "--batch-size",
    "8",
    "--eval-iters",
    "2",
    "--eval-interval",
    "10",
    "--warmup-steps",
    "2",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run on a non-ASCII text the test writes itself, shared by the sampling tests."""
    from .conftest import run_cli

    tmp = tmp_path_factory.mktemp("cli")
    text = tmp / "lyrics.txt"
    text.write_text("Ünïcödé lyrics — la la lá, 你好 ♪\n" * 60, encoding="utf-8")
    run = tmp / "run"
    proc = run_cli(
        "train",
        "--data",
        text,
        "--out",
        run,
        *TINY,
        "--max-steps",
        "20",
        "--sample-chars",
        "30",
        env={"TINYGPT_HOME": str(tmp / "home")},
    )
    assert proc.returncode == 0, proc.stderr
    return run, proc


def test_train_on_own_non_ascii_text(trained):
    run, proc = trained
    assert "done: 20 steps" in proc.stdout and "--- sample ---" in proc.stdout
    assert "the sample comes from the best checkpoint, step 20" in proc.stdout
    assert "copying: the longest run also in the training text is" in proc.stdout
    state = json.loads((run / "last" / "state.json").read_text())
    assert "♪" in state["tokenizer"]["chars"] and "你" in state["tokenizer"]["chars"]


@pytest.mark.slow  # 15-20 s on a 2-core AVX2 machine
def test_sample_is_reproducible_and_greedy_is_deterministic(trained, cli):
    run, _ = trained
    a = cli("sample", run, "--prompt", "la ", "--num-chars", "40", "--seed", "7", check=True)
    b = cli("sample", run, "--prompt", "la ", "--num-chars", "40", "--seed", "7", check=True)
    assert a.stdout == b.stdout and a.stdout.startswith("la ")
    assert len(a.stdout) == len("la ") + 40 + 1
    g1 = cli("sample", run, "--temperature", "0", "--seed", "1", "--num-chars", "30", check=True)
    g2 = cli("sample", run, "--temperature", "0", "--seed", "2", "--num-chars", "30", check=True)
    k1 = cli("sample", run, "--top-k", "1", "--seed", "3", "--num-chars", "30", check=True)
    assert g1.stdout == g2.stdout == k1.stdout


def test_num_samples(trained, cli):
    run, _ = trained
    out = cli("sample", run, "--num-samples", "3", "--num-chars", "10", "--seed", "0", check=True)
    assert out.stdout.count("--- sample") == 3


@pytest.mark.slow  # 10-30 s on a 2-core AVX2 machine
def test_eval_json(trained, cli):
    run, _ = trained
    result = json.loads(cli("eval", run, "--json", check=True).stdout)
    assert {"val_loss", "bits_per_char", "tokens"} <= result.keys()
    human = cli("eval", run, check=True).stdout
    assert "bits/char" in human


@pytest.mark.slow  # 15-20 s on a 2-core AVX2 machine
def test_toml_config_is_read_and_flags_win(small_text, tmp_path, cli):
    conf = tmp_path / "run.toml"
    conf.write_text(
        f'data = "{small_text.as_posix()}"\nout = "{(tmp_path / "r").as_posix()}"\n'
        "n-layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 16\nbatch_size = 4\n"
        "max_steps = 50\neval_iters = 1\neval_interval = 5\nsample_chars = 0\n"
    )
    proc = cli("train", "--config", conf, "--max-steps", "3")
    assert proc.returncode == 0, proc.stderr
    state = json.loads((tmp_path / "r" / "last" / "state.json").read_text())
    assert state["step"] == 3 and state["model_config"]["n_layer"] == 1


def test_help_shows_the_true_defaults(cli):
    """The default shown is the default preset's (modern), and the presets that differ."""
    out = " ".join(cli("train", "--help", check=True, env={"COLUMNS": "10000"}).stdout.split())
    assert "peak learning rate (AdamW) (default: 0.003; presets: cpu=0.001, lecture=0.0003" in out
    assert "(default: rope; presets: cpu=learned" in out
    assert "default: modern for --model gpt" in out and "BPE" in out


def _bad_cases(tmp):
    """(name, argv, expected fragment of the one-line message)."""
    bad_utf8 = tmp / "bad.txt"
    bad_utf8.write_bytes(b"good text " * 20 + b"\xc3\x28 tail")
    empty = tmp / "empty.txt"
    empty.write_text("")
    nodir = tmp / "no_text_dir"
    nodir.mkdir()
    (nodir / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF")  # binary: skipped
    short = tmp / "short.txt"
    short.write_text("abcdefghij" * 10)
    ok = tmp / "ok.txt"
    ok.write_text("some ordinary text for a tiny model to read. " * 40)
    toml_bad = tmp / "bad.toml"
    toml_bad.write_text("n_layer = 'two'\n")
    toml_dtype = tmp / "dtype.toml"
    toml_dtype.write_text("dtype = 'fp8'\n")
    toml_qk = tmp / "qk.toml"
    toml_qk.write_text("qk_norm = 'l2'\n")
    toml_unknown = tmp / "unknown.toml"
    toml_unknown.write_text("layers = 2\n")
    train = ["train", "--out", tmp / "r", "--max-steps", "1", "--sample-chars", "0"]
    return [
        ("missing path", [*train, "--data", tmp / "missing.txt"], "no such file or directory"),
        ("empty file", [*train, "--data", empty], "contains no text"),
        ("dir without text", [*train, "--data", nodir], "contains no UTF-8 text files"),
        ("invalid utf-8", [*train, "--data", bad_utf8], "invalid UTF-8 at byte offset 200"),
        ("split too short", [*train, "--data", short, "--block-size", "16"], "val split has 10"),
        ("unknown dataset", [*train, "--data", "shakespear"], "built-in dataset"),
        ("unknown preset", [*train, "--data", ok, "--preset", "huge"], "invalid choice"),
        ("unknown model", [*train, "--data", ok, "--model", "rnn"], "invalid choice"),
        ("lr <= 0", [*train, "--data", ok, "--lr", "0"], "lr must be a positive"),
        ("n_embd % n_head", [*train, "--data", ok, "--n-embd", "30", "--n-head", "4"], "divisible"),
        ("block_size <= 0", [*train, "--data", ok, "--block-size", "0"], "block_size"),
        ("dropout >= 1", [*train, "--data", ok, "--dropout", "1.0"], "dropout"),
        ("dropout < 0", [*train, "--data", ok, "--dropout", "-0.5"], "dropout"),
        ("attn_dropout >= 1", [*train, "--data", ok, "--attn-dropout", "1.5"],
         "attn_dropout must be in [0, 1)"),
        ("batch_size 0", [*train, "--data", ok, "--batch-size", "0"], "batch_size"),
        ("batch_start 0", [*train, "--data", ok, "--batch-start", "0"], "batch_start must be"),
        ("unknown qk-norm", [*train, "--data", ok, "--qk-norm", "l2"], "invalid choice"),
        ("toml qk_norm", ["train", "--config", toml_qk], "qk_norm must be one of"),
        ("bad max-time", [*train, "--data", ok, "--max-time", "soon"], "cannot read duration"),
        ("unknown dtype", [*train, "--data", ok, "--dtype", "float8"], "invalid choice"),
        ("toml dtype", ["train", "--config", toml_dtype], "unknown dtype 'fp8'"),
        ("non-number flag", [*train, "--data", ok, "--lr", "fast"], "invalid float value"),
        ("toml wrong type", ["train", "--config", toml_bad], "n_layer must be a int"),
        ("toml unknown key", ["train", "--config", toml_unknown], "unknown setting 'layers'"),
        ("toml missing", ["train", "--config", tmp / "nope.toml"], "config file not found"),
        ("sample: no checkpoint", ["sample", nodir], "holds no checkpoint"),
        ("sample: no run dir", ["sample", tmp / "nope"], "no such run directory"),
        ("eval: no checkpoint", ["eval", nodir], "holds no checkpoint"),
    ]


def test_bad_input_gives_one_line_and_status_2(tmp_path, capsys):
    """In this process (each case in a fresh process would take a second or two)."""
    from tinygpt.cli import main

    for name, argv, fragment in _bad_cases(tmp_path):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse's own usage errors
            code = e.code
        err = capsys.readouterr().err.strip()
        assert code == 2, (name, code, err)
        assert "Traceback" not in err and len(err.splitlines()) == 1, (name, err)
        assert fragment in err, (name, err)


def test_a_bad_input_in_a_real_process_is_one_line_and_status_2(tmp_path, cli):
    proc = cli("train", "--data", tmp_path / "missing.txt", "--out", tmp_path / "run")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"tinygpt train: error: no such file or directory: {tmp_path / 'missing.txt'}"]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--prompt", "QXZ∆"], "does not know: 'Q', 'X', 'Z', '∆'"),
        (["--temperature", "-1"], "--temperature must be"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--top-k", "-1"], "--top-k must be"),
        (["--temperature", "2.5"], "--temperature must be between 0 and 2"),
        (["--num-chars", "-5"], "--num-chars must be"),
        (["--num-samples", "0"], "--num-samples must be"),
        (["--stop", ""], "--stop must be"),
    ],
)
def test_bad_sampling_input(trained, capsys, args, fragment):
    """In this process (a real one is above): each refusal is one line and status 2."""
    from tinygpt.cli import main

    run, _ = trained
    assert main(["sample", str(run), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err


def test_unknown_checkpoint_version_via_cli(trained, cli, tmp_path):
    import shutil

    run, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    from .test_checkpoint import set_format_version

    for folder in copy.iterdir():
        if folder.is_dir():
            set_format_version(folder, 42)
    proc = cli("sample", copy)
    assert proc.returncode == 2 and "format version 42" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["train", "sample", "eval", "serve"])
@pytest.mark.parametrize("device", ["gpu", "cuda:99"])
def test_every_command_checks_the_device_name_in_one_line(tmp_path, capsys, command, device):
    """One check for every command: an unknown name, or a CUDA device this machine lacks."""
    from tinygpt.cli import main

    where = [] if command == "train" else [str(tmp_path)]
    assert main([command, *where, "--device", device]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "device" in err[0] and "Traceback" not in err[0]
