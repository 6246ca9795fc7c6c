"""The consumer API in one process: the real app, ledger and tokenizer over a scripted pool.

The scripted pool answers every request with the tokens of a fixed text, one every few
milliseconds, from its own thread (as a driver does), and stops when a request is cancelled; it
then signs the request's receipt as a one-stage pipeline would, so the request settles on it
(once `receipt_gate` is set, when a test holds receipts back).
Errors, money, streaming shapes, disconnects and the WebSocket are checked here; the real pool
is in test_api_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn

from contracts import DEFAULT_PARAMS
from contracts.pricing import quote
from coordinator.accounts import Accounts, RateLimiter, hash_key
from coordinator.api import create_app
from coordinator.pool import PoolBusy
from coordinator.streaming import Detokenizer
from ledger.receipts import StageReceipt
from verification.commitments import tensor_digest
from node.transport.identity import Identity
from wire.messages import Stage

MODEL = "smollm2-135m-instruct"
N_LAYERS = 30
TEXT = " Paris is the capital of France. It is known for the Eiffel Tower, café culture and 🥐 pastries."


class ScriptedPool:
    def __init__(self, tokenizer, accounts: Accounts, delay_s: float = 0.01):
        self.ids = tokenizer(TEXT)["input_ids"]
        self.delay_s, self.busy = delay_s, False
        self.receipt_gate: threading.Event | None = None  # receipts wait for it (a stage slow to sign)
        self.requests = []
        self.identity, self.accounts = Identity.generate(), accounts
        accounts.open_provider(self.identity.peer_id_str, self.identity.public_key_bytes)

    def submit(self, request) -> None:
        if self.busy:
            raise PoolBusy("no pipeline: waiting for providers to (re)join", retry_after_s=2)
        self.requests.append(request)
        request.start_attempt((Stage(self.identity.peer_id_str, 0, N_LAYERS),))
        threading.Thread(target=self._run, args=(request,), daemon=True).start()

    def _run(self, request) -> None:
        for token in self.ids[:request.max_new_tokens]:
            if request.done.is_set():
                break
            time.sleep(self.delay_s)
            request.add_token(token)
        request.finish()
        if self.receipt_gate is not None:
            self.receipt_gate.wait(30)
        n = request.tokens_processed
        receipt = StageReceipt(request.request_id, MODEL, 0, N_LAYERS, n, tensor_digest(
            [torch.tensor((request.prompt_ids + request.tokens)[:n], dtype=torch.int64)]), "0" * 64,
            self.identity.peer_id_str, self.identity.public_key_bytes.hex())
        receipt = StageReceipt(**{**receipt.to_dict(), "signature": self.identity.sign(receipt.signed_bytes()).hex()})
        self.accounts.receipts.add(receipt, self.identity.peer_id_str)

    def snapshot(self) -> dict:
        return {"providers": [], "pipelines": [], "pending_requests": 0, "plan_error": ""}


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def start_server(data_dir, tokenizer) -> dict:
    accounts = Accounts(data_dir, N_LAYERS)
    pool = ScriptedPool(tokenizer, accounts)
    app = create_app(pool, tokenizer, MODEL, 512, (2,), accounts, rate_limit_rps=1000)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    return {"base": base, "accounts": accounts, "pool": pool, "app": app, "data_dir": data_dir, "server": server,
            "thread": thread}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer):
    running = start_server(tmp_path_factory.mktemp("coordinator"), tokenizer)
    yield running
    running["server"].should_exit = True
    running["thread"].join(10)
    running["accounts"].close()


def client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=key, max_retries=0)


def account(server, key: str) -> dict:
    return httpx.get(server["base"] + "/v1/account", headers={"Authorization": f"Bearer {key}"}).json()


def conserved(server, key: str, minted: int) -> dict:
    """Balance + held + spent always equals what was minted: no credit lost or created."""
    a = account(server, key)
    assert a["balance_units"] + a["held_units"] + a["spent_units"] == minted, a
    return a


def cost_units(tokens_processed: int) -> int:
    """What a request whose one stage processed `tokens_processed` tokens pays: its gas and the fees."""
    return quote(tokens_processed, 0, N_LAYERS, DEFAULT_PARAMS).total_units


def expected_text(tokenizer, n: int) -> str:
    return tokenizer.decode(tokenizer(TEXT)["input_ids"][:n], skip_special_tokens=True)


def test_detokenizer_holds_back_partial_characters_and_stop_prefixes(tokenizer):
    ids = tokenizer(TEXT)["input_ids"]
    d = Detokenizer(tokenizer)
    out = "".join(d.add(t) for t in ids) + d.flush()
    assert out == TEXT and "\ufffd" not in out
    d = Detokenizer(tokenizer, ["Eiffel"])
    pieces = [d.add(t) for t in ids]
    assert "".join(pieces) + d.flush() == TEXT[:TEXT.index("Eiffel")] and d.stopped
    assert not any("Eif" in p for p in pieces)


def test_completions_stream_and_not_give_the_same_text_and_usage(server, tokenizer):
    key = server["accounts"].add_consumer("alice", 10**7)
    oc = client(server, key)
    full = oc.completions.create(model=MODEL, prompt="Tell me about Paris.", max_tokens=12, temperature=0)
    assert full.choices[0].text == expected_text(tokenizer, 12) and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 12 and full.usage.prompt_tokens == len(tokenizer("Tell me about Paris.")["input_ids"])
    chunks = list(oc.completions.create(model=MODEL, prompt="Tell me about Paris.", max_tokens=12, stream=True,
                                        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12
    chat = oc.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Paris?"}], max_tokens=10)
    assert chat.choices[0].message.content == expected_text(tokenizer, 10)
    pieces = list(oc.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Paris?"}],
                                             max_tokens=10, stream=True))
    assert pieces[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in pieces) == chat.choices[0].message.content
    assert pieces[-1].choices[0].finish_reason == "length"
    a = conserved(server, key, 10**7)
    cost = cost_units
    assert a["held_units"] == 0 and a["requests"] == 4
    # each request pays every token its stage processed (the last token produced is never fed back)
    assert a["spent_units"] == sum(cost(u["prompt_tokens"] + u["completion_tokens"] - 1) for u in a["recent_usage"])


def test_stop_sequences_end_generation_and_charge_only_what_was_produced(server, tokenizer):
    key = server["accounts"].add_consumer("stopper", 10**7)
    r = client(server, key).completions.create(model=MODEL, prompt="Paris", max_tokens=40, stop=["Eiffel", "zzz"])
    assert r.choices[0].text == TEXT[:TEXT.index("Eiffel")] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 20
    a = conserved(server, key, 10**7)
    # the stages' work is paid: the tokens produced, up to the one that completed the stop sequence
    produced = len(server["pool"].requests[-1].tokens)
    assert r.usage.completion_tokens <= produced < 20
    assert a["spent_units"] == cost_units(r.usage.prompt_tokens + produced - 1)


def sse_lines(server, key: str, body: dict) -> list[str]:
    with httpx.stream("POST", server["base"] + "/v1/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": MODEL, "stream": True, "stream_options": {"include_usage": True}, **body}) as r:
        assert r.status_code == 200
        return [line for line in r.iter_lines() if line.startswith("data:")]


def held_units(server, key: str) -> int:
    """The consumer's held credits as the ledger has them now (not through /v1/account, which waits)."""
    return server["accounts"].reader.spending(server["accounts"].lookup(key).account_id)["held_units"]


