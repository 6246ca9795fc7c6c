"""Hostile input at the HTTP edge, each as an attacker sent it, on the real app in one process.

Every case checks the answer (status, OpenAI's error shape, nothing of the input echoed) and that
the app still serves a normal request afterwards. The app, ledger and tokenizer are real; the pool
is test_api_inprocess's scripted one.
"""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest

from coordinator.edge import BodyLimit, LoginThrottle, dumps, finite
from coordinator.planner import ProfileError, provider_spec_from_profile
from tests.coordinator.test_api_inprocess import MODEL, client, server, tokenizer  # noqa: F401 (fixtures)

SECRET_KEY = "mp-SECRET-never-echoed-0123456789"
ERROR_FIELDS = {"message", "type", "param", "code"}


def strict_json(text: str):
    """JSON as a browser parses it: NaN, Infinity and -Infinity are errors."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = strict_json(r.text)
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, r.text
    return body["error"]


@pytest.fixture(scope="module")
def key(server):  # noqa: F811
    return server["accounts"].add_consumer("edge", 10**9)


def post(server, path: str, content: bytes, key: str | None = None, **headers) -> httpx.Response:  # noqa: F811
    h = {"content-type": "application/json", **headers}
    if key:
        h["Authorization"] = f"Bearer {key}"
    return httpx.post(server["base"] + path, content=content, headers=h, timeout=30)


def in_process_post(server, path: str, content, key: str | None = None) -> httpx.Response:  # noqa: F811
    """A POST straight into the ASGI app. Oversized bodies go this way: over a socket, the server's
    close after an early 413 can reset the connection while the client is still sending (a race in
    TCP, not in the app)."""
    headers = {"content-type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}

    async def go():
        transport = httpx.ASGITransport(app=server["app"], client=("127.0.0.1", 5555))
        async with httpx.AsyncClient(transport=transport, base_url="http://edge", timeout=30) as c:
            return await c.post(path, content=content, headers=headers)

    return asyncio.run(go())


def still_serves(server, key) -> None:  # noqa: F811
    r = client(server, key).completions.create(model=MODEL, prompt="Paris", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


def test_a_lone_surrogate_is_a_422_not_a_tokenizer_crash(server, key):  # noqa: F811
    for path, body in (("/v1/completions", {"model": MODEL, "prompt": "x\ud800y", "max_tokens": 2}),
                       ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "\udfff"}]}),
                       ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ["\ud800"]})):
        err = openai_error(post(server, path, json.dumps(body).encode(), key), 422)
        assert "unicode" in err["message"].lower() and err["type"] == "invalid_request_error"
    still_serves(server, key)


@pytest.mark.parametrize("content", [b'{"model": "\xff\xfe", "prompt": "x"}', b"[" * 100_000 + b"]" * 100_000,
                                     b'{"model": ', b"\x00\x01"], ids=["bad-utf8", "deep", "truncated", "binary"])
def test_bodies_that_are_not_json_get_a_400_in_openai_shape(server, key, content):  # noqa: F811
    err = openai_error(post(server, "/v1/completions", content, key), 400)
    assert "not valid JSON" in err["message"]
    still_serves(server, key)


@pytest.mark.parametrize("bad", [{"max_tokens": True}, {"max_tokens": "3"}, {"temperature": "0.5"},
                                 {"seed": False}, {"stream": "yes"}, {"stream": 1}, {"model": 5},
                                 {"prompt": 7}, {"top_p": None}])
def test_types_are_strict_and_errors_do_not_echo_the_input(server, key, bad):  # noqa: F811
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2, "api_key": SECRET_KEY, **bad}
    r = post(server, "/v1/completions", json.dumps(body).encode(), key)
    err = openai_error(r, 422)
    assert err["param"] == next(iter(bad))
    assert SECRET_KEY not in r.text and key not in r.text
    assert json.dumps(next(iter(bad.values()))) not in err["message"] or next(iter(bad.values())) is None


def test_framework_errors_have_the_openai_shape(server):  # noqa: F811
    openai_error(httpx.get(server["base"] + "/v1/nowhere"), 404)
    openai_error(httpx.delete(server["base"] + "/v1/models"), 405)
    openai_error(httpx.get(server["base"] + "/ledger/entries?after=x"), 422)


def test_a_body_over_the_limit_is_a_413_before_authentication(server, key):  # noqa: F811
    limit = server["app"].state.max_body_bytes
    big = b'{"model": "' + b"a" * (limit + 10) + b'"}'
    err = openai_error(in_process_post(server, "/v1/completions", big), 413)  # no key: size is refused first
    assert err["code"] == "request_too_large" and str(limit) in err["message"]
    sent = []

    async def chunks():  # no Content-Length: transfer-encoding chunked
        for piece in [b'{"model": "'] + [b"a" * 65536] * (limit // 65536 + 8) + [b'"}']:
            sent.append(len(piece))
            yield piece

    r = in_process_post(server, "/v1/completions", chunks())
    assert openai_error(r, 413)["code"] == "request_too_large"
    assert sum(sent) <= limit + 2 * 65536 < 65536 * (limit // 65536 + 8)  # the rest was never pulled
    # just below the limit is read and answered (here: a 401, as no key came with it)
    openai_error(in_process_post(server, "/v1/completions", b'{"model": "' + b"a" * (limit - 20) + b'"}'), 401)
    still_serves(server, key)


def test_body_limit_reads_no_more_than_the_limit_before_refusing():
    """At the ASGI level: the middleware stops pulling chunks at the first one past the limit."""
    pulled, sent = [], []
    chunk = b"x" * 1000

    async def receive():
        pulled.append(len(chunk))
        return {"type": "http.request", "body": chunk, "more_body": True}  # an endless body

    async def send(message):
        sent.append(message)

    async def app(scope, receive_, send_):
        while True:  # reads it all, as a body parser would
            await receive_()

    asyncio.run(BodyLimit(app, max_bytes=10_000)({"type": "http", "headers": []}, receive, send))
    assert sum(pulled) == 11_000 and sent[0]["status"] == 413
    assert set(strict_json(sent[1]["body"].decode())["error"]) == ERROR_FIELDS
    sent.clear()
    pulled.clear()
    asyncio.run(BodyLimit(app, max_bytes=10_000)({"type": "http", "headers": [(b"content-length", b"10001")]},
                                                 receive, send))
    assert pulled == [] and sent[0]["status"] == 413  # a declared length over the limit: nothing read


def test_a_prompt_longer_than_the_context_can_hold_is_refused_before_tokenizing(server, key, monkeypatch):  # noqa: F811
    svc = server["app"].state.service
    limit = svc.max_prompt_chars()
    assert limit == 511 * svc.max_chars_per_token  # context 512, one token kept for the answer
    assert 1 <= svc.max_chars_per_token <= 128  # the longest token of SmolLM2 is 81 characters

    def no_tokenizing(body):
        raise AssertionError("tokenized a prompt that cannot fit")

    monkeypatch.setattr(svc, "prompt_ids", no_tokenizing)
    n_messages = limit // 1000 + 1
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "a" * 1000}] * n_messages}
    err = openai_error(post(server, "/v1/chat/completions", json.dumps(chat).encode(), key), 422)
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    err = openai_error(post(server, "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": "a" * (limit + 1)}).encode(), key), 422)
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    # the measured attack: 256 messages of 100k characters never get past the body limit
    attack = b'{"model": "%s", "messages": [' % MODEL.encode() + b",".join(
        [b'{"role": "user", "content": "' + b"a" * 100_000 + b'"}'] * 256) + b"]}"
    openai_error(in_process_post(server, "/v1/chat/completions", attack, key), 413)
    monkeypatch.undo()
    still_serves(server, key)


def test_ledger_integers_are_bounded_at_the_route(server):  # noqa: F811
    base = server["base"]
    for url in ("/ledger/entries?after=9223372036854775808", "/ledger/checkpoints?after=99999999999999999999",
                "/ledger/proofs/inclusion?seq=9223372036854775808&tree_size=1",
                "/ledger/proofs/inclusion?seq=0&tree_size=9223372036854775808",
                "/ledger/proofs/consistency?first=1&second=18446744073709551616",
                "/ledger/entries?after=-2", "/ledger/accounts/x?recent=99999999999999999999"):
        assert openai_error(httpx.get(base + url), 422)["type"] == "invalid_request_error", url
    top = 2**63 - 1  # the largest allowed is answered, not a crash
    assert httpx.get(base + f"/ledger/entries?after={top}").json()["entries"] == []
    assert httpx.get(base + f"/ledger/checkpoints?after={top}").status_code == 200
    openai_error(httpx.get(base + f"/ledger/proofs/inclusion?seq={top - 1}&tree_size={top}"), 400)
    assert httpx.get(base + "/ledger/supply").status_code == 200


def test_a_profile_with_nan_is_refused_at_registration():
    good = {"devices": [{"kind": "cpu", "memory_total_bytes": 2**30, "mem_bandwidth_gb_per_s": 20.0,
                         "matmul_tflops": 0.5}], "host": {"cpu_cores": 2}}
    assert provider_spec_from_profile("peerA", good).memory_bytes == 2**30
    for bad in ({**good, "host": {"cpu_cores": math.nan}},
                {**good, "devices": [{**good["devices"][0], "memory_total_bytes": math.inf}]},
                {**good, "devices": good["devices"] + [{"matmul_tflops": -math.inf}]},
                {**good, "extra": [[[math.nan]]]}):
        with pytest.raises(ProfileError, match="finite"):
            provider_spec_from_profile("peerA", bad)
    deep: dict = {}
    for _ in range(40):
        deep = {"x": deep}
    with pytest.raises(ProfileError, match="deeper"):
        provider_spec_from_profile("peerA", {**good, "extra": deep})


def test_nan_never_reaches_a_client_as_json(server, monkeypatch):  # noqa: F811
    """A provider's profile with NaN (as one registered before the check would have) is sent as null:
    /pool, /dashboard/state and the event feed stay parseable for the browser."""
    pool = server["pool"]
    nan_provider = {"peer": "12D3KooWnan", "state": "newcomer", "max_memory_bytes": 2**30,
                    "profile": {"devices": [{"kind": "cpu", "memory_total_bytes": 2**30,
                                             "mem_bandwidth_gb_per_s": math.nan, "matmul_tflops": math.inf}],
                                "host": {"cpu_cores": -math.inf}}}
    monkeypatch.setattr(pool, "snapshot", lambda: {"providers": [nan_provider], "pipelines": [],
                                                   "pending_requests": 0, "plan_error": ""})
    server["app"].state.dashboard._cached = None
    base = server["base"]
    assert strict_json(httpx.get(base + "/pool").text)["providers"][0]["profile"]["devices"][0][
        "mem_bandwidth_gb_per_s"] is None
    state = strict_json(httpx.get(base + "/dashboard/state").text)
    assert state["providers"][0]["profile"]["bandwidth_gb_per_s"] is None
    with httpx.stream("GET", base + "/dashboard/events", timeout=30) as r:
        data = next(line for line in r.iter_lines() if line.startswith("data:"))
    assert strict_json(data[5:])["providers"][0]["peer"] == "12D3KooWnan"
    metrics = httpx.get(base + "/metrics")
    assert metrics.status_code == 200


def test_the_json_sanitiser():
    assert finite({"a": [math.nan, 1.5, (math.inf, -math.inf)], "b": {"c": 2, "d": None, "e": "NaN"}}) == \
        {"a": [None, 1.5, [None, None]], "b": {"c": 2, "d": None, "e": "NaN"}}
    assert dumps({"x": math.nan}) == '{"x":null}'
    assert dumps({"x": object()}) == '{"x":null}'  # not JSON: null, not a crash


def test_failed_logins_are_throttled_per_address(server, key):  # noqa: F811
    """From one address a burst of bad keys, then 429 with Retry-After before any lookup (a good key
    too: guessing right during the wait gains nothing); other addresses are not affected."""
    app, svc = server["app"], server["app"].state.service
    looked_up = []
    lookup = svc.accounts.lookup

    async def go():
        transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 4242))
        async with httpx.AsyncClient(transport=transport, base_url="http://edge") as c:
            codes = []
            for i in range(30):
                r = await c.get("/v1/account", headers={"Authorization": f"Bearer mp-guess-{i}"})
                codes.append(r.status_code)
            last = await c.get("/v1/account", headers={"Authorization": f"Bearer {key}"})
            return codes, last

    svc.accounts.lookup = lambda k: looked_up.append(k) or lookup(k)
    try:
        codes, last = asyncio.run(go())
    finally:
        svc.accounts.lookup = lookup
    burst = int(svc.login_throttle.burst)
    assert codes[:burst] == [401] * burst and codes[-1] == 429
    assert len(looked_up) <= burst + 2  # refused before the lookup, after the burst (+ refill during the test)
    err = openai_error(last, 429)
    assert err["code"] == "too_many_failed_logins" and int(last.headers["Retry-After"]) >= 1
    assert key not in last.text
    still_serves(server, key)  # 127.0.0.1 was never throttled


def test_login_throttle_refills_and_its_memory_is_bounded():
    now = [0.0]
    t = LoginThrottle(burst=3, refill_per_s=0.5, max_addresses=100, clock=lambda: now[0])
    for _ in range(3):
        assert t.wait_s("a") == 0
        t.failed("a")
    assert t.wait_s("a") == pytest.approx(2.0) and t.wait_s("b") == 0
    now[0] = 2.0
    assert t.wait_s("a") == 0
    for i in range(10_000):
        t.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(t) == 100


def test_websocket_frames_of_the_wrong_kind_are_closed_with_a_reason(server, key):  # noqa: F811
    import websockets

    url = server["base"].replace("http", "ws") + "/v1/stream"

    async def send(frame):
        got = []
        async with websockets.connect(url) as ws:
            await ws.send(frame)
            try:
                while True:
                    got.append(await ws.recv())
            except websockets.ConnectionClosed as exc:
                return got, exc.rcvd.code if exc.rcvd else None, exc.rcvd.reason if exc.rcvd else None

    got, code, reason = asyncio.run(send(b"\x00\x01binary"))
    assert code == 1003 and "binary" in reason and strict_json(got[0])["status"] == 400
    got, code, reason = asyncio.run(send("not json {"))
    assert code == 1007 and "JSON" in reason
    for shape in ({"api_key": SECRET_KEY, "completion": {"model": MODEL, "prompt": 5}},
                  {"api_key": SECRET_KEY, "chat": {"model": MODEL, "messages": "hi"}},
                  {"api_key": 12345, "completion": {"model": MODEL, "prompt": "x"}},
                  {"api_key": SECRET_KEY}, [1, 2, 3], "just a string"):
        got, code, reason = asyncio.run(send(json.dumps(shape)))
        assert code == 1008, (shape, code, got)
        msg = strict_json(got[0])
        assert set(msg["error"]) == ERROR_FIELDS and msg["status"] == 422
        assert SECRET_KEY not in got[0] and SECRET_KEY not in reason
    got, code, _ = asyncio.run(send("x" * 1_000_001))
    assert code == 1009
    got, code, _ = asyncio.run(send(json.dumps({"api_key": SECRET_KEY, "completion": {"model": MODEL,
                                                                                       "prompt": "x"}})))
    assert code == 1008 and strict_json(got[0])["status"] == 401 and SECRET_KEY not in got[0]
    # the socket still serves a good request
    got, code, _ = asyncio.run(send(json.dumps({"api_key": key, "completion": {"model": MODEL, "prompt": "Paris",
                                                                                 "max_tokens": 3}})))
    assert code == 1000 and strict_json(got[-1])["object"] == "done"
    assert strict_json(got[-1])["usage"]["completion_tokens"] == 3


def test_a_stage_reporting_nan_does_not_poison_the_metrics():
    from coordinator.metrics import Metrics

    m = Metrics(MODEL)
    m.observe_step("p0", "decode", 1, 0.01, [math.nan, math.inf, 2.0])
    text = m.render().decode()
    assert "NaN" not in text and "Inf" not in text.replace("+Inf", "")  # +Inf is the last bucket's name
