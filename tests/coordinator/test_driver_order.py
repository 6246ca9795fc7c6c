"""The driver sends a pipeline its next step before it tells anyone about the last one's tokens.

The link here is a real pipeline in this process: StageWorkers over shards of a small random model,
run on a thread of their own as the stages' processes would, answering each step with a Result."""

from __future__ import annotations

import concurrent.futures

import pytest

from coordinator.driver import GenerationRequest, PipelineDriver
from node.config import ModelConfig
from node.runtime import ShardRuntime
from node.shard import Shard
from node.stage import StageWorker
from tests.node.random_models import make_random_model
from wire.messages import Step


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("driver-model")
    make_random_model("llama", path, n_layers=4)
    return path


class InProcessPipeline:
    """A PipelineLink whose stages run here, one step at a time on their own thread; `log` records
    each step sent (with its input tokens) in order with what the driver's observers do."""

    def __init__(self, model_dir, log: list, fail_at_step: int | None = None):
        n_layers = ModelConfig.load(model_dir).n_layers
        self.workers = [StageWorker(ShardRuntime(model_dir, Shard("m", a, b, n_layers)), "p")
                        for a, b in ((0, 2), (2, n_layers))]
        self.log, self.fail_at_step, self.sent = log, fail_at_step, 0
        self.pool = concurrent.futures.ThreadPoolExecutor(1)

    def send(self, step: Step, timeout_s, on_done) -> concurrent.futures.Future:
        self.sent += 1
        self.log.append(("send", step.kind, tuple(step.x.tolist()) if step.kind == "decode" else ()))
        fail = self.sent == self.fail_at_step

        def run():
            if fail:
                raise ConnectionError("stage 1 went away")
            message = step
            for worker in self.workers:
                message = worker.step(message)
            return message

        future = self.pool.submit(run)
        future.add_done_callback(on_done)
        return future

    def close_sessions(self, sessions, requests) -> None:
        pass

    def abort(self, reason: str) -> None:
        pass

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False)


def _request(log: list, n_tokens: int) -> GenerationRequest:
    request = GenerationRequest([5, 6, 7, 8], n_tokens, request_id="r1")
    request.on_token = lambda token: log.append(("token", token, request.done.is_set()))
    request.on_step = lambda *args: log.append(("metrics",))
    return request


def test_the_next_step_leaves_before_the_tokens_are_told(model_dir) -> None:
    log: list = []
    failures: list = []
    driver = PipelineDriver("p", InProcessPipeline(model_dir, log), lambda *a: failures.append(a), max_batch=4)
    request = _request(log, 6)
    driver.start()
    driver.submit(request)
    assert request.done.wait(60) and not failures
    driver.stop()
    told = [e[1] for e in log if e[0] == "token"]
    assert told == request.tokens and len(told) == 6
    assert not any(e[2] for e in log if e[0] == "token")  # every token told before the request was done
    # each decode step carries the token before it: that step was sent before the token was told
    for token in told[:-1]:
        sent = log.index(("send", "decode", (token,)))
        assert sent < log.index(("token", token, False))
    # the prefill's metrics too come after the first decode step left
    first_decode = next(i for i, e in enumerate(log) if e[0] == "send" and e[1] == "decode")
    assert log.index(("metrics",)) > first_decode


def test_a_failed_pipeline_hands_back_requests_with_every_taken_token_told(model_dir) -> None:
    log: list = []
    handed_back: list = []

    def on_failure(pipeline, requests, reason):
        handed_back.append(([list(r.tokens) for r in requests], [e[1] for e in log if e[0] == "token"], reason))

    driver = PipelineDriver("p", InProcessPipeline(model_dir, log, fail_at_step=4), on_failure, max_batch=4)
    request = _request(log, 10)
    driver.start()
    driver.submit(request)
    driver.join(60)
    assert len(handed_back) == 1
    (tokens,), told, reason = handed_back[0]
    assert "stage 1 went away" in reason
    assert len(tokens) == 3 and told == tokens  # three steps answered, all three tokens told before the replay
