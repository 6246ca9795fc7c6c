"""Model shapes the planner reasons about: parameter, byte and FLOP counts per layer, no weights."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-family decoder that the cost model needs.

    `bytes_per_param` may be fractional (4-bit weights: about 0.5625 with scales);
    KV cache and activations are kept in `activation_bytes` per element (bf16: 2).
    """

    name: str
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    bytes_per_param: float = 2.0
    tied_embeddings: bool = False
    activation_bytes: int = 2

    def __post_init__(self):
        sizes = (self.n_layers, self.hidden, self.intermediate, self.n_heads, self.n_kv_heads, self.head_dim, self.vocab)
        if min(sizes) <= 0 or self.bytes_per_param <= 0 or self.activation_bytes <= 0:
            raise ValueError(f"{self.name}: model sizes must be positive, got {self}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.name}: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    # --- parameters -------------------------------------------------------------------------
    @property
    def layer_params(self) -> int:
        q_out = self.n_heads * self.head_dim
        kv_out = self.n_kv_heads * self.head_dim
        attention = self.hidden * q_out + 2 * self.hidden * kv_out + q_out * self.hidden
        mlp = 3 * self.hidden * self.intermediate  # gate, up, down
        norms = 2 * self.hidden
        return attention + mlp + norms

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        """Final norm + LM head (with tied embeddings the same matrix as the embedding)."""
        return self.hidden + self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        head = self.hidden if self.tied_embeddings else self.head_params
        return self.n_layers * self.layer_params + self.embedding_params + head

    # --- bytes ------------------------------------------------------------------------------
    @property
    def layer_weight_bytes(self) -> float:
        return self.layer_params * self.bytes_per_param

    @property
    def embedding_bytes(self) -> float:
        return self.embedding_params * self.bytes_per_param

    @property
    def head_bytes(self) -> float:
        return self.head_params * self.bytes_per_param

    @property
    def total_weight_bytes(self) -> float:
        return self.total_params * self.bytes_per_param

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """K and V of one token in one layer."""
        return 2 * self.n_kv_heads * self.head_dim * self.activation_bytes

    # --- FLOPs per token (one decode step of one session) -------------------------------------
    @property
    def layer_matmul_flops(self) -> int:
        return 2 * self.layer_params

    def layer_attention_flops(self, context_tokens: int) -> int:
        """Q·Kᵀ and P·V against `context_tokens` cached positions, all heads."""
        return 4 * self.n_heads * self.head_dim * context_tokens

    @property
    def head_flops(self) -> int:
        return 2 * self.vocab * self.hidden

    @classmethod
    def from_hf_config(cls, raw: dict, name: str = "model", bytes_per_param: float = 2.0,
                       activation_bytes: int = 2) -> "ModelShape":
        """Shape from a Hugging Face config.json dict (Llama, Mistral, Qwen2)."""
        hidden = int(raw["hidden_size"])
        n_heads = int(raw["num_attention_heads"])
        return cls(
            name=name,
            n_layers=int(raw["num_hidden_layers"]),
            hidden=hidden,
            intermediate=int(raw["intermediate_size"]),
            n_heads=n_heads,
            n_kv_heads=int(raw.get("num_key_value_heads") or n_heads),
            head_dim=int(raw.get("head_dim") or hidden // n_heads),
            vocab=int(raw["vocab_size"]),
            bytes_per_param=bytes_per_param,
            tied_embeddings=bool(raw.get("tie_word_embeddings", False)),
            activation_bytes=activation_bytes,
        )


# Published shapes (config.json of the Hugging Face releases), bf16 weights.
LLAMA3_8B = ModelShape("Llama-3-8B", n_layers=32, hidden=4096, intermediate=14336, n_heads=32, n_kv_heads=8,
                       head_dim=128, vocab=128256)
LLAMA3_70B = ModelShape("Llama-3-70B", n_layers=80, hidden=8192, intermediate=28672, n_heads=64, n_kv_heads=8,
                        head_dim=128, vocab=128256)
SMOLLM2_135M = ModelShape("SmolLM2-135M", n_layers=30, hidden=576, intermediate=1536, n_heads=9, n_kv_heads=3,
                          head_dim=64, vocab=49152, tied_embeddings=True)
