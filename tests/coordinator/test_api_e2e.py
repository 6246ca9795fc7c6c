"""The consumer API on a real pool: the official `openai` client, unchanged, against `coordinator
serve` and two `provider join` processes; the same greedy text as `transformers` in one process."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from coordinator.local_pool import LocalPool

CAP_MB = 600  # the model and 32 sessions' KV cache do not fit one provider: two stages
MODEL = "smollm2-135m-instruct"
PROMPTS = ["Once upon a time, in a small village,", "The three primary colors are", "def fibonacci(n):"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
CREDITS = 10**10


@pytest.fixture(scope="module")
def pool(tmp_path_factory, default_model_dir):
    pool = LocalPool(tmp_path_factory.mktemp("apipool"), context_tokens=256, max_sessions=32,
                     coordinator_args=["--rate-limit-rps", "100"])
    try:
        pool.start_coordinator()
        for i in range(2):
            pool.add_provider(f"provider{i}", max_memory_mb=CAP_MB)
        pool.wait_for_pipelines(1)
        pool.api_key = pool.add_consumer("tester", CREDITS)
        yield pool
    finally:
        pool.stop()


def client(pool: LocalPool, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=pool.api + "/v1", api_key=key or pool.api_key, max_retries=0, timeout=300)


def test_openai_client_gets_transformers_greedy_text_streamed_and_not(pool, reference):
    oc = client(pool)
    assert [m.id for m in oc.models.list()] == [MODEL]
    want = reference(PROMPTS[0], 20)
    r = oc.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0)
    assert r.choices[0].text == want and r.usage.completion_tokens == 20
    chunks = list(oc.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0, stream=True,
                                        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    # [DONE] came before the stages' receipts were settled on; the account, read right after, waits
    # for that settlement (read-your-writes) and bills what the usage chunk said
    a = oc.get("/account", cast_to=object)
    assert a["held_units"] == 0 and a["recent_usage"][0]["request_id"] == chunks[-1].id
    assert a["recent_usage"][0]["completion_tokens"] == chunks[-1].usage.completion_tokens == 20
    assert a["recent_usage"][0]["cost_units"] > 0
    want = reference(CHAT, 20)
    r = oc.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == want
    stream = oc.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want
    # sampling: the same seed gives the same text
    a, b = (oc.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0.9, top_p=0.95,
                                  seed=7).choices[0].text for _ in range(2))
    assert a == b


def prefill_steps(pool: LocalPool) -> int:
    """Prefill steps the pool's pipelines have run (`/metrics`)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(pool.api + "/metrics", timeout=30).text
    return sum(int(s.value) for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "meshpool_pipeline_step_seconds_count" and s.labels.get("kind") == "prefill")


def test_32_concurrent_streaming_clients_all_get_the_right_text(pool, reference):
    """... and their prompts are prefilled several to a step (each session's text still its own)."""
    want = {p: reference(p, 16) for p in PROMPTS}
    steps_before = prefill_steps(pool)
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def run(i: int):
        try:
            stream = client(pool).completions.create(model=MODEL, prompt=PROMPTS[i % 3], max_tokens=16,
                                                     temperature=0, stream=True)
            results[i] = "".join(c.choices[0].text for c in stream)
        except BaseException as exc:  # reported below
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    assert not errors, errors[:3]
    assert len(results) == 32
    for i, text in results.items():
        assert text == want[PROMPTS[i % 3]], i
    assert prefill_steps(pool) - steps_before < 32


def test_credits_are_held_then_charged_for_tokens_produced(pool):
    poor = pool.add_consumer("poor", 50)
    with pytest.raises(openai.APIStatusError) as info:
        client(pool, poor).completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8)
    assert info.value.status_code == 402
    a = client(pool).get("/account", cast_to=object)
    assert a["held_units"] == 0 and a["balance_units"] + a["spent_units"] == CREDITS
    assert a["recent_usage"] and all(u["cost_units"] > 0 for u in a["recent_usage"])