@pytest.mark.parametrize("stop", [None, ["Eiffel"]], ids=["length", "stop sequence"])
def test_a_stream_ends_before_its_settlement_and_reports_what_it_bills(server, tokenizer, stop):
    """[DONE] arrives while the stage's receipt is still held back, so the hold is still open; the
    consumer's /v1/account waits for that settlement (read-your-writes) and shows what the usage
    chunk said: the tokens the pool produced (past the stop sequence's cut), each one paid once."""
    key = server["accounts"].add_consumer(f"behind-{bool(stop)}", 10**7)
    pool = server["pool"]
    pool.receipt_gate = gate = threading.Event()
    try:
        lines = sse_lines(server, key, {"prompt": "Paris", "max_tokens": 16, **({"stop": stop} if stop else {})})
        assert lines[-1] == "data: [DONE]"
        request = pool.requests[-1]
        assert request.done.is_set()
        assert held_units(server, key) > 0  # the end came first: the receipt, and so the settlement, still wait
        got: dict = {}
        reader = threading.Thread(target=lambda: got.update(account(server, key)))
        reader.start()
        reader.join(0.5)
        assert reader.is_alive()  # the read waits for the consumer's settlement, which waits for the receipt
    finally:
        gate.set()
        pool.receipt_gate = None
    reader.join(30)
    usage = json.loads(lines[-2][len("data: "):])["usage"]
    finish = json.loads(lines[-3][len("data: "):])["choices"][0]["finish_reason"]
    assert finish == ("stop" if stop else "length")
    assert got["held_units"] == 0 and got["balance_units"] + got["spent_units"] == 10**7
    billed = got["recent_usage"][0]
    assert usage["completion_tokens"] == billed["completion_tokens"] == len(request.tokens)
    assert usage["prompt_tokens"] == billed["prompt_tokens"] == len(tokenizer("Paris")["input_ids"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # "Eiffel" ends with TEXT's 14th token: the pool was cancelled there, or a few tokens later
    assert (14 <= usage["completion_tokens"] < 20) if stop else usage["completion_tokens"] == 16
    paid = cost_units(usage["prompt_tokens"] + usage["completion_tokens"] - 1)  # the last token is never fed back
    assert got["spent_units"] == billed["cost_units"] == paid
    assert not server["app"].state.service.pending.of(server["accounts"].lookup(key).account_id)


def test_a_request_refused_for_a_refund_still_on_its_way_waits_for_it(server, tokenizer):
    """A consumer whose balance covers its next request only once its last stream's hold is refunded
    is not refused while that settlement still runs behind the stream's [DONE]."""
    n_prompt, max_tokens = len(tokenizer("Paris")["input_ids"]), 8
    hold = quote(n_prompt, max_tokens, N_LAYERS, DEFAULT_PARAMS).total_units
    spent = cost_units(n_prompt + max_tokens - 1)
    key = server["accounts"].add_consumer("edge", hold + spent)  # one hold, or one settled request and a hold
    pool = server["pool"]
    pool.receipt_gate = gate = threading.Event()
    try:
        assert sse_lines(server, key, {"prompt": "Paris", "max_tokens": max_tokens})[-1] == "data: [DONE]"
        assert held_units(server, key) == hold
        got: list = []
        second = threading.Thread(target=lambda: got.append(httpx.post(
            server["base"] + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
            json={"model": MODEL, "prompt": "Paris", "max_tokens": max_tokens})))
        second.start()
        second.join(0.5)
    finally:
        gate.set()
        pool.receipt_gate = None
    second.join(60)
    assert got[0].status_code == 200, got[0].text
    a = conserved(server, key, hold + spent)
    assert a["held_units"] == 0 and a["spent_units"] == 2 * spent and a["balance_units"] == hold - spent


def test_shutdown_lets_the_settlements_behind_ended_streams_land(tmp_path, tokenizer):
    """The app's shutdown waits for what settles behind a stream (the providers can still send
    receipts then), so the ledger closes with the hold paid, not left for the next start."""
    running = start_server(tmp_path, tokenizer)
    accounts, pool = running["accounts"], running["pool"]
    try:
        key = accounts.add_consumer("last", 10**7)
        pool.receipt_gate = gate = threading.Event()
        lines = sse_lines(running, key, {"prompt": "Paris", "max_tokens": 6})
        assert lines[-1] == "data: [DONE]" and held_units(running, key) > 0
        running["server"].should_exit = True
        running["thread"].join(0.5)
        assert running["thread"].is_alive()  # the app's shutdown waits for the settlement
        gate.set()
        running["thread"].join(30)
        assert not running["thread"].is_alive()
        aid = accounts.lookup(key).account_id
        money = accounts.reader.spending(aid)
        assert money["held_units"] == 0 and money["paid_units"] == cost_units(len(tokenizer("Paris")["input_ids"]) + 5)
    finally:
        gate.set()
        running["server"].should_exit = True
        running["thread"].join(10)
        accounts.close()


def test_errors_have_the_openai_shape_and_move_no_credit(server):
    key = server["accounts"].add_consumer("errs", 10**7)
    poor = server["accounts"].add_consumer("poor", 100)
    base = server["base"]
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 4}

    def post(b, k, path="/v1/completions"):
        r = httpx.post(base + path, json=b, headers={"Authorization": f"Bearer {k}"} if k else {})
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
        return r

    assert post(body, None).status_code == 401
    assert post(body, "mp-not-a-key").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(server, "mp-nope").completions.create(model=MODEL, prompt="hi", max_tokens=2)
    r = post(body, poor)
    assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_quota"
    assert post({**body, "model": "gpt-4"}, key).status_code == 404
    with pytest.raises(openai.NotFoundError):
        client(server, key).completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    for bad in ({"temperature": 3}, {"top_p": 0}, {"n": 2}, {"max_tokens": 0}, {"max_tokens": 600},
                {"stop": ["a"] * 5}, {"prompt": ""}, {"seed": -1}):
        r = post({**body, **bad}, key)
        assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request_error", (bad, r.text)
    assert post({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, key,
                "/v1/chat/completions").status_code == 422
    server["pool"].busy = True
    try:
        r = post(body, key)
        assert r.status_code == 503 and r.headers["Retry-After"] == "2"  # the pool's own estimate
        assert r.json()["error"] == {"message": "no pipeline: waiting for providers to (re)join",
                                     "type": "service_unavailable", "param": None, "code": "no_pipeline"}
    finally:
        server["pool"].busy = False
    svc = server["app"].state.service
    limiter, svc.limiter = svc.limiter, RateLimiter(1.0, burst=2)
    try:
        codes = [httpx.post(base + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
                 for _ in range(4)]
        assert [c.status_code for c in codes][:2] == [200, 200] and codes[3].status_code == 429
        assert int(codes[3].headers["Retry-After"]) >= 1
        with pytest.raises(openai.RateLimitError):
            client(server, key).completions.create(model=MODEL, prompt="hi", max_tokens=2)
    finally:
        svc.limiter = limiter
    a = conserved(server, key, 10**7)
    assert a["requests"] == 3 and a["held_units"] == 0  # two 200s before the limit, one with the 503 (0 tokens)
    assert conserved(server, poor, 100)["balance_units"] == 100


def test_a_client_that_leaves_mid_stream_stops_the_generation_and_pays_for_what_was_produced(server):
    key = server["accounts"].add_consumer("leaver", 10**7)
    pool = server["pool"]
    pool.delay_s = 0.05
    try:
        with httpx.stream("POST", server["base"] + "/v1/completions", headers={"Authorization": f"Bearer {key}"},
                          json={"model": MODEL, "prompt": "Paris", "max_tokens": 30, "stream": True}) as r:
            lines = r.iter_lines()
            got = [line for _, line in zip(range(6), lines) if line.startswith("data:")]
            assert got
        request = pool.requests[-1]
        deadline = time.monotonic() + 10
        while account(server, key)["held_units"] and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        pool.delay_s = 0.01
    assert request.done.is_set() and request.error  # cancelled
    a = conserved(server, key, 10**7)
    produced = a["recent_usage"][0]["completion_tokens"]
    # what the pool had produced when the hold was resolved (a step in flight may add one after)
    assert 0 < produced < 30 and produced <= len(request.tokens) <= produced + 1
    assert a["recent_usage"][0]["finish_reason"] == "cancelled"
    assert a["spent_units"] == cost_units(a["recent_usage"][0]["prompt_tokens"] + produced - 1)


def test_websocket_streams_the_same_chunks(server, tokenizer):
    import websockets

    key = server["accounts"].add_consumer("ws", 10**7)
    url = server["base"].replace("http", "ws") + "/v1/stream"

    async def go(message):
        msgs = []
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps(message))
            try:
                while True:
                    msgs.append(json.loads(await ws.recv()))
            except websockets.ConnectionClosed as exc:
                msgs.append({"close": exc.rcvd.code if exc.rcvd else None})
        return msgs

    msgs = asyncio.run(go({"api_key": key, "completion": {"model": MODEL, "prompt": "Paris", "max_tokens": 9}}))
    assert msgs[-1] == {"close": 1000}
    assert msgs[-2]["object"] == "done" and msgs[-2]["usage"]["completion_tokens"] == 9
    assert "".join(m["choices"][0]["text"] for m in msgs[:-2]) == expected_text(tokenizer, 9)
    msgs = asyncio.run(go({"api_key": "mp-bad", "completion": {"model": MODEL, "prompt": "Paris"}}))
    assert msgs == [{"error": msgs[0]["error"], "status": 401}, {"close": 1008}]
    conserved(server, key, 10**7)


def test_openapi_schema_describes_the_api(server):
    schema = httpx.get(server["base"] + "/openapi.json").json()
    for path in ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/account"):
        assert path in schema["paths"]
    post = schema["paths"]["/v1/completions"]["post"]
    assert {"401", "402", "404", "422", "429", "503"} <= set(post["responses"])
    assert "text/event-stream" in post["responses"]["200"]["content"]
    assert {"CompletionRequest", "ChatCompletionRequest", "ErrorBody", "Account"} <= set(schema["components"]["schemas"])


def test_consumer_add_prints_a_key_that_is_stored_hashed(server):
    out = subprocess.run([sys.executable, "-m", "coordinator.cli", "consumer", "add", "bob", "--credits", "5000",
                          "--data-dir", str(server["data_dir"])], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip().splitlines()[-1]
    assert key.startswith("mp-") and len(key) > 40
    assert not (server["data_dir"] / "api_keys.db").exists()  # keys live in the ledger's database, hashed
    stored = b"".join(p.read_bytes() for p in server["data_dir"].glob("ledger.db*"))
    assert key.encode() not in stored and hash_key(key).encode() in stored
    assert account(server, key)["balance_units"] == 5000  # the running coordinator sees it at once
    again = subprocess.run([sys.executable, "-m", "coordinator.cli", "consumer", "add", "bob", "--credits", "5",
                            "--data-dir", str(server["data_dir"])], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "exists" in again.stderr
