"""A shard is layers [start, end) of a model; this module knows which tensors it needs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from node.config import ModelConfig, ModelError


@dataclass(frozen=True)
class Shard:
    model_id: str
    start: int
    end: int
    n_layers: int

    def __post_init__(self):
        if not (0 <= self.start < self.end <= self.n_layers):
            raise ModelError(
                f"layer range [{self.start}, {self.end}) is out of bounds for a model of {self.n_layers} layers"
            )

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.n_layers

    @property
    def n_shard_layers(self) -> int:
        return self.end - self.start


def split_layers(n_layers: int, weights: list[float]) -> list[tuple[int, int]]:
    """Contiguous layer ranges proportional to `weights`, each at least one layer."""
    if not weights or len(weights) > n_layers or min(weights) <= 0:
        raise ValueError(f"cannot split {n_layers} layers by {weights}")
    total = sum(weights)
    bounds, acc = [0], 0.0
    for i, w in enumerate(weights[:-1]):
        acc += w
        cut = round(n_layers * acc / total)
        # keep every range non-empty and leave a layer for each later stage
        cut = max(bounds[-1] + 1, min(cut, n_layers - (len(weights) - 1 - i)))
        bounds.append(cut)
    bounds.append(n_layers)
    return list(zip(bounds, bounds[1:]))


LAYER_TENSORS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


def tensor_names(config: ModelConfig, shard: Shard) -> list[str]:
    """Names of the checkpoint tensors that `shard` needs, and no others."""
    names = []
    if shard.is_first:
        names.append(EMBED)
    for layer in range(shard.start, shard.end):
        prefix = f"model.layers.{layer}."
        names += [prefix + t for t in LAYER_TENSORS]
        if config.qkv_bias:
            names += [prefix + f"self_attn.{p}_proj.bias" for p in "qkv"]
        if config.o_bias:
            names.append(prefix + "self_attn.o_proj.bias")
        if config.mlp_bias:
            names += [prefix + f"mlp.{p}_proj.bias" for p in ("gate", "up", "down")]
    if shard.is_last:
        names.append(FINAL_NORM)
        names.append(EMBED if config.tie_word_embeddings else LM_HEAD)
    return names


class Checkpoint:
    """The safetensors files of a model directory, read tensor by tensor (memory-mapped)."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise ModelError(f"{index}: unreadable index: {exc!r}") from exc
            self.file_of = {name: self.model_dir / f for name, f in weight_map.items()}
        else:
            files = sorted(self.model_dir.glob("*.safetensors"))
            if not files:
                raise ModelError(f"{self.model_dir}: no *.safetensors weights")
            self.file_of = {}
            for f in files:
                with _open(f) as handle:
                    self.file_of.update({name: f for name in handle.keys()})

    def total_bytes(self) -> int:
        """Parameter bytes of the whole checkpoint, from the file headers alone."""
        total = 0
        for f in sorted(set(self.file_of.values())):
            with _open(f) as handle:
                for name in handle.keys():
                    sl = handle.get_slice(name)
                    total += _numel(sl.get_shape()) * _itemsize(sl.get_dtype())
        return total

    def load(self, names: list[str], dtype: torch.dtype, device: str | torch.device,
             on_tensor=None) -> dict[str, torch.Tensor]:
        """The named tensors in `dtype` on `device`; `on_tensor(name)` is called after each one."""
        missing = [n for n in names if n not in self.file_of]
        if missing:
            raise ModelError(f"{self.model_dir}: checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.file_of[n], []).append(n)
        tensors = {}
        for f, file_names in by_file.items():
            with _open(f) as handle:
                for n in file_names:
                    tensors[n] = handle.get_tensor(n).to(device=device, dtype=dtype)
                    if on_tensor:
                        on_tensor(n)
        return tensors


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError for corrupt headers
        raise ModelError(f"{path}: not a readable safetensors file: {exc}") from exc


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _itemsize(dtype: str) -> int:
    return _DTYPE_BYTES[dtype]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
