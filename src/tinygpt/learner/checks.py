"""``tinygpt check``: the bugs every learner who codes along with the lecture meets, checked.

Each check gives one line: pass, warn or fail, and a failure says what is wrong in the lecture's
terms and where to look. The model is built small (``CHECK_SIZES``) on the CPU, so a check of
a lecture-sized file takes seconds.
"""

from __future__ import annotations

import ast
import math
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from tinygpt.errors import TinyGPTError
from tinygpt.learner.source import LearnerFileError, LoadedFile, build_model, find_class, load_file
from tinygpt.learner.spec import parse_spec

CHECK_SIZES = {"vocab_size": 65, "block_size": 8, "n_embd": 32, "n_head": 4, "n_layer": 2,
               "dropout": 0.1, "device": "cpu"}
CHECKS = ("builds", "forward", "init_loss", "causal", "learns", "overfit", "generate", "eval",
          "scale")
TITLES = {"builds": "imports and builds", "forward": "forward: logits and loss",
          "init_loss": "loss at initialisation", "causal": "causality",
          "learns": "every parameter learns", "overfit": "overfits one batch",
          "generate": "generate", "eval": "eval() is deterministic", "scale": "attention scale"}
PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"


@dataclass
class Check:
    name: str
    status: str
    message: str = ""


@dataclass
class Report:
    file: str
    cls: str | None = None
    params: int | None = None
    init_loss: float | None = None
    skipped: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["class"] = d.pop("cls")
        d["ok"] = self.ok
        return d


class _Fail(Exception):
    """A check's failure, with its message."""


class _Ctx:
    """What the checks share: the file, the class, a fresh model on demand, a fixed batch."""

    def __init__(self, loaded: LoadedFile, cls: type) -> None:
        self.loaded, self.cls = loaded, cls
        self.init_loss: float | None = None  # set by check_init_loss
        self.V, self.T = CHECK_SIZES["vocab_size"], CHECK_SIZES["block_size"]
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, self.V, (4, self.T), generator=g)
        self.y = torch.randint(0, self.V, (4, self.T), generator=g)

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return build_model(self.cls, self.loaded, dict(CHECK_SIZES))

    def where(self, e: BaseException) -> str:
        """`` (gpt.py line 42, in forward)``: the last frame of the learner's file."""
        frames = [f for f in traceback.extract_tb(e.__traceback__)
                  if f.filename == str(self.loaded.path)]
        if not frames:
            return ""
        f = frames[-1]
        return f" ({self.loaded.path.name} line {f.lineno}, in {f.name})"

    def error(self, e: BaseException) -> str:
        lines = [x for x in str(e).strip().splitlines() if x.strip()]
        return f"{type(e).__name__}: {lines[0] if lines else ''}{self.where(e)}"


def _call(model: nn.Module, ctx: _Ctx, targets: torch.Tensor | None = None):
    try:
        out = model(ctx.x) if targets is None else model(ctx.x, targets)
    except Exception as e:
        text = str(e)
        if targets is not None and ("target" in text or "batch_size" in text):
            raise _Fail(f"F.cross_entropy refused the shapes ({ctx.error(e)}) -- it wants logits "
                        f"(B*T, C) and targets (B*T): logits = logits.view(B*T, C), "
                        f"targets = targets.view(B*T)") from None
        raise _Fail(f"forward raised {ctx.error(e)}") from None
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor)):
        raise _Fail(f"forward must return (logits, loss), it returned {type(out).__name__}")
    return out


def check_forward(ctx: _Ctx) -> str:
    model = ctx.model().eval()
    B, T, V = ctx.x.shape[0], ctx.T, ctx.V
    logits, _ = _call(model, ctx)
    if tuple(logits.shape) != (B, T, V):
        raise _Fail(f"forward(idx) gave logits of shape {tuple(logits.shape)}, expected (B, T, "
                    f"vocab_size) = {(B, T, V)} -- flatten only when targets are given")
    logits, loss = _call(model, ctx, ctx.y)
    if tuple(logits.shape) not in ((B, T, V), (B * T, V)):
        raise _Fail(f"forward(idx, targets) gave logits of shape {tuple(logits.shape)}, expected "
                    f"{(B, T, V)} or {(B * T, V)}")
    if not isinstance(loss, torch.Tensor):
        raise _Fail("forward(idx, targets) returned loss None: it ignores the targets -- compute "
                    "loss = F.cross_entropy(logits, targets) when targets are given")
    if loss.dim() != 0:
        raise _Fail(f"the loss has shape {tuple(loss.shape)}, not a scalar -- "
                    f"F.cross_entropy(logits.view(B*T, C), targets.view(B*T)) gives one number")
    _, other = _call(model, ctx, (ctx.y + 1) % V)
    if torch.allclose(loss, other):
        raise _Fail("the loss is the same for other targets: forward ignores its targets -- "
                    "compute F.cross_entropy(logits, targets), not against idx or a constant")
    return f"logits {tuple(logits.shape)}, scalar loss"


