"""The layer trace a stage commits to (the receipt's `layers_hash`).

For a stage of L layers the trace is (2L + 1, T, D) in its serving dtype: row 0 its input (stage 0:
the embeddings), then for each layer i the attention's update a_i and the MLP's update m_i, what
each adds to the residual stream. Everything else follows by the residual adds, rounded as every
serving path rounds them (one rounding of the sum of two values of the serving dtype):

    x_0 = trace[0],   h_i = x_i + a_i,   x_{i+1} = h_i + m_i

so x_L is what the stage sent. Why the updates and not the boundaries x_i: deep in a model the
stream is ~100x a layer's update, and a boundary rounded to bfloat16 keeps the update to ~2^-9 of
the stream only: a 10^-3 change of the weights vanishes in that rounding, and honest kernels that
round the sum differently differ by ulps of the stream. Committed at its own scale, each update is
checked at its own resolution (verification/layer_compare.py).
"""

from __future__ import annotations

import torch


def n_trace_rows(n_layers: int) -> int:
    return 2 * n_layers + 1


def residuals(trace: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stream a trace implies: (boundaries (L + 1, T, D): each layer's input, then the last
    output; mids (L, T, D): each layer's stream after its attention, the MLP's input)."""
    if trace.dim() != 3 or trace.shape[0] % 2 != 1:
        raise ValueError(f"a layer trace is (2L + 1, T, D), got {tuple(trace.shape)}")
    x, boundaries, mids = trace[0], [trace[0]], []
    for i in range(trace.shape[0] // 2):
        h = x + trace[1 + 2 * i]
        x = h + trace[2 + 2 * i]
        mids.append(h)
        boundaries.append(x)
    empty = trace[:0]
    return torch.stack(boundaries), torch.stack(mids) if mids else empty
