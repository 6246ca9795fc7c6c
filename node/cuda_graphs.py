"""A shard's decode step over fused ops, replayed from CUDA graphs.

One graph per (row bucket, attention plan, head rows, decodes only): a batch of B rows runs as the
smallest bucket that holds it, padded with rows that point at a dummy cache slot no session owns. A
decode step has one row a session (RoPE and the cache write then run inside the attention kernel); a
prompt step's rows are its prompts' tokens, each a row that writes its key and value and attends to
its slot's keys up to its own position, and the decodes riding along; on the last stage it wants the
logits of each session's last row only (head rows). Before a replay
the slots, positions and lengths of the batch (and the token ids on stage 0) go to the device in
one copy from pinned memory, and hidden states are concatenated straight into the graph's input
buffer; nothing inside the step waits for the host. Attention reads only the keys below each
row's length, so the cache length costs nothing; the plan only sets how many programs share a
long context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from node.device_scope import on_own_device
from node.fused import Ops, attention_plan, attention_plans


def batch_buckets(max_sessions: int) -> tuple[int, ...]:
    """Powers of two below `max_sessions`, then `max_sessions` itself: 1, 2, 4, 8, 16, 32 for 32."""
    if max_sessions <= 0:
        raise ValueError("max_sessions must be positive")
    buckets, b = [], 1
    while b < max_sessions:
        buckets.append(b)
        b *= 2
    return (*buckets, max_sessions)


# Rows of a prompt step replayed from graphs, at most (beyond a stage's sessions): its eager ops
# cost a GPU stage ~1 ms of host launches a layer, tens of ms a step, while the decodes riding along
# wait; larger steps (long prompts, in chunks of 256 tokens) run eagerly, their work dwarfs the launches
PROMPT_GRAPH_ROWS = 128


def row_buckets(max_sessions: int, max_rows: int) -> tuple[int, ...]:
    """`batch_buckets(max_sessions)`, then powers of two up to `max_rows` (and `max_rows` itself)."""
    buckets = list(batch_buckets(max_sessions))
    b = buckets[-1]
    while b < max_rows:
        b = min(2 * b, max_rows)
        buckets.append(b)
    return tuple(buckets)


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"batch of {n} is over the largest bucket {buckets[-1]}")


def pad_step(slots: list[int], positions: list[int], bucket: int, dummy_slot: int) -> list[list[int]]:
    """[slots, positions, lengths] of a batch padded to `bucket` rows; a padding row writes and
    reads position 0 of the dummy slot only."""
    pad = bucket - len(slots)
    if pad < 0:
        raise ValueError(f"{len(slots)} rows do not fit a bucket of {bucket}")
    return [slots + [dummy_slot] * pad, positions + [0] * pad, [p + 1 for p in positions] + [1] * pad]


def graph_keys(buckets: tuple[int, ...], max_heads: int, has_head: bool,
               max_tokens: int) -> list[tuple[int, tuple[int, int], bool, bool]]:
    """Every (bucket, attention plan, head rows, decodes only) a step can replay: decode steps (up
    to `max_heads` rows, the stage's sessions; no head rows), prompt steps (any bucket; head rows on
    the last stage) and, on the last stage, prompt steps that want every row's logits (up to
    `max_heads` rows: audits, probes), at every context length up to `max_tokens`."""
    keys = []
    for plan in attention_plans(max_tokens):
        for bucket in buckets:
            if bucket <= max_heads:
                keys.append((bucket, plan, False, True))
            if has_head:
                keys.append((bucket, plan, True, False))
            if bucket <= max_heads or not has_head:
                keys.append((bucket, plan, False, False))
    return keys


def segment_bounds(n_layers: int, per_graph: int) -> list[tuple[int, int]]:
    """Layer ranges of the graphs one step is launched as: the first of one layer, so that the
    device starts while the host launches the rest, then `per_graph` layers each."""
    bounds, start = [(0, 1)], 1
    while start < n_layers:
        bounds.append((start, min(start + per_graph, n_layers)))
        start += per_graph
    return bounds


class DecodeStep:
    """One decode token per row through a shard's layers: ids (B,) on stage 0 or hidden (B, D)
    after, to hidden (B, D) or, on the last stage, (logits (B, V), hidden (B, D)). The residual add of each block
    is fused into the next norm; q, k, v and gate/up are one matmul each."""

    def __init__(self, model, cache, cos: torch.Tensor, sin: torch.Tensor, ops: Ops,
                 trace: torch.Tensor | None = None):
        """`trace` (2 n_layers + 1, rows, D): if given, each step writes into it the step's input and
        then every layer's attention and MLP updates, for the stage's commitment to its layer trace
        (verification/trace.py; inside a graph too); a list instead: each step appends them."""
        config = model.config
        self.model, self.ops, self.trace = model, ops, trace
        self.n_layers = len(model.layers)
        self.cos, self.sin = cos.contiguous(), sin.contiguous()  # (T, Dh)
        self.k, self.v = cache.k, cache.v  # (layers, S, Hkv, T, Dh)
        self.n_heads, self.n_kv_heads, self.eps = config.n_heads, config.n_kv_heads, config.rms_norm_eps

    def __call__(self, x, slots, positions, lengths, plan, head_rows=None, decodes_only=False) -> torch.Tensor:
        return self.segment(0, self.n_layers, x, slots, positions, lengths, plan, head_rows, decodes_only)

    def segment(self, start: int, end: int, state, slots, positions, lengths, plan, head_rows=None,
                decodes_only=False):
        """Layers [start, end): from the step's input (start == 0) or the (h, delta) of the
        layers before, to the step's output (end == n_layers) or (h, delta) for the next.
        `head_rows`: on the last stage, the rows whose logits are wanted (default all).
        `decodes_only`: every row is its session's only row (lengths = positions + 1), so each
        row's new key is the last it attends to and one kernel rotates, writes and attends."""
        ops, m = self.ops, self.model
        if start == 0:
            h, delta = (m.embed(state) if m.embed is not None else state), None  # (B, D)
            self._keep(0, h)
        else:
            h, delta = state
        for i in range(start, end):
            layer = m.layers[i]
            attn, mlp = layer.attn, layer.mlp
            h, xn = ops.rms_norm(h, layer.input_norm.weight, self.eps, delta)  # h: layer i's input
            qkv = F.linear(xn, attn.qkv.weight, attn.qkv.bias)  # (B, (H + 2 Hkv) Dh)
            if decodes_only:
                a = ops.rope_attention(qkv, self.cos, self.sin, positions, slots, self.k[i], self.v[i],
                                       self.n_heads, self.n_kv_heads, plan)  # (B, H Dh)
            else:  # a row may attend to keys that other rows of this step write: all written first
                q = ops.rope_write(qkv, self.cos, self.sin, positions, slots, self.k[i], self.v[i],
                                   self.n_heads, self.n_kv_heads)  # (B, H, Dh)
                a = ops.attention(q, self.k[i], self.v[i], slots, lengths, plan)  # (B, H Dh)
            delta = self._linear_kept(1 + 2 * i, a, attn.o.weight, attn.o.bias)
            h, xn = ops.rms_norm(h, layer.post_attn_norm.weight, self.eps, delta)
            gate_up = F.linear(xn, mlp.gate_up.weight, mlp.gate_up.bias)  # (B, 2 I)
            delta = self._linear_kept(2 + 2 * i, ops.silu_mul(gate_up), mlp.down.weight, mlp.down.bias)
        if end < self.n_layers:
            return h, delta
        if m.norm is None:
            return h + delta
        h, xn = ops.rms_norm(h, m.norm.weight, self.eps, delta)
        if head_rows is not None:
            xn = xn[head_rows]
        return F.linear(xn, m.head_weight()), h  # logits (B, V) and the hidden states behind them

    def _linear_kept(self, row: int, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x W^T (+ bias), kept as trace row `row`. Into a trace tensor the product is written in place:
        a copy after it was one more kernel twice a layer (64 a step of the 8B shape's 32 layers), the
        same product as F.linear's (one cuBLAS call either way)."""
        if isinstance(self.trace, torch.Tensor) and bias is None:
            return torch.mm(x, weight.t(), out=self.trace[row, :x.shape[0]])
        out = F.linear(x, weight, bias)
        self._keep(row, out)
        return out

    def _keep(self, row: int, h: torch.Tensor) -> None:
        if isinstance(self.trace, list):  # a step outside the graphs keeps references: no copy
            self.trace.append(h)
        elif self.trace is not None:
            self.trace[row, :h.shape[0]].copy_(h)


class GraphedDecoder:
    """Static input buffers and the captured graphs of one shard's decode step, and of prompt steps
    of up to `max_rows` rows (`rows`).

    A step is captured as a few graphs of a few layers each, replayed in order: launching one
    graph of a whole shard costs the host about a microsecond per kernel before the device
    starts, while the device runs a graph the host launches the next. The tensor `decode`
    returns is a view of the last graph's output buffer: valid until the next `decode` on this
    shard, so it can be handed on without a copy."""

    LAYERS_PER_GRAPH = 4

    def __init__(self, step: DecodeStep, max_sessions: int, dummy_slot: int, max_tokens: int,
                 hidden_size: int | None, dtype: torch.dtype, device: torch.device, use_graphs: bool = True,
                 max_rows: int = 0):
        # made in the device's scope (ShardRuntime builds it there): the event and graph pool belong to it
        self.step, self.dummy_slot, self.max_tokens, self.device = step, dummy_slot, max_tokens, torch.device(device)
        self.buckets = row_buckets(max_sessions, max_rows)
        self.max_heads = max_sessions  # a step's sessions, each at most one head row
        self.has_head = step.model.norm is not None  # the last stage: its step ends in logits
        self.use_graphs = use_graphs
        n = self.buckets[-1]
        # rows: slots, positions, lengths, token ids, head rows; written through a numpy view and
        # copied whole. Built as a tensor and copied into a column slice (strided: torch staged that
        # copy through pageable memory and scattered it with one more kernel), they held a decode
        # step's first kernel back to 0.30-0.49 ms after the step began, now 0.18-0.37 (H200, torch.profiler)
        self._host = torch.zeros(5, n, dtype=torch.int64).pin_memory()
        self._host_rows = self._host.numpy()
        self._index = torch.zeros(5, n, dtype=torch.int64, device=device)
        self._hidden = None if hidden_size is None else torch.zeros(n, hidden_size, dtype=dtype, device=device)
        # hidden states from the host go through pinned memory: a copy from pageable memory is synchronous
        self._hidden_host = None if hidden_size is None else torch.zeros(n, hidden_size, dtype=dtype).pin_memory()
        self._host_free = torch.cuda.Event()
        self._host_free.record()
        self._pool = torch.cuda.graph_pool_handle()
        self.segments = segment_bounds(step.n_layers, self.LAYERS_PER_GRAPH)
        self.graphs: dict[tuple[int, tuple[int, int], bool, bool], tuple[list[torch.cuda.CUDAGraph], torch.Tensor]] = {}
        self.last_hidden: torch.Tensor | None = None

    def decode(self, slots: list[int], positions: list[int], xs: list[torch.Tensor]) -> torch.Tensor:
        """One token for each row (a session each): `xs` are (1,) ids on stage 0 (on the host), else
        (1, D) hidden."""
        return self.rows(slots, positions, xs, decodes_only=True)

    def fits(self, n_rows: int, head_rows: list[int] | None) -> bool:
        """Whether `rows` takes a step of `n_rows` rows and these head rows."""
        return n_rows <= self.buckets[-1] and (len(head_rows) <= self.max_heads if head_rows is not None
                                               else n_rows <= self.max_heads or not self.has_head)

    @on_own_device  # Triton launches, and graphs capture and replay, on the current device
    def rows(self, slots: list[int], positions: list[int], xs: list[torch.Tensor],
             head_rows: list[int] | None = None, decodes_only: bool = False) -> torch.Tensor:
        """Row i writes position positions[i] of cache slot slots[i] and attends to the slot's keys up
        to it. `xs` hold the rows in order: ids on stage 0 (on the host), else hidden (n, D).
        On the last stage, the logits of `head_rows` (default: every row) and `last_hidden` all rows'.
        `decodes_only`: no slot appears twice and there are no head rows (a decode step)."""
        B = len(slots)
        bucket = bucket_for(B, self.buckets)
        plan = attention_plan(max(positions) + 1, self.max_tokens)
        heads = head_rows is not None and self.has_head
        key = (bucket, plan, heads, decodes_only)
        if self.use_graphs and key not in self.graphs:
            self.graphs[key] = self._capture(*key)
        self._host_free.synchronize()  # the previous step's copies have left the pinned buffers
        self._host_rows[:3, :bucket] = pad_step(slots, positions, bucket, self.dummy_slot)
        if self._hidden is None:
            torch.cat([x.to("cpu", torch.int64) for x in xs], out=self._host[3, :B])
        if heads:
            n_heads = min(bucket, self.max_heads)
            self._host_rows[4, :n_heads] = head_rows + [0] * (n_heads - len(head_rows))
        self._index.copy_(self._host, non_blocking=True)
        if self._hidden is not None:  # one copy to the device (not one a row: each a synchronous copy)
            x = xs[0] if len(xs) == 1 else torch.cat(xs)
            if x.device.type == "cpu":
                x = self._hidden_host[:B].copy_(x)
            self._hidden[:B].copy_(x, non_blocking=True)
        self._host_free.record()
        if self.use_graphs:
            graphs, out = self.graphs[key]
            for graph in graphs:
                graph.replay()
        else:
            out = self.step(*self._inputs(bucket), plan, self._heads(bucket, heads), decodes_only)
        if isinstance(out, tuple):  # the last stage: logits, and the hidden states it keeps for audits
            out, hidden = out
            self.last_hidden = hidden[:B]
        return out[:len(head_rows) if heads else B]

    @on_own_device
    def capture_all(self) -> int:
        """Capture now every graph a step may replay (`graph_keys`); returns how many were missing.
        Captured on first use instead, each took an H200 stage of the 8B shape 30-140 ms inside a
        step, and a pool meets new keys for minutes (batch sizes and prompt rows vary, contexts cross
        plan boundaries): every running stream stalled for each."""
        keys = graph_keys(self.buckets, self.max_heads, self.has_head, self.max_tokens) if self.use_graphs else []
        missing = [key for key in keys if key not in self.graphs]
        for key in missing:
            self.graphs[key] = self._capture(*key)
        return len(missing)

    def _inputs(self, bucket: int):
        x = self._index[3, :bucket] if self._hidden is None else self._hidden[:bucket]
        return x, self._index[0, :bucket], self._index[1, :bucket], self._index[2, :bucket]

    def _heads(self, bucket: int, heads: bool) -> torch.Tensor | None:
        return self._index[4, :min(bucket, self.max_heads)] if heads else None

    def _capture(self, bucket: int, plan: tuple[int, int], heads: bool, decodes_only: bool):
        # Warm up (Triton compiles, cuBLAS picks kernels) and capture with every row on the dummy
        # slot, so that neither writes into a session's cache.
        self._index[:3, :bucket] = torch.tensor(pad_step([], [], bucket, self.dummy_slot), device=self._index.device)
        self._index[3, :bucket] = 0
        self._index[4, :bucket] = 0  # head rows a larger step left would index past this bucket
        x, *index = self._inputs(bucket)

        def run(state, start, end):
            return self.step.segment(start, end, state, *index, plan, self._heads(bucket, heads), decodes_only)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                state = x
                for start, end in self.segments:
                    state = run(state, start, end)
        torch.cuda.current_stream().wait_stream(stream)
        graphs, state = [], x
        for start, end in self.segments:
            # each graph's outputs stay referenced, so later captures in the pool keep off them
            graphs.append(torch.cuda.CUDAGraph())
            # on this device's stream: torch.cuda.graph's default capture stream is made once per
            # process, on whichever device captured first, and a graph captured there is empty.
            # Thread-local: in the default (global) mode another thread's CUDA call during a capture
            # (a provider's sealers copy traces off the device) fails, and invalidates the capture
            with torch.cuda.graph(graphs[-1], pool=self._pool, stream=stream, capture_error_mode="thread_local"):
                state = run(state, start, end)
        return graphs, state
