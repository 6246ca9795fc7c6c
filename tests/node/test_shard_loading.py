"""A shard loads only its own tensors, and bad models or ranges fail with clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from node.config import ModelConfig, ModelError
from node.runtime import ShardRuntime
from node.shard import Checkpoint, Shard, split_layers, tensor_names
from tests.node.random_models import make_random_model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_random_model("llama", path)
    return path


def shard_of(path, start, end):
    return Shard("m", start, end, ModelConfig.load(path).n_layers)


def test_half_model_shard_holds_at_most_60_percent_of_the_parameters(default_model_dir):
    full_bytes = Checkpoint(default_model_dir).total_bytes()
    n = ModelConfig.load(default_model_dir).n_layers
    for start, end in [(0, n // 2), (n // 2, n)]:
        runtime = ShardRuntime(default_model_dir, Shard("m", start, end, n), max_sessions=1, max_seq_len=16)
        held = runtime.model.parameter_bytes()
        print(f"shard [{start},{end}): {held / 2**20:.1f} MiB of {full_bytes / 2**20:.1f} MiB = {held / full_bytes:.1%}")
        # Half the layers plus the 28M-parameter embedding (stage 0) or the tied head (last stage).
        assert held <= 0.61 * full_bytes


def test_shard_reads_only_the_tensors_of_its_layers(llama_dir):
    config = ModelConfig.load(llama_dir)
    runtime = ShardRuntime(llama_dir, shard_of(llama_dir, 2, 4))
    assert all(".layers.2." in n or ".layers.3." in n for n in runtime.loaded_tensors)
    assert len(runtime.loaded_tensors) == 2 * 9  # 9 tensors per layer, no embedding, no head
    first = tensor_names(config, Shard("m", 0, 1, config.n_layers))
    last = tensor_names(config, Shard("m", config.n_layers - 1, config.n_layers, config.n_layers))
    assert "model.embed_tokens.weight" in first and "lm_head.weight" not in first
    assert {"model.norm.weight", "lm_head.weight"} <= set(last) and "model.embed_tokens.weight" not in last


def test_parameter_bytes_equal_the_checkpoint_bytes_of_the_layers(llama_dir):
    whole = ShardRuntime(llama_dir, shard_of(llama_dir, 0, 6)).model.parameter_bytes()
    assert whole == Checkpoint(llama_dir).total_bytes()
    parts = sum(ShardRuntime(llama_dir, shard_of(llama_dir, a, b)).model.parameter_bytes()
                for a, b in [(0, 1), (1, 4), (4, 6)])
    assert parts == whole


@pytest.mark.parametrize("start,end", [(-1, 2), (2, 2), (4, 3), (0, 7)])
def test_layer_range_out_of_bounds_is_refused(start, end):
    with pytest.raises(ModelError, match="out of bounds"):
        Shard("m", start, end, 6)


def test_shard_layer_count_must_match_the_model(llama_dir):
    with pytest.raises(ModelError, match="model has 6"):
        ShardRuntime(llama_dir, Shard("m", 0, 2, 8))


def test_missing_directory_or_config(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        ModelConfig.load(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="unreadable config"):
        ModelConfig.load(tmp_path)


def test_unsupported_architecture_is_named(llama_dir, tmp_path):
    raw = json.loads((llama_dir / "config.json").read_text())
    for arch, message in [("GPT2LMHeadModel", "unsupported architecture"), ("MixtralForCausalLM", "unsupported")]:
        raw["architectures"] = [arch]
        with pytest.raises(ModelError, match=message):
            ModelConfig.from_dict(raw)
    raw["architectures"] = ["LlamaForCausalLM"]
    raw["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    with pytest.raises(ModelError, match="unsupported RoPE scaling 'yarn'"):
        ModelConfig.from_dict(raw)
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    raw["num_key_value_heads"] = 3
    with pytest.raises(ModelError, match="not a multiple"):
        ModelConfig.from_dict(raw)
    del raw["hidden_size"]
    with pytest.raises(ModelError, match="bad config.json"):
        ModelConfig.from_dict(raw)


def test_missing_or_corrupt_weights(llama_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    victim = index["weight_map"]["model.layers.3.mlp.up_proj.weight"]
    (broken / victim).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        ShardRuntime(broken, shard_of(broken, 3, 4))
    ShardRuntime(broken, shard_of(broken, 0, 2))  # a shard that does not need that file still loads

    del index["weight_map"]["model.layers.5.mlp.up_proj.weight"]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="lacks 1 tensors, e.g. model.layers.5.mlp.up_proj.weight"):
        ShardRuntime(broken, shard_of(broken, 5, 6))

    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(llama_dir / "config.json", empty)
    with pytest.raises(ModelError, match="no \\*.safetensors weights"):
        ShardRuntime(empty, shard_of(empty, 0, 1))


def test_split_layers_gives_contiguous_nonempty_ranges():
    assert split_layers(30, [3, 2, 1]) == [(0, 15), (15, 25), (25, 30)]
    assert split_layers(3, [100, 1, 1]) == [(0, 1), (1, 2), (2, 3)]
    for weights in ([1.0], [1, 1, 1, 1], [5, 0.1, 0.1, 5]):
        ranges = split_layers(12, weights)
        assert ranges[0][0] == 0 and ranges[-1][1] == 12
        assert all(a < b for a, b in ranges) and all(r[1] == s[0] for r, s in zip(ranges, ranges[1:]))
    with pytest.raises(ValueError):
        split_layers(2, [1, 1, 1])


def test_rope_tables_agree_with_transformers(llama_dir):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from node.layers import rope_tables

    for params in [
        {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    ]:
        hf = LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=256, rope_parameters=params)
        inv_freq, _ = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf, "cpu")
        ours = ModelConfig.from_dict({**hf.to_dict(), "architectures": ["LlamaForCausalLM"]})
        cos, _ = rope_tables(ours, 256)
        expected = torch.cat([torch.outer(torch.arange(256).float(), inv_freq)] * 2, dim=-1).cos()
        torch.testing.assert_close(cos, expected)
