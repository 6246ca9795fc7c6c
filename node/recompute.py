"""Re-execution of one stage for an audit: its layers over all of its inputs in ONE prefill pass.

The stage served the request as a prefill (maybe in chunks) and one-row decode steps; the
verifier feeds the concatenation of those inputs (token ids on stage 0, hidden states after) to a
fresh session and gets the hidden state of every position, plus the logits of every position on
the last stage. Runtimes are kept per (shard, dtype), a few at a time.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from node.config import ModelConfig
from node.runtime import ShardRuntime
from node.shard import Shard

MIN_SEQ_LEN = 256  # smallest KV cache a runtime is opened with; grown by powers of two
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Recomputer:
    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu", max_cached: int = 2):
        if max_cached < 1:
            raise ValueError("max_cached must be >= 1")
        self.model_dir, self.device, self.max_cached = Path(model_dir), torch.device(device), max_cached
        self.config = ModelConfig.load(self.model_dir)
        self._runtimes: OrderedDict[tuple[Shard, torch.dtype], ShardRuntime] = OrderedDict()
        self._lock = threading.Lock()
        self._ids = itertools.count()

    def run(self, shard: Shard, dtype: torch.dtype, stage_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden (T, D), logits (T, V) on the last stage else None) of `shard` over `stage_input`:
        token ids (T,) on stage 0, hidden states (T, D) after. `dtype` is that of the claimed output.
        Hidden states come back before the final norm, on the CPU, in `dtype`."""
        self._check(shard, dtype, stage_input)
        T = stage_input.shape[0]
        with self._lock:
            runtime = self._runtime(shard, dtype, T)
            sid = f"audit-{next(self._ids)}"
            try:
                out = runtime.prefill(sid, stage_input, all_positions=True)
                if shard.is_last:
                    hidden, logits = runtime.last_hidden.clone(), out.float()  # (T, D), (T, V)
                else:
                    hidden, logits = out, None
            finally:
                runtime.close(sid)
        return hidden.cpu(), None if logits is None else logits.cpu()

    def _check(self, shard: Shard, dtype: torch.dtype, x: torch.Tensor) -> None:
        if shard.n_layers != self.config.n_layers:
            raise ValueError(f"shard {shard} does not fit a model of {self.config.n_layers} layers")
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"cannot recompute in {dtype}")
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"stage input must be a tensor, got {type(x).__name__}")
        if shard.is_first:
            if x.dim() != 1 or x.dtype not in (torch.int64, torch.int32) or x.numel() == 0:
                raise ValueError(f"stage 0 input must be token ids (T,), got {x.dtype} {tuple(x.shape)}")
            if int(x.min()) < 0 or int(x.max()) >= self.config.vocab_size:
                raise ValueError(f"token id out of range [0, {self.config.vocab_size})")
        elif (x.dim() != 2 or x.shape[0] == 0 or x.shape[1] != self.config.hidden_size
              or not x.is_floating_point()):
            raise ValueError(f"stage input must be hidden states (T, {self.config.hidden_size}), "
                             f"got {x.dtype} {tuple(x.shape)}")
        if x.shape[0] > self.config.max_context_tokens:
            raise ValueError(f"{x.shape[0]} positions exceed the model's context of {self.config.max_context_tokens}")

    def _runtime(self, shard: Shard, dtype: torch.dtype, n_tokens: int) -> ShardRuntime:
        key = (shard, dtype)
        runtime = self._runtimes.get(key)
        if runtime is not None and runtime.max_seq_len >= n_tokens:
            self._runtimes.move_to_end(key)
            return runtime
        seq_len = MIN_SEQ_LEN
        while seq_len < n_tokens:
            seq_len *= 2
        seq_len = min(seq_len, self.config.max_context_tokens)
        self._runtimes.pop(key, None)
        runtime = ShardRuntime(self.model_dir, shard, device=self.device, dtype=dtype, max_sessions=1,
                               max_seq_len=seq_len, cuda_graphs=False)
        self._runtimes[key] = runtime
        while len(self._runtimes) > self.max_cached:
            self._runtimes.popitem(last=False)
        return runtime
