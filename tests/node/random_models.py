"""Small randomly initialised Llama-family models written the way Hugging Face writes them."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

FAMILIES = {
    # GQA 8:2, untied head, Llama 3.1 RoPE scaling
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        tie_word_embeddings=False)),
    # GQA 8:2, q/k/v biases, tied embeddings
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    # GQA 8:4, linear RoPE scaling
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        num_key_value_heads=4, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        tie_word_embeddings=False)),
}


def make_random_model(family: str, path: Path, n_layers: int = 6, seed: int = 0):
    config_cls, model_cls, extra = FAMILIES[family]
    kwargs = dict(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=n_layers,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
        # a wide init spreads the logits, so greedy choices are far from ties
        initializer_range=0.2, bos_token_id=1, eos_token_id=None, pad_token_id=0,
    )
    kwargs.update(extra)
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):  # transformers initialises biases to zero; make them count
                param.normal_(0.0, 0.2)
    # small shards, so that loading goes through model.safetensors.index.json
    model.save_pretrained(path, max_shard_size="200KB")
    return model
