"""The published schema (GET /openapi.json), checked against a live server.

A property-based API tester (schemathesis) reads the document from a real server on an ephemeral
loopback port and sends it bodies the schema allows and bodies it forbids, a few dozen per
operation, derandomized (the same examples every run): no answer may be a 5xx, every answer must
match the document (status, content type, body), a body the schema allows is never refused for
its types, one it forbids is refused with a 4xx. Every successful answer is also parsed strictly
with the ``openai`` package's own response types. ``-m slow`` runs ten times the examples.
"""

from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
openai = pytest.importorskip("openai")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from openai.types import Completion, Model  # noqa: E402
from openai.types.chat import ChatCompletion, ChatCompletionChunk  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from tests.serve.test_chat import MODEL, serve_play, strictly  # noqa: E402
from tests.serve.test_chat import play_run as play_run  # noqa: E402 - a fixture used below

from tinygpt.serve.chat import ChatRequest  # noqa: E402
from tinygpt.serve.options import ServeLimits  # noqa: E402
from tinygpt.serve.protocol import AttentionRequest, CompletionRequest  # noqa: E402
from tinygpt.serve.schema import request_schema  # noqa: E402

# Small limits keep every allowed request quick; the schema does not know them (a 400 then).
LIMITS = ServeLimits(max_tokens=24, default_max_tokens=8, max_prompt_chars=256)
TYPE_ERRORS = {"invalid_type", "unknown_parameter", "missing_required_parameter", "invalid_json"}
OPENAI_TYPES = {("POST", "/v1/completions"): (Completion, Completion),
                ("POST", "/v1/chat/completions"): (ChatCompletion, ChatCompletionChunk),
                ("GET", "/v1/models/{model_id}"): (Model, None)}


@pytest.fixture(scope="module")
def api(play_run):
    """A server of the play-script model (it knows the capitals of the chat template)."""
    with serve_play(play_run, LIMITS) as s:
        yield s


def test_the_document_is_served_and_describes_every_api_route(api):
    r = httpx.get(api.url + "/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc["openapi"].startswith("3.") and doc["info"]["title"] == "tinygpt"
    routes = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert routes == {("GET", "/health"), ("GET", "/v1/models"), ("GET", "/v1/models/{model_id}"),
                      ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                      ("POST", "/v1/tinygpt/attention")}
    schemas = doc["components"]["schemas"]
    for model in (CompletionRequest, ChatRequest, AttentionRequest):  # what the routes check with
        spec = request_schema(model, LIMITS)  # the model's schema, with this server's ranges
        for name, part in spec.pop("$defs", {}).items():
            assert schemas[name] == part, name
        assert schemas[model.__name__] == spec, model.__name__
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatRequest"}
    assert set(chat["responses"]) == {"200", "400", "401", "404", "413", "415", "429", "500", "503"}
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}


def test_the_document_needs_the_key_like_every_route(make_server):
    s = make_server(api_key="sesame")
    assert httpx.get(s.url + "/openapi.json").status_code == 401
    ok = httpx.get(s.url + "/openapi.json", headers={"Authorization": "Bearer sesame"})
    assert ok.status_code == 200 and "/v1/chat/completions" in ok.json()["paths"]


def events(text: str) -> list[dict]:
    lines = [x[len("data: "):] for x in text.split("\n\n") if x.startswith("data: ")]
    assert lines and lines[-1] == "[DONE]", text[-200:]
    return [json.loads(x) for x in lines[:-1]]


def openai_parse(method: str, path: str, response) -> None:
    """A successful answer, parsed strictly by the openai package's type for it."""
    whole, chunk = OPENAI_TYPES.get((method, path), (None, None))
    ctype = response.headers.get("content-type", [""])
    ctype = ctype[0] if isinstance(ctype, list) else ctype
    if ctype.startswith("text/event-stream"):
        for event in events(response.text):
            strictly(chunk, event)
    elif whole is Model:
        strictly(Model, response.json(), frozenset({"tinygpt"}))  # tinygpt's details
    elif whole is not None:
        strictly(whole, response.json())
    elif path == "/v1/models":
        for card in response.json()["data"]:
            strictly(Model, card, frozenset({"tinygpt"}))


def no_type_error_for_allowed_bodies(response) -> None:
    """The schema and the checks agree: a body the schema allows is not refused for its types.

    One gap JSON Schema cannot close: to it ``20.0`` is an integer; this server wants integers
    written as integers (``20``), as its strict types have always done.
    """
    if response.status_code != 400:
        return
    error = response.json()["error"]
    if error["code"] == "invalid_type" and error["param"]:
        value = json.loads(response.request.body).get(error["param"])
        if isinstance(value, float) and value.is_integer():
            return
    assert error["code"] not in TYPE_ERRORS, (response.request.body, response.text)


def run(operation, mode, examples: int, tally: Counter) -> None:
    positive = mode == schemathesis.GenerationMode.POSITIVE
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance] + ([] if positive else [negative_data_rejection])

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case):
        if positive:  # ask for the model served (any other name is a 404, the negative runs')
            if isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = MODEL
            if case.path_parameters and "model_id" in case.path_parameters:
                case.path_parameters["model_id"] = MODEL
        response = case.call(timeout=30)
        case.validate_response(response, checks=checks)
        if positive:
            no_type_error_for_allowed_bodies(response)
        if response.status_code == 200:
            openai_parse(operation.method.upper(), operation.path, response)
        status = response.status_code
        code = response.json()["error"]["code"] if status >= 400 else None
        tally[(operation.method.upper(), operation.path, mode.value, status, code)] += 1

    check()


def schema_run(api, examples: int) -> Counter:
    schema = schemathesis.openapi.from_url(api.url + "/openapi.json")
    tally: Counter = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        run(operation, schemathesis.GenerationMode.POSITIVE, examples, tally)
        if operation.body:  # only a body can break the schema here
            run(operation, schemathesis.GenerationMode.NEGATIVE, examples // 2, tally)
    return tally


def summary(tally: Counter) -> str:
    per_op: dict = {}
    for (method, path, mode, status, code), count in sorted(tally.items(), key=str):
        per_op.setdefault(f"{method} {path} {mode}", Counter())[f"{status} {code or ''}"] += count
    return "\n".join(f"{op}: {dict(c)}" for op, c in per_op.items())


def test_the_live_server_follows_its_schema(api):
    tally = schema_run(api, examples=30)
    print(f"\n{sum(tally.values())} requests\n{summary(tally)}")
    assert sum(tally.values()) >= 150
    ok = {(m, p) for (m, p, mode, status, _) in tally if status == 200 and mode == "positive"}
    assert {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
            ("GET", "/v1/models")} <= ok  # successes were checked, not only refusals


@pytest.mark.slow
def test_the_live_server_follows_its_schema_at_length(api):
    tally = schema_run(api, examples=300)
    print(f"\n{sum(tally.values())} requests\n{summary(tally)}")
    assert sum(tally.values()) >= 1500
