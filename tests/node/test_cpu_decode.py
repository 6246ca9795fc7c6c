"""The CPU decode path's layout and thread choices: same values, the layout and threads intended."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from node.config import ModelConfig
from node.cpu_threads import SINGLE_THREAD_MAX_ROWS, threads_for_step
from node.layers import HUGE_PAGE_BYTES, DecoderLayer, input_major_
from node.runtime import ShardRuntime
from node.shard import Shard
from tests.node.random_models import make_random_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_random_model("llama", path, n_layers=2)
    return path


def full_runtime(model_dir, **kwargs):
    n = ModelConfig.load(model_dir).n_layers
    return ShardRuntime(model_dir, Shard("m", 0, n, n), **kwargs)


def test_input_major_keeps_values_and_loading_keeps_the_layout():
    torch.manual_seed(0)
    linears = [nn.Linear(24, 40, bias=False), nn.Linear(40, 24, bias=False), nn.Linear(24, 7, bias=False)]
    before = [m.weight.detach().clone() for m in linears]
    x = torch.randn(3, 24)
    expected = linears[1](linears[0](x))
    input_major_([m.weight for m in linears] + [linears[0].weight])  # listed twice: laid out once
    for m, old in zip(linears, before):
        out_features, in_features = old.shape
        assert m.weight.shape == old.shape and m.weight.stride() == (1, out_features)
        assert torch.equal(m.weight, old)
    # one buffer, starting on a huge-page boundary, the matrices one after another
    assert linears[0].weight.data_ptr() % HUGE_PAGE_BYTES == 0
    assert linears[0].weight.untyped_storage().data_ptr() == linears[2].weight.untyped_storage().data_ptr()
    torch.testing.assert_close(linears[1](linears[0](x)), expected)
    with torch.no_grad():
        linears[2].weight.copy_(torch.arange(7 * 24.0).view(7, 24))  # as loading does
    assert linears[2].weight.stride() == (1, 7) and linears[2].weight[3, 5] == 3 * 24 + 5
    with pytest.raises(ValueError, match="one dtype"):
        input_major_([nn.Linear(4, 4).weight, nn.Linear(4, 4).to(torch.float64).weight])


def test_cpu_runtime_weights_are_input_major(model_dir):
    rt = full_runtime(model_dir, max_sessions=2)
    linears = [m for m in rt.model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(m.weight.stride() == (1, m.weight.shape[0]) for m in linears)
    head = rt.model.head_weight()
    assert head.stride() == (1, head.shape[0])


def test_small_decode_steps_run_on_one_thread_and_restore_the_setting(model_dir, monkeypatch):
    rt = full_runtime(model_dir, max_sessions=SINGLE_THREAD_MAX_ROWS + 2)
    seen = []
    forward = DecoderLayer.forward

    def recording(self, x, *args):
        seen.append((x.shape[0] * x.shape[1], torch.get_num_threads()))
        return forward(self, x, *args)

    monkeypatch.setattr(DecoderLayer, "forward", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        n = SINGLE_THREAD_MAX_ROWS + 1
        for i in range(n):
            rt.prefill(f"s{i}", torch.tensor([5, 6, 7]))
        rt.decode([("s0", torch.tensor([1]))])
        rt.decode([(f"s{i}", torch.tensor([1])) for i in range(n)])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    threads_by_rows = {rows: threads for rows, threads in seen}
    assert threads_by_rows == {3: 2, 1: 1, n: 2}  # prefill and the wide batch keep torch's setting


def test_nested_steps_restore_the_outer_setting():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threads_for_step(1, torch.device("cpu")):
            with threads_for_step(2, torch.device("cpu")):
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with threads_for_step(SINGLE_THREAD_MAX_ROWS + 1, torch.device("cpu")):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
