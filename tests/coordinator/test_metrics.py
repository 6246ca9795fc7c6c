"""`GET /metrics`: Prometheus text from a registry per app, counting what a real pool did.

The unit tests run the metrics and the collector in this process; the pool tests start a real
3-provider pool (coordinator and providers as processes, libp2p between them) and check that
the token counter grows by exactly the completion tokens the consumer was given, and that no
key, key hash or private key leaks through the metrics, the dashboard or its feed.
"""

from __future__ import annotations

import base64
import sqlite3
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.local_pool import LocalPool
from coordinator.metrics import MAX_PIPELINE_SERIES, Metrics, PoolCollector

CAP_MB = 300
MODEL = "smollm2-135m-instruct"


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition (which must parse)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(parsed: dict, name: str, **labels) -> float:
    return parsed.get((name, tuple(sorted(labels.items()))), 0.0)


def total(parsed: dict, name: str, **labels) -> float:
    """Sum over every series of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in parsed.items() if n == name and set(labels.items()) <= set(ls))


# -- in this process ----------------------------------------------------------------------


class FakePool:
    def snapshot(self) -> dict:
        return {"providers": [{"peer": "a", "state": "serving"}, {"peer": "b", "state": "serving"},
                              {"peer": "c", "state": "newcomer"}, {"peer": "d", "state": "dead"}],
                "pipelines": [{"id": "p1", "stages": []}], "pending_requests": 2, "plan_error": ""}


def test_each_app_has_its_own_registry_and_labels_are_bounded():
    one, two = Metrics(MODEL), Metrics(MODEL)  # the same names twice in one process: no clash
    for m in (one, two):
        m.registry.register(PoolCollector(FakePool()))
    timer = one.request(MODEL)
    timer.token()
    timer.token()
    timer.end(200)
    timer.end(499)  # a request ends once
    one.request("no-such-model").end(404)  # a consumer's model name never becomes a label
    one.rejected(None, 401)
    one.observe_step("p1", "decode", 3, 0.02)
    a, b = samples(one.render().decode()), samples(two.render().decode())
    assert value(a, "meshpool_tokens_generated_total", model=MODEL) == 2
    assert value(b, "meshpool_tokens_generated_total", model=MODEL) == 0
    assert value(a, "meshpool_requests_total", model=MODEL, status="200") == 1
    assert value(a, "meshpool_requests_total", model=MODEL, status="499") == 0
    assert value(a, "meshpool_requests_total", model="other", status="404") == 1
    assert value(a, "meshpool_requests_total", model="other", status="401") == 1
    assert value(a, "meshpool_requests_in_flight") == 0
    assert value(a, "meshpool_time_to_first_token_seconds_count", model=MODEL) == 1
    assert value(a, "meshpool_token_latency_seconds_count", model=MODEL) == 1
    assert value(a, "meshpool_pipeline_step_seconds_count", pipeline="p1", kind="decode") == 1
    assert value(a, "meshpool_pipeline_tokens_total", pipeline="p1") == 3
    assert value(a, "meshpool_providers", state="serving") == 2
    assert value(a, "meshpool_providers", state="dead") == 1 and value(a, "meshpool_providers", state="banned") == 0
    assert value(a, "meshpool_pipelines") == 1 and value(a, "meshpool_requests_pending") == 2
    assert all(name.startswith("meshpool_") for name, _ in a)
    assert one.rates()["p1"]["tokens_per_s"] > 0
    for i in range(MAX_PIPELINE_SERIES + 10):  # re-plans make new pipeline ids: old series are dropped
        one.observe_step(f"q{i}", "decode", 1, 0.01)
    pipelines = {dict(ls)["pipeline"] for n, ls in samples(one.render().decode()) if n == "meshpool_pipeline_tokens_total"}
    assert len(pipelines) == MAX_PIPELINE_SERIES


def test_the_ledger_collector_counts_audits_slashes_and_escrow(pool_with_audits):
    from coordinator.dashboard.ledger_view import LedgerView
    from ledger.reader import LedgerReader

    m = Metrics(MODEL)
    view = LedgerView(LedgerReader(pool_with_audits.engine))
    m.registry.register(PoolCollector(FakePool(), view))
    parsed = samples(m.render().decode())
    assert value(parsed, "meshpool_audits_total", verdict="pass") == 1
    assert value(parsed, "meshpool_audits_total", verdict="fail") == 1
    assert value(parsed, "meshpool_slashes_total") == 1 and value(parsed, "meshpool_slashed_units_total") == 50
    supply = LedgerReader(pool_with_audits.engine).supply()
    assert value(parsed, "meshpool_ledger_entries_total") == supply["entry_count"]
    assert value(parsed, "meshpool_escrow_units", account="requests") == supply["escrow_requests_units"] > 0
    assert value(parsed, "meshpool_credit_supply_units") == supply["supply_units"]
    summary = view.summary()
    assert [a["verdict"] for a in summary["audits"]] == ["fail", "pass"]  # newest first
    assert summary["slashes"][0]["peer"] == "peerA" and summary["slashes"][0]["taken_units"] == 50
    standing = view.standings(["peerA", "peerB", "consumer:alice"])
    assert set(standing) == {"peerA", "peerB"}  # consumers are never looked up for the page
    assert standing["peerA"]["earned_units"] > 0 and standing["peerA"]["slashed_units"] == 50


@pytest.fixture
def pool_with_audits(tmp_path):
    """A ledger with a paid stage, two audits, a slash and an open hold (no processes)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from ledger.chain import public_key_hex
    from ledger.receipts import sign_receipt
    from ledger.service import LedgerService

    svc = LedgerService.open(Ed25519PrivateKey.generate(), data_dir=tmp_path)
    keys = {peer: Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32) for i, peer in enumerate(("peerA", "peerB"))}
    for peer, key in keys.items():
        svc.open_account(peer, "provider", public_key_hex(key))
    svc.open_account("consumer:alice", "consumer")
    svc.mint("m1", "consumer:alice", 10_000_000)
    svc.hold("h1", "consumer:alice", 100_000, "r1")
    svc.settle("s1", "h1", [sign_receipt(keys["peerA"], request_id="r1", model="tiny", layer_start=0, layer_end=4,
                                         token_count=20, input_hash="00" * 32, output_hash="11" * 32,
                                         provider_id="peerA")])
    svc.record_audit("a1", audit_id="a1", verifier_id="peerB", subject_id="peerA", verifier_agreed=True,
                     subject_passed=True)
    svc.record_audit("a2", audit_id="a2", verifier_id="peerB", subject_id="peerA", verifier_agreed=True,
                     subject_passed=False)
    svc.slash("sl1", "peerA", 50, "wrong hidden states", {"audit_id": "a2"})
    svc.hold("h2", "consumer:alice", 1_000, "r2")
    yield svc
    svc.close()


