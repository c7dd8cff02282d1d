"""The OpenAI Completions request: parsing, type checks (pydantic) and range checks.

The sampling settings are checked by their one definition (``tinygpt.sampling``), so a request
means what the same settings mean to the library and ``tinygpt sample``; this module adds the
server's own limits (``ServeLimits``) and the OpenAI error shape.

Every problem becomes an ``ApiError`` carrying an HTTP status and the OpenAI error shape
``{"error": {"message", "type", "param", "code"}}``. Types are strict: ``"5"`` is not an integer
and ``true`` is not a number. JSON's non-standard ``NaN`` and ``Infinity`` are refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, ValidationError

from tinygpt.sampling import GenerationConfig, Rule, SamplingConfig, SettingError, StopRule
from tinygpt.serve.options import ServeLimits
from tinygpt.serve.scheduler import GenerationParams
from tinygpt.tokenizer import Tokenizer


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool | None = None


class RequestFields(BaseModel):
    """The fields that ``POST /v1/completions`` and ``POST /v1/chat/completions`` share."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension: keep the k most likely characters
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Part of the OpenAI API but not implemented: accepted only at values that change nothing.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(RequestFields):
    """The fields of ``POST /v1/completions``; anything else is refused."""

    prompt: str | list[str]
    echo: bool | None = None
    logprobs: int | None = None  # report log-probabilities with this many alternatives
    # Not implemented either: accepted only at values that change nothing.
    best_of: int | None = None
    suffix: str | None = None


EXPECTED = {
    "model": "a string",
    "prompt": "a string or an array of strings",
    "max_tokens": "an integer",
    "temperature": "a number",
    "top_p": "a number",
    "top_k": "an integer",
    "n": "an integer",
    "stop": "a string or an array of strings",
    "seed": "an integer",
    "stream": "a boolean",
    "stream_options": "an object like {\"include_usage\": true}",
    "echo": "a boolean",
    "user": "a string",
    "logprobs": "an integer",
    "best_of": "an integer",
    "presence_penalty": "a number",
    "frequency_penalty": "a number",
    "logit_bias": "an object of numbers",
    "suffix": "null",
}


