"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis over hypothesis).

Requests that fit the schema and requests that break it (negative mode: wrong types, missing
fields, out-of-range values) go to the real app in this process, with a valid key so they get past
authentication to tokenizing, admission and the (scripted, instant) pool. The property: no answer
is a 5xx, every error is in OpenAI's shape, every answer is JSON a browser can parse, and the app
still serves afterwards. Fixed seed and a few hundred cases: reproducible and quick.
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