# -- a real pool --------------------------------------------------------------------------


def scrape(pool: LocalPool) -> dict:
    response = httpx.get(pool.api + "/metrics", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


def test_tokens_generated_grow_by_exactly_the_completion_tokens(pool):
    before = scrape(pool)
    client = openai.OpenAI(base_url=pool.api + "/v1", api_key=pool.api_key, max_retries=0)
    completion_tokens = 0
    for prompt, n in (("The capital of France is", 12), ("def fibonacci(n):", 20)):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0)
        completion_tokens += out.usage.completion_tokens
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name a colour."}],
                                            max_tokens=10, stream=True, stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in stream if chunk.usage]
    completion_tokens += usage[-1].completion_tokens
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=pool.api + "/v1", api_key="mp-wrong", max_retries=0).completions.create(
            model=MODEL, prompt="x", max_tokens=1)
    after = scrape(pool)

    def grew(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    assert completion_tokens > 0
    assert grew("meshpool_tokens_generated_total") == completion_tokens
    assert grew("meshpool_requests_total", model=MODEL, status="200") == 3
    assert grew("meshpool_requests_total", status="401") == 1
    assert grew("meshpool_time_to_first_token_seconds_count") == 3
    assert grew("meshpool_token_latency_seconds_count") == completion_tokens - 3
    assert grew("meshpool_pipeline_step_seconds_count") >= completion_tokens // 3  # decode steps batch requests
    assert grew("meshpool_pipeline_tokens_total") >= completion_tokens
    # each of the 3 stages reported its compute time in every step; the rest went to the 4 hops
    steps = grew("meshpool_pipeline_step_seconds_count")
    assert [grew("meshpool_stage_step_seconds_count", stage=str(i)) for i in range(4)] == [steps, steps, steps, 0]
    assert grew("meshpool_hop_seconds_count") == steps
    assert 0 < grew("meshpool_stage_step_seconds_sum") < grew("meshpool_pipeline_step_seconds_sum")
    assert value(after, "meshpool_requests_in_flight") == 0
    assert value(after, "meshpool_providers", state="serving") == 3
    assert value(after, "meshpool_pipelines") == 1
    assert grew("meshpool_ledger_entries_total") > 0  # holds and their resolution
    assert ("meshpool_escrow_units", (("account", "requests"),)) in after
    assert ("meshpool_audits_total", (("verdict", "fail"),)) in after


def secrets_of(pool: LocalPool) -> list[str]:
    """Every form in which a key, a key hash or a private key could show: they must not."""
    found = [pool.api_key]
    with sqlite3.connect(pool.root / "coordinator" / "ledger.db") as conn:  # keys live beside the ledger
        found += [row[0] for row in conn.execute("SELECT key_sha256 FROM consumer_keys")]
    for key_file in Path(pool.root).glob("*/node_ed25519.key"):  # the coordinator's and each provider's
        raw = key_file.read_bytes()
        found += [raw.hex(), raw.hex().upper(), base64.b64encode(raw).decode().rstrip("="),
                  base64.urlsafe_b64encode(raw).decode().rstrip("=")]
    assert len(found) >= 1 + 1 + 4 * 4
    return found


def test_nothing_secret_in_metrics_page_assets_or_feed(pool):
    pool.post("/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 4}, api_key=pool.api_key)
    bodies = {path: httpx.get(pool.api + path, timeout=30).text
              for path in ("/metrics", "/", "/dashboard/app.js", "/dashboard/style.css", "/dashboard/state")}
    with httpx.stream("GET", pool.api + "/dashboard/events", timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        feed, deadline = "", time.monotonic() + 10
        for chunk in response.iter_text():
            feed += chunk
            if feed.count("data: ") >= 2 or time.monotonic() > deadline:
                break
    bodies["/dashboard/events"] = feed
    assert feed.count("data: ") >= 2
    for secret in secrets_of(pool):
        for path, body in bodies.items():
            assert secret not in body, f"{path} leaks a secret"
