"""The Chat Completions API on a base model: the chat template, the request, the chat shape.

A base model continues text; it has no notion of messages. The template turns a conversation into
the text such a model was trained on, a play script (Tiny Shakespeare's own format)::

    SYSTEM:
    You are a herald of Verona.

    ROMEO:
    What news, good herald?

    ASSISTANT:

Each message becomes its speaker (the message's ``name``, else its role, in capitals), a colon, a
newline, its content (trailing newlines dropped) and a blank line. The prompt ends with the
reply's speaker line (``ChatTemplate.assistant``, ``ASSISTANT`` unless ``tinygpt serve
--chat-assistant NAME`` says otherwise), and the reply is what the model writes next, up to the
point where it starts a new speaker: a blank line followed by a line holding only a capitalised
name and a colon (``SpeakerTurn``, a stop rule that the one generation loop applies like a stop
string). A request's own ``stop`` strings apply as well.

The request is checked like a completion (``tinygpt.serve.protocol``: the same limits, the same
errors); the choices are decoded by the same scheduler and go out through ``ChatDelivery``, the
completion's ``Delivery`` with the chat shape (``message`` / ``delta``, ``logprobs.content``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tinygpt.logprobs import TokenLogprob
from tinygpt.sampling import MAX_LOGPROBS
from tinygpt.serve.logprobs import entries_within
from tinygpt.serve.options import ServeLimits
from tinygpt.serve.protocol import (
    EXPECTED,
    ApiError,
    Completion,
    RequestFields,
    check_choices,
    check_model,
    encode,
    generation_config,
    int_range,
    invalid,
    quoted,
    refuse_penalties,
    type_error,
)
from tinygpt.serve.scheduler import Event, GenerationParams
from tinygpt.serve.stream import Delivery, sse
from tinygpt.tokenizer import Tokenizer

ROLES = ("system", "developer", "user", "assistant")
NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_' .-]{0,63}$"  # a speaker: it must fit on its own line
_SPEAKER = r"[A-Z][A-Za-z0-9_' .-]{0,63}"  # a capitalised name, as the model writes one
TURN = re.compile(rf"\n\n{_SPEAKER}:\n")  # a new speaker begins
_TURN_START = re.compile(rf"\n(?:\n(?:{_SPEAKER}:?)?)?")  # the start of one, cut short
_LONGEST_START = len("\n\n") + 64 + len(":")


@dataclass(frozen=True)
class SpeakerTurn:
    """Stop where the model starts a new speaker (a ``tinygpt.sampling.StopRule``): a blank line,
    then a line of a capitalised name and a colon. The reply ends before the blank line."""

    def find(self, text: str) -> tuple[int, int] | None:
        m = TURN.search(text)
        return None if m is None else m.span()

    def held(self, text: str) -> int:
        for i in range(max(0, len(text) - _LONGEST_START), len(text)):
            if text[i] == "\n" and _TURN_START.fullmatch(text, i):
                return len(text) - i
        return 0


@dataclass(frozen=True)
class ChatTemplate:
    """How messages become a prompt: a play script; ``assistant`` is the reply's speaker."""

    assistant: str = "assistant"

    def __post_init__(self) -> None:
        if not isinstance(self.assistant, str) or not re.fullmatch(NAME_PATTERN, self.assistant):
            raise ValueError(f"--chat-assistant must be a name on one line (a letter, then up to "
                             f"63 letters, digits, spaces or _ ' . -), got {self.assistant!r}")

    @staticmethod
    def speaker(role: str, name: str | None) -> str:
        return (name or role).upper()

    def render(self, messages: list[tuple[str, str | None, str]]) -> str:
        """The prompt of ``(role, name, content)`` messages: the script, then the reply's
        speaker line."""
        lines = [f"{self.speaker(role, name)}:\n{content.rstrip(chr(10))}\n\n"
                 for role, name, content in messages]
        return "".join(lines) + f"{self.assistant.upper()}:\n"

    @property
    def stop(self) -> SpeakerTurn:
        return SpeakerTurn()


# --------------------------------------------------------------------------- the request


class TextPart(BaseModel):
    """A part of a message's content: only text."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of the conversation."""

    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None  # the speaker's name

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(
            p.text for p in self.content)