def json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def quoted(text: str, limit: int = 100) -> str:
    """``text`` from a request, shown in a one-line message: quoted, at most ``limit`` characters,
    control characters escaped."""
    return repr(text[:limit] + ("…" if len(text) > limit else ""))


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes) -> dict:
    if not body.strip():
        raise invalid("the request body is empty; send a JSON object", code="invalid_json")
    try:
        text = body.decode("utf-8")
        obj = json.loads(text, parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise invalid("the request body is not UTF-8", code="invalid_json") from None
    except json.JSONDecodeError as e:
        raise invalid(f"the request body is not valid JSON: {e.msg} at line {e.lineno} column "
                      f"{e.colno}", code="invalid_json") from None
    except (ValueError, RecursionError) as e:
        raise invalid(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise invalid(f"the request body must be a JSON object, got {json_type(obj)}",
                      code="invalid_json")
    return obj


def check_types(obj: dict, schema: type[BaseModel] = CompletionRequest,
                expected_types: dict[str, str] = EXPECTED) -> BaseModel:
    """``obj`` as a ``schema`` instance; a wrong, missing or unknown field is a 400."""
    try:
        return schema.model_validate(obj)
    except ValidationError as e:
        raise type_error(e.errors()[0], obj, expected_types) from None


def type_error(err: dict, obj: dict, expected_types: dict[str, str]) -> ApiError:
    """The 400 for one pydantic error ``err`` of the request body ``obj``."""
    loc = [str(x) for x in err["loc"]]
    param = loc[0] if loc else None
    if err["type"] == "extra_forbidden":
        name = ".".join(loc)
        return invalid(f"unknown parameter {quoted(name)}", param, "unknown_parameter")
    if err["type"] == "missing":
        return invalid(f"missing required parameter '{param}'", param,
                       "missing_required_parameter")
    value = obj.get(param) if param else None
    what = json_type(value)
    if isinstance(value, list):  # say what is wrong inside the array
        bad = [x for x in value if not isinstance(x, str)]
        if bad:
            what = f"an array holding {json_type(bad[0])}"
    elif isinstance(value, dict) and param == "stream_options":
        what = f"{'.'.join(loc)} = {json_type(value.get(loc[1]) if len(loc) > 1 else None)}"
    expected = expected_types.get(param, "another type")
    return invalid(f"invalid type for '{param}': expected {expected}, got {what}", param,
                   "invalid_type")


@dataclass
class Completion:
    """A checked request, ready for the scheduler."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    n: int
    params: GenerationParams
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: int | None


def _setting_error(e: SettingError) -> ApiError:
    """A setting outside its rule (``tinygpt.sampling``), as a 400 naming the parameter."""
    return invalid(str(e.named(f"'{e.name}'")), e.name)


def int_range(value: int, name: str, low: int, high: int) -> int:
    """``value`` if it lies in [low, high] (a limit of this server), else a 400."""
    try:
        Rule(int, low, high).check(name, value)
    except SettingError as e:
        raise _setting_error(e) from None
    return value


def encode(text: str, tokenizer: Tokenizer, param: str, what: str | None = None) -> list[int]:
    """Token ids of ``text`` (the ``param`` of the request, called ``what`` in a message);
    characters the model does not know are a 400 naming them."""
    unknown = tokenizer.unknown_chars(text)
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:20])
        more = f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
        raise invalid(f"the {what or param} has {len(unknown)} character(s) the model does not know: "
                      f"{shown}{more}", param, "unknown_characters")
    return tokenizer.encode(text)


def check_completion(
    obj: dict, model_id: str, tokenizer: Tokenizer, limits: ServeLimits
) -> Completion:
    """Validate a parsed request body; raises ``ApiError``."""
    req = check_types(obj)
    check_model(req.model, model_id)
    prompts = _prompts(req, limits)
    max_tokens = limits.default_max_tokens if req.max_tokens is None else req.max_tokens
    int_range(max_tokens, "max_tokens", 1, limits.max_tokens)
    n = check_choices(req, limits, len(prompts))
    config = generation_config(req, max_tokens, tokenizer, limits, req.logprobs)
    if req.stream_options is not None and not req.stream:
        raise invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")
    _unsupported(req, n)
    prompt_ids = [encode(p, tokenizer, "prompt") for p in prompts]
    params = GenerationParams(config, bool(req.echo) and req.logprobs is not None)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Completion(prompts, prompt_ids, n, params, bool(req.stream), include_usage,
                      bool(req.echo), req.logprobs)


def check_model(name: str, model_id: str) -> None:
    if name != model_id:
        raise ApiError(404, f"the model {quoted(name)} does not exist; this server has "
                       f"'{model_id}'", "model", "model_not_found")


def _prompts(req: CompletionRequest, limits: ServeLimits) -> list[str]:
    """The request's prompts: at least one, none empty or longer than the server allows."""
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not prompts:
        raise invalid("'prompt' must not be an empty array", "prompt")
    for p in prompts:
        if not p:
            raise invalid("'prompt' must not be empty (this model has no start-of-text token)",
                          "prompt")
        if len(p) > limits.max_prompt_chars:
            raise invalid(f"the prompt has {len(p)} characters; this server accepts at most "
                          f"{limits.max_prompt_chars}", "prompt", "prompt_too_long")
    return prompts


def check_choices(req: BaseModel, limits: ServeLimits, n_prompts: int) -> int:
    """``n``, the choices per prompt; all of them together within the server's ``max_n``."""
    n = 1 if req.n is None else int_range(req.n, "n", 1, limits.max_n)
    if n * n_prompts > limits.max_n:
        raise invalid(f"n ({n}) times the number of prompts ({n_prompts}) is "
                      f"{n * n_prompts}; this server allows at most {limits.max_n}", "n")
    return n


def _stops(req: BaseModel, limits: ServeLimits) -> list[str]:
    """The stop strings, within the server's limits on their number and length."""
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > limits.max_stop:
        raise invalid(f"'stop' has {len(stops)} strings; this server allows at most "
                      f"{limits.max_stop}", "stop")
    for s in stops:
        if len(s) > limits.max_stop_chars:
            raise invalid(f"a stop string has {len(s)} characters; this server allows at most "
                          f"{limits.max_stop_chars}", "stop")
    return stops


def generation_config(req: BaseModel, max_tokens: int, tokenizer: Tokenizer,
                      limits: ServeLimits, logprobs: int | None,
                      rules: tuple[StopRule, ...] = ()) -> GenerationConfig:
    """The sampling settings of a request (its ``temperature``, ``top_k``, ``top_p``, ``seed``
    and ``stop``), checked by their one definition (``tinygpt.sampling``); ``rules`` are stops
    of the server's own (the chat template's change of speaker)."""
    try:
        temperature = 1.0 if req.temperature is None else req.temperature
        sampling = SamplingConfig(temperature, req.top_k, req.top_p)
        sampling.check_vocab(tokenizer.vocab_size)
        return GenerationConfig(max_tokens, sampling, req.seed, (*_stops(req, limits), *rules),
                                logprobs)
    except SettingError as e:
        raise _setting_error(e) from None


def unsupported(name: str, what: str) -> ApiError:
    return invalid(f"'{name}' is not supported by this server ({what})", name,
                   "unsupported_parameter")


def refuse_penalties(req: BaseModel) -> None:
    """The penalties and logit bias of the OpenAI API, accepted only at values that change
    nothing."""
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value is not None and value != 0:
            raise unsupported(name, "leave it out or send 0")
    if req.logit_bias:
        raise unsupported("logit_bias", "leave it out or send {}")


def _unsupported(req: CompletionRequest, n: int) -> None:
    if req.best_of is not None and req.best_of != n:
        raise unsupported("best_of", "leave it out or set it equal to n")
    refuse_penalties(req)
    if req.suffix is not None:
        raise unsupported("suffix", "leave it out or send null")


class AttentionRequest(BaseModel):
    """The fields of ``POST /v1/tinygpt/attention``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    text: str
    layer: int | None = None  # only this layer (default: all)
    head: int | None = None  # only this head of each layer (default: all)


ATTENTION_EXPECTED = {"model": "a string", "text": "a string", "layer": "an integer",
                      "head": "an integer"}


@dataclass
class AttentionQuery:
    """A checked attention request."""

    text: str
    ids: list[int]
    tokens: list[str]  # each token's text (a character, or a BPE token's characters / bytes)
    layers: list[int]
    heads: list[int]


def check_attention(obj: dict, model_id: str, tokenizer: Tokenizer, n_layer: int,
                    n_head: int, block_size: int) -> AttentionQuery:
    """Validate a parsed attention request body; raises ``ApiError``."""
    req = check_types(obj, AttentionRequest, ATTENTION_EXPECTED)
    if req.model != model_id:
        raise ApiError(404, f"the model {quoted(req.model)} does not exist; this server has "
                       f"'{model_id}'", "model", "model_not_found")
    if n_layer == 0:
        raise invalid("this model has no attention layers (a bigram model looks at one "
                      "character only)", "model", "no_attention")
    if not req.text:
        raise invalid("'text' must not be empty", "text")
    ids = encode(req.text, tokenizer, "text")
    if len(ids) > block_size:
        raise invalid(f"the text is {len(ids)} tokens long; the model's context holds "
                      f"{block_size}", "text", "context_length_exceeded")
    layers = list(range(n_layer))
    if req.layer is not None:
        layers = [int_range(req.layer, "layer", 0, n_layer - 1)]
    heads = list(range(n_head))
    if req.head is not None:
        heads = [int_range(req.head, "head", 0, n_head - 1)]
    return AttentionQuery(req.text, ids, [tokenizer.token_text(i) for i in ids], layers, heads)