def check_init_loss(ctx: _Ctx) -> tuple[str, str]:
    _, loss = _call(ctx.model().eval(), ctx, ctx.y)
    value, expected = loss.item(), math.log(ctx.V)
    ctx.init_loss = value
    text = f"{value:.3f} at init, ln(vocab_size) = ln({ctx.V}) = {expected:.3f}"
    if not math.isfinite(value):
        raise _Fail(f"the loss at init is {value}: look for a division by zero or a log of 0")
    if value < expected - 1.0:
        raise _Fail(f"{text}: far below a uniform guess, so the model sees the answers -- "
                    f"does forward read the targets, or the future?")
    if value > expected + 3.0:
        raise _Fail(f"{text}: the initial logits are far too large -- initialise the weights "
                    f"smaller (the lecture: nn.init.normal_(weight, std=0.02))")
    if value > expected + 0.25:
        return WARN, (f"{text}: higher than a uniform guess, as the lecture's bigram is (its "
                      f"N(0, 1) embedding makes confident random guesses); smaller initial "
                      f"weights start nearer ln(vocab_size)")
    return PASS, text


def check_causal(ctx: _Ctx) -> str:
    model = ctx.model().eval()
    with torch.no_grad():
        torch.manual_seed(0)  # any randomness left in eval mode draws the same both times
        base = _call(model, ctx)[0]
        for p in (ctx.T - 1, ctx.T // 2):
            x2 = ctx.x.clone()
            x2[:, p] = (x2[:, p] + 1) % ctx.V
            ctx_x, ctx.x = ctx.x, x2
            try:
                torch.manual_seed(0)
                changed = _call(model, ctx)[0]
            finally:
                ctx.x = ctx_x
            diff = (changed[:, :p] - base[:, :p]).abs().max().item()
            if diff > 1e-4:
                raise _Fail(
                    f"changing the token at position {p} changed the logits at earlier positions "
                    f"(by up to {diff:.3g}): the model sees the future, so its training loss "
                    f"drops to near zero and its samples are garbage -- mask the attention scores "
                    f"with the lower-triangular matrix before the softmax: wei = "
                    f"wei.masked_fill(self.tril[:T, :T] == 0, float('-inf'))")
    return "changing a later token never changes earlier logits"


def plain_containers(model: nn.Module) -> list[str]:
    """Sub-modules kept in plain Python lists, tuples or dicts (invisible to ``parameters()``)."""
    found = []
    for path, m in model.named_modules():
        for attr, value in vars(m).items():
            if attr.startswith("_"):
                continue
            items = value.values() if isinstance(value, dict) else value if isinstance(
                value, (list, tuple)) else ()
            mods = [x for x in items if isinstance(x, nn.Module)]
            if mods:
                kind = "dict" if isinstance(value, dict) else type(value).__name__
                fix = "nn.ModuleDict" if kind == "dict" else "nn.ModuleList"
                where = f"{path}.{attr}" if path else attr
                found.append(f"{where} is a plain Python {kind} of {len(mods)} "
                             f"{type(mods[0]).__name__}: their weights are not parameters of "
                             f"the model, so the optimizer never trains them -- use {fix}")
    return found


def check_learns(ctx: _Ctx) -> str:
    model = ctx.model().train()
    hidden = plain_containers(model)
    if hidden:
        raise _Fail("; ".join(hidden))
    _, loss = _call(model, ctx, ctx.y)
    if not loss.requires_grad:
        raise _Fail("the loss has no gradient: forward computes it under torch.no_grad() or "
                    "detaches it")
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if dead:
        shown = ", ".join(dead[:4]) + (f" and {len(dead) - 4} more" if len(dead) > 4 else "")
        raise _Fail(f"{len(dead)} parameter(s) get no gradient: {shown} -- is every layer made "
                    f"in __init__ used in forward, and not cut off by .detach() or "
                    f"torch.no_grad()?")
    n = sum(p.numel() for p in model.parameters())
    return f"all {n:,} parameters get a gradient"


def check_overfit(ctx: _Ctx, steps: int = 60) -> str:
    model = ctx.model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.0)
    first = last = None
    for _ in range(steps):
        _, loss = _call(model, ctx, ctx.y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = loss.item()
        first = last if first is None else first
    if not (math.isfinite(last) and last < 0.5 * first):
        raise _Fail(f"on one batch of {ctx.x.numel()} tokens the loss went from {first:.3f} to "
                    f"{last:.3f} in {steps} steps: it barely learns -- does the loss reach the "
                    f"weights (no .detach(), no torch.no_grad() in forward)?")
    return f"one batch: loss {first:.2f} -> {last:.2f} in {steps} steps"


def check_generate(ctx: _Ctx) -> str:
    model = ctx.model().eval()
    torch.manual_seed(0)
    idx = ctx.x[:2, :3]
    with torch.no_grad():
        try:
            out = model.generate(idx, 5)
        except Exception as e:
            raise _Fail(f"generate(idx, 5) raised {ctx.error(e)}") from None
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, 8):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise _Fail(f"generate(idx of (2, 3), 5) returned {shape}, expected (B, T + n) = "
                        f"(2, 8): append each new token with torch.cat((idx, idx_next), dim=1)")
        if not torch.equal(out[:, :3], idx):
            raise _Fail("generate's output does not start with its input idx")
        n = 2 * ctx.T + 3
        try:
            long = model.generate(idx[:1, :1], n)
        except Exception as e:
            raise _Fail(f"generate fails once the text is longer than block_size ({ctx.T}): "
                        f"{ctx.error(e)} -- crop the context to the last block_size tokens "
                        f"before each forward: idx_cond = idx[:, -block_size:]") from None
    if tuple(long.shape) != (1, 1 + n):
        raise _Fail(f"generate(idx, {n}) returned {tuple(long.shape)}, expected {(1, 1 + n)}")
    if int(long.min()) < 0 or int(long.max()) >= ctx.V:
        raise _Fail("generate returned token ids outside the vocabulary")
    return f"(B, T + n), and {n} tokens past block_size {ctx.T}"


