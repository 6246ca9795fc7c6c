"""Shards chained in one process: stage 0 -> ... -> last stage -> sampler, the data path of the
pool without the network. Used by the demo, the tests and the benchmarks as the reference chain."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from node.config import ModelConfig
from node.models import model_id_of
from node.runtime import ShardRuntime
from wire.messages import SamplingParams
from verification.sampling import sample
from node.shard import Shard

_session_ids = itertools.count()


class LocalPipeline:
    def __init__(self, stages: list[ShardRuntime]):
        if not stages or not stages[0].shard.is_first or not stages[-1].shard.is_last:
            raise ValueError("a pipeline runs from layer 0 to the last layer")
        for a, b in zip(stages, stages[1:]):
            if a.shard.end != b.shard.start:
                raise ValueError(f"stages {a.shard} and {b.shard} are not contiguous")
        self.stages = stages

    @classmethod
    def load(cls, model_dir: str | Path, ranges: list[tuple[int, int]], on_stage_loaded=None,
             **runtime_kwargs) -> "LocalPipeline":
        config = ModelConfig.load(model_dir)
        stages = []
        for start, end in ranges:
            shard = Shard(model_id_of(model_dir), start, end, config.n_layers)
            stages.append(ShardRuntime(model_dir, shard, **runtime_kwargs))
            if on_stage_loaded:
                on_stage_loaded()
        return cls(stages)

    def prefill(self, session_id: str, token_ids: list[int]) -> torch.Tensor:
        x = torch.tensor(token_ids, dtype=torch.int64)
        for stage in self.stages:
            x = stage.prefill(session_id, x)
        return x  # logits (1, V) of the last position

    def decode(self, session_ids: list[str], token_ids: list[int]) -> torch.Tensor:
        xs = [torch.tensor([t]) for t in token_ids]
        for stage in self.stages:
            out = stage.decode(list(zip(session_ids, xs)))
            xs = list(out[:, None].unbind(0))  # one (1, D) row per session
        return out  # logits (B, V)

    def close(self, session_id: str) -> None:
        for stage in self.stages:
            stage.close(session_id)

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        params: list[SamplingParams] | None = None,
        stop_ids: tuple[int, ...] = (),
        on_token=None,
    ) -> list[list[int]]:
        """New tokens for each prompt; prompts are prefilled one by one, then decoded together.
        `on_token(prompt_index, token)` is called as each token is chosen."""
        params = params or [SamplingParams()] * len(prompts)
        sids = [f"local-{next(_session_ids)}" for _ in prompts]
        outputs: list[list[int]] = [[] for _ in prompts]
        try:
            live = []
            for i, (sid, prompt) in enumerate(zip(sids, prompts)):
                logits = self.prefill(sid, prompt)
                outputs[i] += sample(logits, [params[i]], [len(prompt)])
                if on_token:
                    on_token(i, outputs[i][-1])
                if outputs[i][-1] not in stop_ids and max_new_tokens > 1:
                    live.append(i)
            while live:
                logits = self.decode([sids[i] for i in live], [outputs[i][-1] for i in live])
                positions = [len(prompts[i]) + len(outputs[i]) for i in live]
                for i, token in zip(live, sample(logits, [params[i] for i in live], positions)):
                    outputs[i].append(token)
                    if on_token:
                        on_token(i, token)
                live = [i for i in live if outputs[i][-1] not in stop_ids and len(outputs[i]) < max_new_tokens]
        finally:
            for sid in sids:
                self.close(sid)
        return outputs
