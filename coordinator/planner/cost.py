"""The cost model: time, memory and link cost of a stage and a pipeline, per decode step.

Compute time of a stage is the provider's fixed time a step plus a roofline: max(bytes read / memory
bandwidth, FLOPs / matmul rate). The fixed part (host work, launches, the output's copy) is measured
(coordinator/measurements.py): 0.25-0.73 ms on an H200 at batch 32, as long as 2-5 of the 8B shape's layers.
Bytes read per step are the stage's weights once (shared by the micro-batch) plus the KV cache of
every session for its context; FLOPs are 2 × params per session plus attention.
Stage 0 holds the embedding (memory only: a lookup reads b rows); the last stage holds the final
norm and LM head, whose matrix is read every step (with tied embeddings it is the embedding
matrix, so a last stage that is not also stage 0 keeps its own copy).
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from typing import Mapping

from coordinator.planner.hardware import COORDINATOR, Links, ProviderSpec
from coordinator.planner.shapes import ModelShape
from coordinator.planner.values import Pipeline, PipelineCost, PlanError, Workload

TOKEN_ID_BYTES = 4  # int32 token ids: coordinator → stage 0 and last stage → coordinator


def served_model(provider: ProviderSpec, model: ModelShape) -> ModelShape:
    """The model as `provider` holds it: weights and KV cache in the precision it serves in, so a
    bfloat16 provider is planned at half a float32 one's bytes in the same pool."""
    return model_in_dtype(model, provider.dtype_bytes)


@lru_cache(maxsize=64)
def model_in_dtype(model: ModelShape, dtype_bytes: int | None) -> ModelShape:
    """The model with weights and KV cache of `dtype_bytes` an element (None: as it is)."""
    if dtype_bytes is None:
        return model
    return replace(model, bytes_per_param=float(dtype_bytes), activation_bytes=dtype_bytes)


def extra_memory_bytes(model: ModelShape, first: bool, last: bool) -> float:
    """Bytes besides the decoder layers: embedding on stage 0, final norm + LM head on the last."""
    extra = model.embedding_bytes if first else 0.0
    if last:
        shared = model.tied_embeddings and first
        extra += model.hidden * model.bytes_per_param if shared else model.head_bytes
    return extra


def layer_memory_bytes(model: ModelShape, sessions: int, context_tokens: int) -> float:
    """One decoder layer's weights plus its KV cache for `sessions` × `context_tokens`."""
    return model.layer_weight_bytes + sessions * context_tokens * model.kv_bytes_per_token_layer


def stage_memory_bytes(model: ModelShape, n_layers: int, first: bool, last: bool, sessions: int,
                       context_tokens: int) -> float:
    return n_layers * layer_memory_bytes(model, sessions, context_tokens) + extra_memory_bytes(model, first, last)


