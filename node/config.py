"""The model families the shard runtime runs, read from a Hugging Face config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class ModelError(ValueError):
    """A model directory that cannot be served: missing files, bad config, unsupported family."""


# architecture -> whether q/k/v projections carry a bias regardless of `attention_bias`
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": False,
    "MistralForCausalLM": False,
    "Qwen2ForCausalLM": True,
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    # Mistral/Qwen2 may limit attention to a window; the runtime caps its context there.
    sliding_window: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def max_context_tokens(self) -> int:
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        architectures = raw.get("architectures") or []
        arch = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ModelError(
                f"unsupported architecture {architectures or raw.get('model_type')!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ModelError(f"unsupported activation {act!r}; the Llama family uses 'silu'")
        try:
            hidden = int(raw["hidden_size"])
            n_heads = int(raw["num_attention_heads"])
            n_kv_heads = int(raw.get("num_key_value_heads") or n_heads)
            head_dim = int(raw.get("head_dim") or hidden // n_heads)
            config = cls(
                architecture=arch,
                n_layers=int(raw["num_hidden_layers"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                n_heads=n_heads,
                n_kv_heads=n_kv_heads,
                head_dim=head_dim,
                vocab_size=int(raw["vocab_size"]),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=_rope_theta(raw),
                rope_scaling=_rope_scaling(raw),
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                qkv_bias=SUPPORTED_ARCHITECTURES[arch] or bool(raw.get("attention_bias", False)),
                o_bias=(not SUPPORTED_ARCHITECTURES[arch]) and bool(raw.get("attention_bias", False)),
                mlp_bias=bool(raw.get("mlp_bias", False)),
                sliding_window=_sliding_window(raw),
                eos_token_ids=_eos_ids(raw.get("eos_token_id")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ModelError):
                raise
            raise ModelError(f"bad config.json: {exc!r}") from exc
        if min(config.n_layers, hidden, n_heads, n_kv_heads, head_dim, config.vocab_size) <= 0:
            raise ModelError("bad config.json: sizes must be positive")
        if n_heads % n_kv_heads:
            raise ModelError(f"num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv_heads}")
        return config

    @classmethod
    def load(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelError(f"{model_dir}: no config.json (expected a Hugging Face-format model directory)")
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"{path}: unreadable config: {exc}") from exc
        if not isinstance(raw, dict):
            raise ModelError(f"{path}: config is not a JSON object")
        return cls.from_dict(raw)


def _rope_params(raw: dict) -> dict:
    # transformers 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`.
    params = dict(raw.get("rope_scaling") or {})
    params.update(raw.get("rope_parameters") or {})
    return params


def _rope_theta(raw: dict) -> float:
    return float(_rope_params(raw).get("rope_theta", raw.get("rope_theta", 10000.0)))


def _rope_scaling(raw: dict) -> RopeScaling:
    params = _rope_params(raw)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelError(f"unsupported RoPE scaling {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return RopeScaling()
    return RopeScaling(
        rope_type=rope_type,
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))
        ),
    )


def _sliding_window(raw: dict) -> int | None:
    window = raw.get("sliding_window")
    if window is None or raw.get("use_sliding_window") is False:
        return None
    return int(window)


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