class ChatRequest(RequestFields):
    """The fields of ``POST /v1/chat/completions``; anything else is refused."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None  # the newer name of max_tokens
    logprobs: bool | None = None  # report each token's log-probability
    top_logprobs: int | None = None  # ... and this many most likely alternatives


CHAT_EXPECTED = {**EXPECTED, "messages": "an array of messages", "logprobs": "a boolean",
                 "top_logprobs": "an integer", "max_completion_tokens": "an integer"}
MESSAGE_EXPECTED = {
    "role": f"one of {', '.join(repr(r) for r in ROLES)}",
    "content": "a string or an array of text parts ({\"type\": \"text\", \"text\": \"...\"})",
    "name": "a speaker name on one line (a letter, then up to 63 letters, digits, spaces or "
            "_ ' . -)",
}


def _message_error(err: dict) -> ApiError:
    """The 400 for a pydantic error inside ``messages``, naming the field (``messages[0].role``)."""
    loc = err["loc"]
    if len(loc) == 1:
        return invalid("'messages' must hold at least one message", "messages")
    where = f"messages[{loc[1]}]"
    if len(loc) == 2:
        return invalid(f"invalid '{where}': expected a message object", "messages",
                       "invalid_type")
    field = str(loc[2])
    if err["type"] == "extra_forbidden":
        name = ".".join(str(x) for x in (where, *loc[2:]))
        return invalid(f"unknown parameter {quoted(name)}", "messages", "unknown_parameter")
    if err["type"] == "missing":
        return invalid(f"missing required parameter '{where}.{field}'", "messages",
                       "missing_required_parameter")
    expected = MESSAGE_EXPECTED.get(field, "another type")
    return invalid(f"invalid '{where}.{field}': expected {expected}", "messages", "invalid_type")


def _chat_types(obj: dict) -> ChatRequest:
    try:
        return ChatRequest.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        if err["loc"][:1] == ("messages",) and (len(err["loc"]) > 1 or err["type"] == "too_short"):
            raise _message_error(err) from None
        raise type_error(err, obj, CHAT_EXPECTED) from None


def _max_tokens(req: ChatRequest, limits: ServeLimits) -> int:
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    given = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if req.max_tokens is not None and given != req.max_tokens:
        raise invalid("give 'max_tokens' or 'max_completion_tokens', not two different values",
                      "max_tokens")
    if given is None:
        return limits.default_max_tokens
    return int_range(given, name, 1, limits.max_tokens)


def _top_logprobs(req: ChatRequest) -> int | None:
    """The alternatives per token to report (None: no logprobs)."""
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if not req.logprobs:
        return None
    return 0 if req.top_logprobs is None else int_range(req.top_logprobs, "top_logprobs", 0,
                                                         MAX_LOGPROBS)


def check_chat(obj: dict, model_id: str, tokenizer: Tokenizer, limits: ServeLimits,
               template: ChatTemplate) -> Completion:
    """Validate a parsed chat request body: a ``Completion`` of the rendered conversation, ready
    for the scheduler; raises ``ApiError``."""
    req = _chat_types(obj)
    check_model(req.model, model_id)
    prompt = template.render([(m.role, m.name, m.text()) for m in req.messages])
    if len(prompt) > limits.max_prompt_chars:
        raise invalid(f"the conversation, written as a play script, has {len(prompt)} "
                      f"characters; this server accepts at most {limits.max_prompt_chars}",
                      "messages", "prompt_too_long")
    max_tokens = _max_tokens(req, limits)
    n = check_choices(req, limits, 1)
    top = _top_logprobs(req)
    config = generation_config(req, max_tokens, tokenizer, limits, top, (template.stop,))
    if req.stream_options is not None and not req.stream:
        raise invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")
    refuse_penalties(req)
    ids = encode(prompt, tokenizer, "messages", "conversation (written as a play script)")
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Completion([prompt], [ids], n, GenerationParams(config), bool(req.stream),
                      include_usage, False, top)


# --------------------------------------------------------------------------- the answer


def _token_bytes(token: str) -> list[int]:
    """The UTF-8 bytes of a token's text; a token shown as ``\\xNN`` escapes (bytes of a
    character that later tokens complete) is those bytes."""
    if token and re.fullmatch(r"(?:\\x[0-9a-f]{2})+", token):
        return list(bytes.fromhex(token.replace("\\x", "")))
    return list(token.encode("utf-8"))


def chat_logprobs(entries: list[TokenLogprob], k: int) -> dict:
    """The ``logprobs`` of a chat choice (or chunk): one item per token, with its ``k`` most
    likely alternatives."""
    content = []
    for e in entries:
        top = sorted((e.top or {}).items(), key=lambda kv: -kv[1])[:k]
        content.append({
            "token": e.token, "logprob": e.logprob, "bytes": _token_bytes(e.token),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": _token_bytes(t)}
                             for t, lp in top],
        })
    return {"content": content, "refusal": None}


class ChatDelivery(Delivery):
    """A submitted chat completion: the choices of ``Delivery`` in the chat shape."""

    def choice_body(self, choice) -> dict:
        logprobs = None
        if self.spec.logprobs is not None:
            logprobs = chat_logprobs(entries_within(choice.entries, len(choice.text)),
                                     self.spec.logprobs)
        return {"index": choice.index,
                "message": {"role": "assistant", "content": choice.text, "refusal": None},
                "logprobs": logprobs, "finish_reason": choice.finish_reason}

    def opening(self) -> list[str]:
        """Each choice's first chunk names its role (the text follows)."""
        return [sse({**self.meta, "choices": [{
            "index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
            "finish_reason": None}]}) for c in self.job.choices]

    def chunk(self, event: Event) -> str:
        logprobs = None
        if event.logprobs is not None:
            logprobs = chat_logprobs(event.logprobs, self.spec.logprobs)
        delta = {"content": event.text} if event.text else {}
        return sse({**self.meta, "choices": [{"index": event.index, "delta": delta,
                                              "logprobs": logprobs,
                                              "finish_reason": event.finish}]})
