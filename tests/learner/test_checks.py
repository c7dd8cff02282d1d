"""``tinygpt check`` on a zoo of learners' models, each with one bug of the lecture's kind: the
check that must catch it fails (or warns) with the message that names the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from tinygpt.learner.checks import FAIL, PASS, SKIP, WARN, check_spec, run_check, width_scalings
from tinygpt.learner.source import LearnerFileError, find_class, load_file

ZOO = Path(__file__).parent / "zoo"

# (file, the check that catches its bug, status, words the message must hold)
BUGS = [
    ("no_mask.py", "causal", FAIL, ["sees the future", "tril", "masked_fill"]),
    ("plain_list.py", "learns", FAIL, ["blocks.0.sa.heads is a plain Python list of 4 Head",
                                        "nn.ModuleList"]),
    ("no_crop.py", "generate", FAIL, ["longer than block_size (8)", "idx[:, -block_size:]",
                                      "no_crop.py line"]),
    ("unflattened.py", "forward", FAIL, ["logits.view(B*T, C)", "targets.view(B*T)"]),
    ("width_scale.py", "scale", WARN, ["C**-0.5", "head size (8)", "2.0x too small", "softmax"]),
    ("ignores_targets.py", "forward", FAIL, ["ignores its targets"]),
    ("eval_dropout.py", "eval", FAIL, ["training=self.training"]),
    ("no_generate_cat.py", "generate", FAIL, ["(B, T + n)", "torch.cat"]),
    ("unused_layer.py", "learns", FAIL, ["ln_f.weight", "no gradient"]),
    ("detached.py", "learns", FAIL, ["token_embedding_table.weight", ".detach()"]),
    ("bigram_ok.py", "init_loss", WARN, ["ln(65) = 4.174", "lecture's bigram"]),
]


@pytest.mark.parametrize(("name", "check", "status", "words"), BUGS, ids=[b[0] for b in BUGS])
def test_the_zoo_is_caught_by_the_right_check(name, check, status, words):
    result = run_check(str(ZOO / name), check)
    assert result.status == status, result.message
    for w in words:
        assert w in result.message


@pytest.mark.parametrize("check", ["causal", "learns", "generate", "forward", "eval", "scale"])
def test_the_correct_gpt_passes_what_the_zoo_fails(check):
    assert run_check(str(ZOO / "gpt_ok.py"), check).status == PASS


def test_a_correct_lecture_gpt_passes_every_check():
    report = check_spec(str(ZOO / "gpt_ok.py"))
    assert report.ok and report.cls == "GPTLanguageModel"
    assert [c.status for c in report.checks] == [PASS] * 9
    assert report.params == 29_761 and abs(report.init_loss - 4.174) < 0.1
    # the script part is named, not run (it would read input.txt and exit)
    assert any("with open('input.txt'" in s for s in report.skipped)
    assert any("for iter in range(max_iters)" in s for s in report.skipped)


def test_a_forward_that_fails_skips_the_checks_that_need_it():
    report = check_spec(str(ZOO / "unflattened.py"))
    status = {c.name: c.status for c in report.checks}
    assert not report.ok and status["forward"] == FAIL
    assert status["causal"] == status["overfit"] == SKIP
    assert status["generate"] == PASS  # generate calls forward without targets: it works


def test_a_constructor_tinygpt_cannot_call_fails_to_build():
    report = check_spec(str(ZOO / "needs_config.py"))
    assert report.checks[0].status == FAIL and "needs config" in report.checks[0].message


def test_finding_the_class():
    loaded = load_file(ZOO / "two_models.py")
    with pytest.raises(LearnerFileError, match="several model classes"):
        find_class(loaded, None)
    assert find_class(loaded, "OtherModel").__name__ == "OtherModel"
    with pytest.raises(LearnerFileError, match="no nn.Module class Nope"):
        find_class(loaded, "Nope")
    with pytest.raises(LearnerFileError, match="no such file"):
        load_file(ZOO / "missing.py")


def test_only_definitions_and_constants_run(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import math\nn_embd = 4 * 8\nscale = n_embd ** -0.5\nprint('hi')\n"
                 "x = open('nope').read()\nfor i in range(3):\n    pass\n"
                 "def f():\n    return n_embd\nif __name__ == '__main__':\n    f()\n")
    loaded = load_file(f)
    m = loaded.module
    assert m.n_embd == 32 and m.f() == 32 and m.math.pi > 3
    assert not hasattr(m, "x")
    assert [s.split(":")[0] for s in loaded.skipped] == ["line 4", "line 5", "line 6", "line 10"]


def test_the_width_scaling_is_found_only_where_it_is():
    slip = "class H:\n    def forward(self, x):\n        B, T, C = x.shape\n        w = q * C**-0.5\n"
    good = slip.replace("C**-0.5", "k.shape[-1]**-0.5")
    assert width_scalings(slip) == [("H", 4)]
    assert width_scalings(good) == []