def check_eval(ctx: _Ctx) -> str:
    model = ctx.model().eval()
    with torch.no_grad():
        a, b = _call(model, ctx)[0], _call(model, ctx)[0]
    if not torch.equal(a, b):
        raise _Fail("in eval() two forwards of the same input gave different logits: something "
                    "random runs in eval mode -- use nn.Dropout modules (eval() turns them off), "
                    "not F.dropout(x, p) without training=self.training")
    return "identical logits twice"


def check_scale(ctx: _Ctx, model: nn.Module) -> tuple[str, str]:
    used = {type(m).__name__ for m in model.modules()}
    n_embd, n_head = CHECK_SIZES["n_embd"], CHECK_SIZES["n_head"]
    for cls_name, line in width_scalings(ctx.loaded.path.read_text(encoding="utf-8")):
        if cls_name in used and n_head > 1:
            hs = n_embd // n_head
            return WARN, (
                f"{cls_name}.forward (line {line}) scales the attention scores by C**-0.5, C "
                f"being the embedding width (n_embd, {n_embd} here), not the head size "
                f"({hs}): the scores come out sqrt({n_head}) = {math.sqrt(n_head):.1f}x too "
                f"small, so the softmax is flatter than meant (each head spreads its attention "
                f"more evenly; it still trains) -- scale by k.shape[-1]**-0.5 (head_size)")
    return PASS, "no attention scores scaled by the embedding width"


def _is_minus_half(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return node.value == -0.5
    return (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
            and isinstance(node.operand, ast.Constant) and node.operand.value == 0.5)


def _unpacked_width(node: ast.AST) -> str | None:
    """``C`` of ``B, T, C = x.shape`` (or ``x.size()``)."""
    if not (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Tuple)):
        return None
    elts = node.targets[0].elts
    text = ast.unparse(node.value)
    if len(elts) == 3 and isinstance(elts[-1], ast.Name) and ("shape" in text or "size" in text):
        return elts[-1].id
    return None


def width_scalings(source: str) -> list[tuple[str, int]]:
    """(class, line) of each ``forward`` that unpacks ``B, T, C = x.shape`` and scales by
    ``C**-0.5``: the lecture's slip when C is the embedding width and the head is narrower."""
    found = []
    for cls in (n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef)):
        for fn in (n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "forward"):
            widths = {_unpacked_width(a) for a in ast.walk(fn)} - {None}
            for n in ast.walk(fn):
                if (isinstance(n, ast.BinOp) and isinstance(n.op, ast.Pow)
                        and isinstance(n.left, ast.Name) and n.left.id in widths
                        and _is_minus_half(n.right)):
                    found.append((cls.name, n.lineno))
    return found