def max_layers(provider: ProviderSpec, model: ModelShape, first: bool, last: bool, sessions: int,
               context_tokens: int) -> int:
    """Most decoder layers `provider` can hold in this role (0 if not even the extras fit)."""
    model = served_model(provider, model)
    room = provider.memory_bytes - extra_memory_bytes(model, first, last)
    if room < 0:
        return 0
    return min(model.n_layers, int(room // layer_memory_bytes(model, sessions, context_tokens)))


def stage_step_bytes_and_flops(model: ModelShape, n_layers: int, first: bool, last: bool, batch: int,
                               context_tokens: int) -> tuple[float, float]:
    """Bytes read and FLOPs of one decode step of `batch` sessions through the stage."""
    kv_read = batch * context_tokens * model.kv_bytes_per_token_layer
    bytes_read = n_layers * (model.layer_weight_bytes + kv_read)
    flops = batch * n_layers * (model.layer_matmul_flops + model.layer_attention_flops(context_tokens))
    if first:
        bytes_read += batch * model.hidden * model.bytes_per_param  # embedding rows looked up
    if last:
        bytes_read += model.head_bytes
        flops += batch * model.head_flops
    return bytes_read, flops


def stage_time_s(provider: ProviderSpec, model: ModelShape, n_layers: int, first: bool, last: bool, batch: int,
                 context_tokens: int) -> float:
    """Time of one decode step of `batch` sessions on `provider`: its fixed time a step and the roofline."""
    model = served_model(provider, model)
    bytes_read, flops = stage_step_bytes_and_flops(model, n_layers, first, last, batch, context_tokens)
    return provider.step_overhead_ms / 1e3 + max(bytes_read / (provider.mem_bandwidth_gb_per_s * 1e9),
                                                 flops / (provider.matmul_tflops * 1e12))


def hop_bytes(model: ModelShape, batch: int, n_stages: int) -> list[float]:
    """Bytes on each hop: token ids in, hidden states between stages, token ids out."""
    activations = batch * model.hidden * model.activation_bytes
    return [batch * TOKEN_ID_BYTES] + [activations] * (n_stages - 1) + [batch * TOKEN_ID_BYTES]


def hop_peers(peer_ids: tuple[str, ...]) -> list[tuple[str, str]]:
    chain = (COORDINATOR, *peer_ids, COORDINATOR)
    return list(zip(chain, chain[1:]))


def link_costs_s(peer_ids: tuple[str, ...], model: ModelShape, batch: int, links: Links) -> tuple[float, float]:
    """(sum of hop times including latency, longest hop transfer time without latency)."""
    total, busiest = 0.0, 0.0
    for (a, b), n_bytes in zip(hop_peers(peer_ids), hop_bytes(model, batch, len(peer_ids))):
        link = links.between(a, b)
        total += link.time_s(n_bytes)
        busiest = max(busiest, link.transfer_s(n_bytes))
    return total, busiest


def pipeline_figures(stage_times_s, link_total_s: float, link_busiest_s: float, batch: int,
                     microbatches: int) -> tuple[float, float, float]:
    """(latency_s, cycle_s, tokens_per_s) of a pipeline.

    Latency is one micro-batch's trip: every stage and every hop. With `microbatches` in flight
    the pipeline emits `batch` tokens every cycle, limited by its slowest stage or link
    (bandwidth), and by the trip itself: each micro-batch needs its previous token back before
    its next step, so a cycle is at least latency / microbatches.
    """
    latency = sum(stage_times_s) + link_total_s
    cycle = max(max(stage_times_s), link_busiest_s, latency / microbatches)
    return latency, cycle, batch / cycle


def evaluate_pipeline(pipeline: Pipeline, providers: Mapping[str, ProviderSpec], model: ModelShape,
                      workload: Workload, links: Links, microbatches: int = 1) -> PipelineCost:
    """Predicted figures of any pipeline (also ones the planner would not build, e.g. baselines)
    with `microbatches` micro-batches of `workload.batch` sessions in flight."""
    stages = pipeline.stages
    if not stages or stages[0].start != 0 or stages[-1].end != model.n_layers:
        raise PlanError(f"pipeline must cover layers [0, {model.n_layers}), got {stages}")
    for a, b in zip(stages, stages[1:]):
        if a.end != b.start:
            raise PlanError(f"stages {a} and {b} are not contiguous")
    if any(s.n_layers < 1 for s in stages):
        raise PlanError(f"every stage needs at least one layer: {stages}")
    if microbatches < 1:
        raise PlanError(f"microbatches must be >= 1, got {microbatches}")
    k, m = len(stages), microbatches
    sessions = workload.batch * m
    times, memories, fits = [], [], True
    for i, stage in enumerate(stages):
        provider = providers[stage.peer_id]
        first, last = i == 0, i == k - 1
        times.append(stage_time_s(provider, model, stage.n_layers, first, last, workload.batch, workload.context_tokens))
        mem = stage_memory_bytes(served_model(provider, model), stage.n_layers, first, last, sessions,
                                 workload.context_tokens)
        memories.append(mem)
        fits = fits and mem <= provider.memory_bytes
    peer_ids = pipeline.peer_ids
    hops = [links.between(a, b).time_s(n) for (a, b), n in zip(hop_peers(peer_ids), hop_bytes(model, workload.batch, k))]
    link_total, link_busiest = link_costs_s(peer_ids, model, workload.batch, links)
    latency, cycle, tokens_per_s = pipeline_figures(times, link_total, link_busiest, workload.batch, m)
    return PipelineCost(stage_times_s=tuple(times), link_times_s=tuple(hops), stage_memory_bytes=tuple(memories),
                        fits_memory=fits, microbatches=m, latency_s=latency, cycle_s=cycle, tokens_per_s=tokens_per_s)
