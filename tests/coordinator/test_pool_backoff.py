"""A provider that refuses every step (`provider join --fault-injection refuse`), or fails every step
with an error that is no refusal (`crash`: a device fault, a bug), beside an honest one, both able to
hold the whole model: the broken stage says so at once, is benched with backoff, its pipeline is not
re-planned in a loop, and the honest pipeline serves every request."""

from __future__ import annotations

import concurrent.futures

import pytest

from coordinator.backoff import STRIKES_TO_BENCH
from coordinator.local_pool import LocalPool

MODEL = "smollm2-135m-instruct"


@pytest.mark.parametrize("fault, said", [("refuse", "refuses every step"), ("crash", "fails every step")])
def test_a_stage_that_fails_every_step_is_benched_and_the_other_pipeline_serves(tmp_path, default_model_dir, fault,
                                                                                said):
    pool = LocalPool(tmp_path)
    try:
        pool.start_coordinator()
        honest = pool.add_provider("honest")
        refuser = pool.add_provider("refuser", extra_args=["--fault-injection", fault])
        pool.wait_for_pipelines(2)  # each holds the model alone: two one-stage pipelines
        key = pool.add_consumer("client", 10**12)

        def complete(i: int) -> tuple[int, dict]:
            return pool.post("/v1/completions", {"model": MODEL, "prompt": f"Count to {i}:", "max_tokens": 3},
                             api_key=key)

        # concurrent, so that requests go to the less loaded pipeline, the refuser's too; every request
        # is answered, however often it first lands on the refuser. Rounds until /pool shows it benched
        # (a bench lasts seconds: back from one, its next failure benches it again, for longer).
        def benched_now(state: dict) -> bool:
            return any(b["peer"] == refuser and b["benched"] for b in state["benched"])

        state = pool.get("/pool")
        with concurrent.futures.ThreadPoolExecutor(4) as executor:
            for round_ in range(10):
                for status, body in executor.map(complete, range(4 * round_, 4 * round_ + 4)):
                    assert status == 200, body
                state = pool.get("/pool")
                if benched_now(state):
                    break
        assert benched_now(state), state
        dashboard = pool.get("/dashboard/state")
        [bench] = [b for b in state["benched"] if b["peer"] == refuser]
        assert said in bench["reason"] and bench["benches"] >= 1 and bench["back_in_s"] > 0
        assert honest not in {b["peer"] for b in state["benched"]}  # serving cleared any strike of its own
        serving = {s["peer"] for p in state["pipelines"] for s in p["stages"]}
        assert refuser not in serving and honest in serving
        # the refuser's pipeline started once per failure it was blamed for, and those are bounded by
        # the backoff: STRIKES_TO_BENCH before the first bench, one per bench after (plus one in flight);
        # the honest pipeline started once
        assert state["pipelines_started"] <= 1 + STRIKES_TO_BENCH + bench["benches"], state
        [shown] = [p for p in dashboard["providers"] if p["peer"] == refuser]
        assert shown["state"] == "benched" and said in shown["benched"]["reason"]
    finally:
        pool.stop()