def _run(ctx: _Ctx, report: Report, name: str, fn: Callable) -> bool:
    try:
        out = fn(ctx)
    except _Fail as e:
        report.checks.append(Check(name, FAIL, str(e)))
        return False
    except Exception as e:  # a bug in the learner's code that the check did not foresee
        report.checks.append(Check(name, FAIL, ctx.error(e)))
        return False
    status, message = out if isinstance(out, tuple) else (PASS, out)
    report.checks.append(Check(name, status, message))
    return True


def check_spec(spec: str) -> Report:
    """Every check of ``FILE.py[:NAME]``; raises ``LearnerFileError`` for a bad file or class.

    The model is tiny: one thread computes it fastest (and leaves the others' cores alone)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _check_spec(spec)
    finally:
        torch.set_num_threads(threads)


def require_checks(spec: str, log: Callable[[str], None]) -> None:
    """``tinygpt train --model FILE.py:NAME`` checks the class first; a failed check stops it."""
    report = check_spec(spec)
    log(format_report(report))
    if not report.ok:
        failed = ", ".join(TITLES[c.name] for c in report.checks if c.status == FAIL)
        raise TinyGPTError(f"{spec} failed tinygpt check ({failed}; see above): fix the model, "
                           f"or train it anyway with --no-check")


def run_check(spec: str, name: str) -> Check:
    """One check of ``FILE.py[:NAME]`` (by its name in ``CHECKS``, after "builds")."""
    path, cls_name = parse_spec(spec)
    loaded = load_file(path)
    ctx = _Ctx(loaded, find_class(loaded, cls_name))
    report = Report(file=str(path))
    fn = {"forward": check_forward, "init_loss": check_init_loss, "causal": check_causal,
          "learns": check_learns, "overfit": check_overfit, "generate": check_generate,
          "eval": check_eval, "scale": lambda c: check_scale(c, c.model())}[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run(ctx, report, name, fn)
    finally:
        torch.set_num_threads(threads)
    return report.checks[0]


def _check_spec(spec: str) -> Report:
    path, name = parse_spec(spec)
    loaded = load_file(path)
    report = Report(file=str(path), skipped=loaded.skipped)
    cls = find_class(loaded, name)
    report.cls = cls.__name__
    ctx = _Ctx(loaded, cls)
    try:
        model = ctx.model()
    except LearnerFileError as e:
        fail = str(e)
    except Exception as e:
        fail = f"{cls.__name__}() raised {ctx.error(e)}"
    else:
        fail = None
    if fail is not None:
        report.checks.append(Check("builds", FAIL, fail))
        report.checks += [Check(n, SKIP) for n in CHECKS[1:]]
        return report
    report.params = sum(p.numel() for p in model.parameters())
    report.checks.append(Check("builds", PASS, f"{cls.__name__}(), {report.params:,} parameters"))
    if _run(ctx, report, "forward", check_forward):
        for n, fn in (("init_loss", check_init_loss), ("causal", check_causal),
                      ("learns", check_learns), ("overfit", check_overfit)):
            _run(ctx, report, n, fn)
    else:
        report.checks += [Check(n, SKIP) for n in ("init_loss", "causal", "learns", "overfit")]
    _run(ctx, report, "generate", check_generate)
    if report.checks[1].status == PASS:
        _run(ctx, report, "eval", check_eval)
    else:
        report.checks.append(Check("eval", SKIP))
    _run(ctx, report, "scale", lambda c: check_scale(c, model))
    report.init_loss = ctx.init_loss
    return report


SYMBOL = {PASS: "ok  ", WARN: "warn", FAIL: "FAIL", SKIP: "skip"}


def format_report(report: Report) -> str:
    lines = [f"{report.file}: {report.cls}"]
    if report.skipped:
        shown = "; ".join(report.skipped[:6])
        more = f"; and {len(report.skipped) - 6} more" if len(report.skipped) > 6 else ""
        lines.append(f"  not run (the script part): {len(report.skipped)} top-level "
                     f"statement(s): {shown}{more}")
    for c in report.checks:
        text = f": {c.message}" if c.message else ""
        lines.append(f"  {SYMBOL[c.status]} {TITLES[c.name]}{text}")
    failed = sum(c.status == FAIL for c in report.checks)
    lines.append("  all checks pass" if not failed else f"  {failed} check(s) failed")
    return "\n".join(lines)
