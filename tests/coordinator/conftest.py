"""Fixtures of the coordinator's end-to-end tests."""

from __future__ import annotations

import pytest
import torch

from coordinator.local_pool import LocalPool, free_port
from tests.postgres import empty_schema_url

THREE_STAGE_CAP_MB = 300  # no two providers hold the model: every pipeline has three stages


@pytest.fixture(scope="module")
def pool(tmp_path_factory, default_model_dir):
    """A pool of one coordinator and three capped providers (processes), serving one 3-stage
    pipeline, with a consumer key in `pool.api_key`; one per test module."""
    # a fixed p2p port, so that a test may restart the coordinator where the providers dial it
    pool = LocalPool(tmp_path_factory.mktemp("pool"), heartbeat_timeout_s=3.0,
                     coordinator_args=["--p2p-port", str(free_port())])
    try:
        pool.start_coordinator()
        for i in range(3):
            pool.add_provider(f"provider{i}", max_memory_mb=THREE_STAGE_CAP_MB)
        pool.wait_for(lambda s: s["pipelines"] and len(s["pipelines"][0]["stages"]) == 3, 180, "3 stages")
        pool.api_key = pool.add_consumer("e2e", 10**12)
        yield pool
    finally:
        pool.stop()


@pytest.fixture(scope="session")
def reference(default_reference):
    """Greedy text of `transformers` in one process, for a prompt or a list of chat messages."""
    model, tokenizer = default_reference

    def greedy(ids: list[int], max_tokens: int) -> str:
        ids = torch.tensor([ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    def text(prompt, max_tokens: int) -> str:
        if isinstance(prompt, list):
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            return greedy(list(ids["input_ids"] if hasattr(ids, "keys") else ids), max_tokens)
        return greedy(tokenizer(prompt)["input_ids"], max_tokens)

    return text


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request):
    """A coordinator's `--db`: None (its own SQLite file), then an empty PostgreSQL schema (skipped
    with the reason when no server is configured)."""
    if request.param == "sqlite":
        yield None
    else:
        with empty_schema_url(f"{request.node.name} on PostgreSQL") as url:
            yield url
