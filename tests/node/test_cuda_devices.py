"""A shard on any GPU of a host: kernels, graphs and caches on the shard's own device, whichever
device is current in the thread that runs its steps (transport worker threads start on cuda:0).

On a host with two GPUs:
    python -m pytest tests/node/test_cuda_devices.py -q
"""

from __future__ import annotations

import json
import threading

import pytest
import torch

from node.config import ModelConfig
from node.device_scope import device_scope
from node.runtime import ShardRuntime
from node.shard import Shard
from tests.node.random_models import make_random_model

N_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
one_gpu = pytest.mark.skipif(N_GPUS < 1, reason="needs a CUDA device")
two_gpus = pytest.mark.skipif(N_GPUS < 2, reason="needs two CUDA devices")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_random_model("llama", path, n_layers=4)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 1024
    (path / "config.json").write_text(json.dumps(config))
    return path


def _in_fresh_thread(fn):
    """fn() in a new thread, as a transport worker runs a step: its current device is cuda:0."""
    result = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def _generate(model_dir, devices: tuple[str, str], cuda_graphs: bool, n_tokens: int = 8) -> list[list[int]]:
    """Greedy tokens of two prompts through a 2-stage chain, stage i on devices[i]; built and stepped in
    fresh threads, each a different one, like a provider's handlers."""
    n_layers = ModelConfig.load(model_dir).n_layers
    chain = [_in_fresh_thread(lambda a=a, b=b, d=d: ShardRuntime(
        model_dir, Shard("m", a, b, n_layers), device=d, dtype=torch.float32, max_sessions=4, max_seq_len=256,
        cuda_graphs=cuda_graphs)) for (a, b), d in zip([(0, 2), (2, n_layers)], devices)]
    for stage, device in zip(chain, devices):
        assert stage.cache.k.device == torch.device(device)
        assert all(p.device == torch.device(device) for p in stage.model.parameters())
        assert (stage.graphs is not None) == cuda_graphs
    prompts = [[5, 6, 7], list(range(1, 40))]
    tokens = []
    for i, p in enumerate(prompts):
        x = torch.tensor(p)
        for stage in chain:
            x = _in_fresh_thread(lambda stage=stage, x=x: stage.prefill(f"s{i}", x))
        tokens.append([int(x.argmax(-1))])
    for _ in range(n_tokens):
        xs = [torch.tensor([t[-1]]) for t in tokens]
        for stage in chain:
            out = _in_fresh_thread(lambda stage=stage, xs=xs: stage.decode([(f"s{i}", x) for i, x in enumerate(xs)]))
            xs = list(out[:, None].unbind(0))
        for t, nxt in zip(tokens, out.argmax(-1).tolist()):
            t.append(nxt)
    return tokens


@pytest.mark.parametrize("devices", [
    pytest.param(("cuda:0", "cuda:0"), marks=one_gpu, id="both-on-cuda0"),
    pytest.param(("cuda:1", "cuda:1"), marks=two_gpus, id="both-on-cuda1"),
    pytest.param(("cuda:0", "cuda:1"), marks=two_gpus, id="across-gpus"),
])
def test_graphed_decode_on_any_gpu_matches_the_cpu(llama_dir, devices):
    """Fused Triton kernels and CUDA graphs on the shard's device give the CPU's greedy tokens."""
    want = _generate(llama_dir, ("cpu", "cpu"), cuda_graphs=False)
    assert _generate(llama_dir, devices, cuda_graphs=True) == want
    assert _generate(llama_dir, devices, cuda_graphs=False) == want


@two_gpus
def test_a_step_leaves_the_callers_current_device_alone(llama_dir):
    n_layers = ModelConfig.load(llama_dir).n_layers
    runtime = ShardRuntime(llama_dir, Shard("m", 0, n_layers, n_layers), device="cuda:1", dtype=torch.float32,
                           max_sessions=2, max_seq_len=64)
    torch.cuda.set_device(0)
    runtime.prefill("s", torch.tensor([1, 2, 3]))
    runtime.decode([("s", torch.tensor([4]))])
    assert torch.cuda.current_device() == 0
    with device_scope("cpu"):  # no CUDA device is entered for the CPU
        assert torch.cuda.current_device() == 0
