"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis over hypothesis).

Requests that fit the schema and requests that break it (negative mode: wrong types, missing
fields, out-of-range values) go to the real app in this process, with a valid key so they get past
authentication to tokenizing, admission and the (scripted, instant) pool. The property: no answer
is a 5xx, every error is in OpenAI's shape, every answer is JSON a browser can parse, and the app
still serves afterwards. Fixed seed and a few hundred cases: reproducible and quick.

The schema-driven generator rarely makes the values attackers send first (integers past 64 bits,
lone surrogates, NaN), so a second property puts those into every field of the two generation
routes and every integer of the ledger's queries; on the code before the edge limits it finds the
ledger's 64-bit overflow at once.
"""

from __future__ import annotations

import json
import os

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

from coordinator.accounts import Accounts  # noqa: E402
from coordinator.api import create_app  # noqa: E402
from tests.coordinator.test_api_inprocess import MODEL, N_LAYERS, ScriptedPool, tokenizer  # noqa: E402,F401

FUZZ_SEED = 20261130
FUZZ_CASES = 300
# The live feed never ends (it is a stream by design); it is the same document as /dashboard/state.
UNFUZZED_PATHS = ("/dashboard/events",)


def _refuse_constant(constant):
    raise ValueError(f"not JSON: {constant}")


def _served_model_sometimes(case_and_flip):
    """Half the bodies name the served model, so they get past the 404 to tokenizing and the pool."""
    case, flip = case_and_flip
    if flip and isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = MODEL
    return case


def test_the_api_answers_any_request_its_schema_allows_or_forbids_without_a_5xx(tmp_path, tokenizer):  # noqa: F811
    accounts = Accounts(tmp_path, N_LAYERS)
    pool = ScriptedPool(tokenizer, accounts, delay_s=0.0)
    app = create_app(pool, tokenizer, MODEL, 512, (2,), accounts, rate_limit_rps=0)  # 0: no per-key rate limit
    key = accounts.add_consumer("fuzz", 10**15)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()
                  if result.ok().path not in UNFUZZED_PATHS]
    assert {"/v1/completions", "/v1/chat/completions", "/ledger/entries"} <= {op.path for op in operations}
    cases = st.tuples(st.one_of([op.as_strategy(generation_mode=mode) for op in operations
                                 for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]),
                      st.booleans()).map(_served_model_sometimes)
    seen: dict[tuple[str, int], int] = {}

    @seed(FUZZ_SEED)
    @settings(max_examples=FUZZ_CASES, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def one(case):
        response = case.call(headers={"Authorization": f"Bearer {key}"}, timeout=30)
        where = f"{case.method} {case.formatted_path}"
        seen[(case.operation.path, response.status_code)] = seen.get((case.operation.path, response.status_code), 0) + 1
        assert response.status_code < 500, (where, response.status_code, response.text[:500])
        if os.environ.get("FUZZ_DEBUG") and response.status_code >= 400:
            print(where, response.status_code, response.text[:160])
        content_type = response.headers.get("content-type") or [""]  # schemathesis: header -> list of values
        if content_type[0].startswith("application/json"):
            body = json.loads(response.text, parse_constant=_refuse_constant)
            if response.status_code >= 400:
                assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, \
                    (where, response.text[:500])

    try:
        one()
        print("fuzzed (path, status): cases", dict(sorted(seen.items())))
        # still serving: a plain request after all of it
        from starlette.testclient import TestClient

        with TestClient(app) as c:
            r = c.post("/v1/completions", json={"model": MODEL, "prompt": "Paris", "max_tokens": 2},
                       headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        assert any(path.endswith("completions") and status == 200 for path, status in seen)  # got to the pool
    finally:
        accounts.close()


# Values the schema-driven generator rarely or never makes: integers past 64 bits, lone
# surrogates, NaN and infinities (Python's JSON parser reads them), JSON of the wrong kind.
HOSTILE = st.one_of(
    st.integers(min_value=2**63 - 1, max_value=2**80), st.integers(max_value=-(2**63) + 1, min_value=-(2**80)),
    st.booleans(), st.none(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.characters(), max_size=20),
    st.lists(st.integers() | st.text(max_size=5), max_size=5), st.dictionaries(st.text(max_size=5), st.integers(),
                                                                             max_size=3))
BODY_FIELDS = ("model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
               "n", "stop", "stream", "stream_options")
LEDGER_INT_ROUTES = ("/ledger/entries?after={}", "/ledger/checkpoints?after={}", "/ledger/accounts/x?recent={}",
                     "/ledger/proofs/inclusion?seq={}&tree_size=1", "/ledger/proofs/consistency?first=0&second={}")


def test_hostile_values_in_any_field_never_crash_the_api(tmp_path, tokenizer):  # noqa: F811
    from starlette.testclient import TestClient

    accounts = Accounts(tmp_path, N_LAYERS)
    app = create_app(ScriptedPool(tokenizer, accounts, delay_s=0.0), tokenizer, MODEL, 512, (2,), accounts,
                     rate_limit_rps=0)
    key = accounts.add_consumer("hostile", 10**15)
    base = {"/v1/completions": {"model": MODEL, "prompt": "Paris", "max_tokens": 2},
            "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "Paris"}],
                                     "max_tokens": 2}}

    @seed(FUZZ_SEED)
    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(path=st.sampled_from(sorted(base)), field=st.sampled_from(BODY_FIELDS), value=HOSTILE,
           ledger=st.sampled_from(LEDGER_INT_ROUTES), number=st.integers(min_value=-(2**70), max_value=2**70))
    def one(c, path, field, value, ledger, number):
        body = json.dumps({**base[path], field: value})  # NaN, Infinity and "\ud800" escapes as Python writes them
        r = c.post(path, content=body, headers={"Authorization": f"Bearer {key}", "content-type": "application/json"})
        assert r.status_code < 500, (path, field, r.text[:300])
        if r.status_code >= 400:
            assert set(json.loads(r.text)["error"]) == {"message", "type", "param", "code"}, r.text[:300]
            assert key not in r.text
        r = c.get(ledger.format(number))
        assert r.status_code < 500, (ledger, number, r.text[:300])

    try:
        with TestClient(app) as c:
            one(c)
            r = c.post("/v1/completions", json=base["/v1/completions"], headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        accounts.close()
