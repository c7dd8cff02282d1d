"""Loading a learner's file the way the lecture writes it, without running its script part.

A lecture-style ``gpt.py`` downloads the text, builds the vocabulary, trains for thousands of
steps and prints a sample at import, with the model classes in between. ``load_file`` reads the
syntax tree and executes only the top-level statements that *define* things: imports, classes,
functions (and lambdas) and assignments of constants (literals and arithmetic on them, no calls).
Every other top-level statement is skipped and listed. What is executed runs as Python runs it:
this is no sandbox.

``build_model`` then sets the lecture's hyperparameters (``vocab_size``, ``block_size``,
``n_embd``, ``n_head``, ``n_layer``, ``dropout``, ``device``) as module globals, and calls the
constructor with those of them it takes by name (or with none).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from tinygpt.errors import TinyGPTError
from tinygpt.learner.spec import SIZE_NAMES, LearnerConfig, file_sha256

_CONSTANT_NODES = (ast.Constant, ast.Name, ast.Load, ast.BinOp, ast.UnaryOp, ast.BoolOp,
                   ast.Compare, ast.IfExp, ast.Tuple, ast.List, ast.Set, ast.Dict,
                   ast.operator, ast.unaryop, ast.boolop, ast.cmpop, ast.Attribute)


class LearnerFileError(TinyGPTError):
    """The file or class cannot be used at all (bad input: exit status 2)."""


@dataclass
class LoadedFile:
    path: Path
    module: types.ModuleType
    sha256: str
    skipped: list[str] = field(default_factory=list)  # "line N: first line of the statement"


def _kept(node: ast.stmt) -> bool:
    if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef,
                         ast.ClassDef)):
        return True
    if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if not all(isinstance(t, (ast.Name, ast.Tuple)) for t in targets):
            return False
        if isinstance(node.value, ast.Lambda):
            return True
        return all(isinstance(n, _CONSTANT_NODES) for n in ast.walk(node.value))
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)  # a docstring


def _describe(node: ast.stmt, lines: list[str]) -> str:
    text = lines[node.lineno - 1].strip() if node.lineno <= len(lines) else ""
    if len(text) > 60:
        text = text[:57] + "..."
    return f"line {node.lineno}: {text}"


def load_file(path: str | Path) -> LoadedFile:
    """Execute the definitions of ``path`` in a fresh module (see the module's docstring)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LearnerFileError(f"no such file: {path}")
    source = path.read_text(encoding="utf-8", errors="replace")
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as e:
        raise LearnerFileError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    lines = source.splitlines()
    kept = [n for n in tree.body if _kept(n)]
    skipped = [_describe(n, lines) for n in tree.body if not _kept(n)]
    name = f"tinygpt_learner_{abs(hash(str(path.resolve())))}"
    module = types.ModuleType(name)
    module.__file__ = str(path.resolve())
    sys.modules[name] = module  # classes defined in it find their module (dataclasses, pickle)
    code = compile(ast.Module(body=kept, type_ignores=[]), str(path.resolve()), "exec")
    try:
        exec(code, module.__dict__)
    except (Exception, SystemExit) as e:  # os._exit cannot be caught: many files run apart
        raise LearnerFileError(f"{path}: its definitions fail to run: {type(e).__name__}: "
                               f"{_first_line(e)}") from None
    return LoadedFile(path.resolve(), module, file_sha256(path), skipped)


def _first_line(e: BaseException) -> str:
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    return lines[0] if lines else ""


def _is_model_class(obj, module: types.ModuleType) -> bool:
    return (inspect.isclass(obj) and issubclass(obj, nn.Module) and obj.__module__ ==
            module.__name__ and obj.forward is not nn.Module.forward and hasattr(obj, "generate"))


def find_class(loaded: LoadedFile, name: str | None) -> type:
    """The class ``name``, or the one ``nn.Module`` subclass with ``forward`` and ``generate``."""
    module = loaded.module
    if name is not None:
        cls = getattr(module, name, None)
        if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
            found = ", ".join(sorted(n for n, c in vars(module).items()
                                     if _is_model_class(c, module))) or "none"
            raise LearnerFileError(f"{loaded.path} has no nn.Module class {name} (model classes "
                                   f"with forward and generate: {found})")
        return cls
    found = sorted(n for n, c in vars(module).items() if _is_model_class(c, module))
    if len(found) == 1:
        return getattr(module, found[0])
    if not found:
        raise LearnerFileError(f"{loaded.path} defines no nn.Module class with forward and "
                               f"generate; name one: {loaded.path.name}:NAME")
    raise LearnerFileError(f"{loaded.path} defines several model classes ({', '.join(found)}); "
                           f"name one: {loaded.path.name}:{found[-1]}")


def build_model(cls: type, loaded: LoadedFile, sizes: dict) -> nn.Module:
    """``cls`` built the lecture's way: ``sizes`` as module globals, and by name to the
    constructor for the parameters it declares. Raises ``LearnerFileError`` if it takes others."""
    loaded.module.__dict__.update(sizes)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    kwargs, missing = {}, []
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in sizes:
            kwargs[p.name] = sizes[p.name]
        elif p.default is p.empty:
            missing.append(p.name)
    if missing:
        raise LearnerFileError(
            f"{cls.__name__}() needs {', '.join(missing)}; tinygpt builds it with none or any of "
            f"{', '.join(SIZE_NAMES)} (by name)"
        )
    return cls(**kwargs)


def learner_model(config: LearnerConfig, device: str = "cpu") -> tuple[nn.Module, LearnerConfig]:
    """A new model of the learner's class for a run, and its record (the class name filled in).

    Built with the global random state as it is (the run seeds it first)."""
    loaded = load_file(config.path)
    cls = find_class(loaded, config.name or None)
    config = dataclasses.replace(config, name=cls.__name__, sha256=loaded.sha256)
    model = build_model(cls, loaded, config.sizes(str(device)))
    mark(model, config, loaded.module)
    return model, config


def build_recorded(config: LearnerConfig, device: str = "cpu") -> nn.Module:
    """The model a run recorded, from its file again; one line if the file is gone or changed."""
    path = Path(config.path)
    if not path.is_file():
        raise TinyGPTError(f"the model's code file {path} is missing; the run was trained with "
                           f"{config.name} from it (sha256 {config.sha256[:12]})")
    now = file_sha256(path)
    if now != config.sha256:
        raise TinyGPTError(f"the model's code file {path} has changed since the run was trained "
                           f"(sha256 {config.sha256[:12]}, now {now[:12]}); put back the version "
                           f"it was trained with, or train again")
    return learner_model(config, device)[0]


LEARNER_ATTR = "_tinygpt_learner"
MODULE_ATTR = "_tinygpt_learner_module"


def mark(model: nn.Module, config: LearnerConfig, module: types.ModuleType) -> None:
    """Tag a learner's model with its record and module; ``model.config`` gives tinygpt's sampler
    the context length and vocabulary when the class has no ``config`` of its own."""
    object.__setattr__(model, LEARNER_ATTR, config)
    object.__setattr__(model, MODULE_ATTR, module)
    if not hasattr(model, "config"):
        object.__setattr__(model, "config", config)


def follow_device(model: nn.Module, device) -> None:
    """After ``model.to(device)``: the lecture's forward reads the module global ``device``
    (``torch.arange(T, device=device)``), which must name the device the weights are on."""
    module = getattr(model, MODULE_ATTR, None)
    if module is not None:
        module.device = str(device)


def learner_config(model: nn.Module) -> LearnerConfig | None:
    return getattr(model, LEARNER_ATTR, None)


@torch.no_grad()
def own_generate(model: nn.Module, ids: list[int], max_new_tokens: int, seed: int,
                 device) -> list[int]:
    """New tokens from the model's own ``generate(idx, max_new_tokens)`` (the lecture's
    sampler: it draws from torch's global generator, seeded here)."""
    torch.manual_seed(seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(idx, max_new_tokens)
    finally:
        model.train(was_training)
    return [int(t) for t in out[0, len(ids):].tolist()]
