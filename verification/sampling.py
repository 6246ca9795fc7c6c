"""Token choice on the last stage, reproducible by anyone who knows the request's seed.

Sampling is Gumbel-max: token = argmax(logits / temperature + g), where the Gumbel noise g is
drawn from a CPU generator seeded by (request seed, position). The noise does not depend on the
device or on the batch, so a verifier can recompute the exact choice from the logits.
"""

from __future__ import annotations

import hashlib

import torch

from verification.argmax import greedy
from verification.threads import worker_threads
from wire.messages import SamplingParams


def gumbel_noise(seed: int, position: int, vocab_size: int) -> torch.Tensor:
    digest = hashlib.sha256(f"meshpool-sample:{seed}:{position}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    uniform = torch.rand(vocab_size, generator=generator, dtype=torch.float64).clamp_(1e-20, 1.0 - 1e-16)
    return -torch.log(-torch.log(uniform))


def sample(logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> list[int]:
    """One token per row of logits (B, V); `positions` are the positions of the tokens chosen.

    Rows with a temperature are scored on the CPU in float64, wherever the logits are (the noise is
    drawn there, and a verifier must reach the same choice on any device); their noise is drawn on
    other threads (the draws release the GIL) while a GPU still computes the logits."""
    hot = [i for i, p in enumerate(params) if p.temperature != 0.0]
    vocab = logits.shape[-1]
    noise = {i: worker_threads().submit(gumbel_noise, params[i].seed, positions[i], vocab) for i in hot}
    tokens = greedy(logits).tolist()
    if hot:
        rows = logits[hot].to("cpu", torch.float64)
        for row, i in zip(rows, hot):
            scores = row / params[i].temperature
            if params[i].top_p < 1.0:
                scores = _top_p_filter(scores, params[i].top_p)
            tokens[i] = int((scores + noise[i].result()).argmax())
    return tokens


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    sorted_scores, order = scores.sort(descending=True)
    cumulative = sorted_scores.softmax(-1).cumsum(-1)
    drop = cumulative - sorted_scores.softmax(-1) >= top_p  # mass before this token already enough
    filtered = scores.clone()
    filtered[order[drop]] = float("-inf")
    return filtered
