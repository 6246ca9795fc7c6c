"""Runs one shard (layers [start, end) of a model) for many sessions, each with its own KV cache.

Stage 0 takes token ids and embeds them; later stages take hidden states (T, D). The last stage
applies the final norm and LM head and returns logits; every other stage returns hidden states.
Decode steps of different sessions run as one batch. On a CUDA device decode runs fused kernels
replayed from CUDA graphs (node/cuda_graphs.py), and prefill the same kernels as rows of a decode
step (prompts longer than FUSED_ROW_KEYS allows run the layers); every step on the CPU runs the
layers of node/layers.py.

With `capture_trace` a runtime also keeps, per session, its layer trace in its serving dtype
(verification/trace.py): (2 n_shard_layers + 1, T, D), row 0 the stage's input (stage 0: the
embeddings), then each layer's attention and MLP updates. An audit re-checks each layer alone
from them (node/layer_reference.py). Off by default: then nothing is kept or copied.
On CUDA the captured decode step writes them into a static (2L + 1, B, D) buffer, copied out after
each replay, so capturing keeps the CUDA graphs.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from node.config import ModelConfig, ModelError
from node.cpu_threads import threads_for_step
from node.cuda_graphs import PROMPT_GRAPH_ROWS, DecodeStep, GraphedDecoder
from node.device_scope import device_scope, on_own_device
from node.fused import Ops, attention_plan
from node.layers import DecoderLayer, Group, KVCache, Packed, RMSNorm, input_major_, load_layer, rope_tables
from node.shard import EMBED, FINAL_NORM, LM_HEAD, Checkpoint, Shard, tensor_names
from verification.triton_probe import triton_usable

DEFAULT_MAX_SESSIONS = 32
DEFAULT_MAX_SEQ_LEN = 2048
DEFAULT_IDLE_TIMEOUT_S = 300.0
# New rows x the keys they attend to, at most, for a prefill step through the fused ops on a GPU:
# there each row reads its keys as a decode row does, so long prompts keep SDPA's prefill kernel
FUSED_ROW_KEYS = 256 * 1024


class SessionError(RuntimeError):
    """A request that does not fit the sessions held: unknown, full, too long, wrong input."""


@dataclass
class Session:
    slot: int
    n_tokens: int = 0  # tokens already in this session's cache
    last_used_s: float = 0.0
    # with capture_trace: (2L + 1, t, D) per step, in order; concatenated on first read
    trace: list[torch.Tensor] = field(default_factory=list)


class ShardModel(nn.Module):
    """The modules of one shard, loaded from only the tensors the shard needs."""

    def __init__(self, config: ModelConfig, shard: Shard, dtype: torch.dtype, device):
        super().__init__()
        self.config, self.shard = config, shard
        with torch.device("meta"):
            self.embed = nn.Embedding(config.vocab_size, config.hidden_size) if shard.is_first else None
            self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(shard.n_shard_layers))
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if shard.is_last else None
            # With tied embeddings a stage that holds both ends uses the embedding as its head;
            # a last stage without the embedding holds its own copy of that matrix as the head.
            self.lm_head = (
                nn.Linear(config.hidden_size, config.vocab_size, bias=False)
                if shard.is_last and not (config.tie_word_embeddings and shard.is_first)
                else None
            )
        self.to(dtype)  # still on the meta device: the weights are allocated once, in `dtype`
        self.to_empty(device=device)
        self.requires_grad_(False)  # served, never trained: products may be written into given tensors
        if torch.device(device).type == "cpu":
            heads = [self.head_weight()] if shard.is_last else []
            input_major_([m.weight for m in self.modules() if isinstance(m, nn.Linear)] + heads)

    def load(self, checkpoint: Checkpoint, on_tensor=None) -> list[str]:
        names = tensor_names(self.config, self.shard)
        p = next(self.parameters())
        return self.load_tensors(checkpoint.load(names, dtype=p.dtype, device=p.device, on_tensor=on_tensor))

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Copy in the shard's tensors from `tensors` (named as in a checkpoint; left unchanged)."""
        names = tensor_names(self.config, self.shard)
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ModelError(f"{len(missing)} tensors of the shard are missing, e.g. {missing[0]}")
        tensors = {n: tensors[n] for n in names}
        with torch.no_grad():
            if self.embed is not None:
                self.embed.weight.copy_(tensors[EMBED])
            for i, layer in enumerate(self.layers):
                load_layer(layer, tensors, f"model.layers.{self.shard.start + i}.")
            if self.norm is not None:
                self.norm.weight.copy_(tensors.pop(FINAL_NORM))
                if self.lm_head is not None:
                    self.lm_head.weight.copy_(tensors[EMBED if self.config.tie_word_embeddings else LM_HEAD])
        return names

    def head_weight(self) -> torch.Tensor:
        return self.lm_head.weight if self.lm_head is not None else self.embed.weight

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


class ShardRuntime:
    """A loaded shard plus the sessions it serves."""

    def __init__(
        self,
        model_dir: str | Path,
        shard: Shard,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        cuda_graphs: bool = True,
        on_tensor_loaded=None,
        capture_trace: bool = False,
    ):
        """`cuda_graphs`: on a CUDA device, decode through fused kernels and CUDA graphs (False:
        the layers of node/layers.py, as on the CPU). `on_tensor_loaded(name)`: loading progress.
        `capture_trace`: keep every session's layer trace (`trace`)."""
        config = ModelConfig.load(model_dir)
        with device_scope(device):  # loading, the cache and the graphs' streams on this device, not cuda:0
            self._build(config, shard, lambda model: model.load(Checkpoint(model_dir), on_tensor_loaded), device,
                        dtype, max_sessions, max_seq_len, idle_timeout_s, cuda_graphs, capture_trace)

    @classmethod
    def from_tensors(cls, config: ModelConfig, shard: Shard, tensors: dict[str, torch.Tensor],
                     **kwargs) -> "ShardRuntime":
        """A runtime over tensors already in memory, named as in a checkpoint (benchmarks)."""
        runtime = cls.__new__(cls)
        kwargs = {**dict(device="cpu", dtype=torch.float32, max_sessions=DEFAULT_MAX_SESSIONS,
                         max_seq_len=DEFAULT_MAX_SEQ_LEN, idle_timeout_s=DEFAULT_IDLE_TIMEOUT_S,
                         cuda_graphs=True, capture_trace=False), **kwargs}
        with device_scope(kwargs["device"]):
            runtime._build(config, shard, lambda model: model.load_tensors(tensors), **kwargs)
        return runtime

    def _build(self, config, shard, load, device, dtype, max_sessions, max_seq_len, idle_timeout_s, cuda_graphs,
               capture_trace=False):
        self.config = config
        if shard.n_layers != self.config.n_layers:
            raise ModelError(f"shard says {shard.n_layers} layers, the model has {self.config.n_layers}")
        if max_sessions <= 0 or max_seq_len <= 0:
            raise ValueError("max_sessions and max_seq_len must be positive")
        self.shard, self.device, self.dtype = shard, torch.device(device), dtype
        self.max_sessions = max_sessions
        self.max_seq_len = min(max_seq_len, self.config.max_context_tokens)
        self.idle_timeout_s = idle_timeout_s
        self.model = ShardModel(self.config, shard, dtype, self.device).eval()
        self.loaded_tensors = load(self.model)
        cos, sin = rope_tables(self.config, self.max_seq_len)
        self.cos, self.sin = cos.to(self.device, dtype), sin.to(self.device, dtype)
        self.capture_trace = capture_trace
        # the latest step's trace, [input, attention 0, MLP 0, ...], each (B, T, D)
        self._taken: list[torch.Tensor] | None = None
        use_graphs = cuda_graphs and self.device.type == "cuda" and triton_usable(self.device)
        # the graphs pad batches with rows that write into one extra slot, owned by no session
        self.cache = KVCache(
            shard.n_shard_layers, max_sessions + (1 if use_graphs else 0), self.config.n_kv_heads, self.max_seq_len,
            self.config.head_dim, dtype, self.device,
        )
        self.graphs = None
        if use_graphs:
            max_rows = max(max_sessions, PROMPT_GRAPH_ROWS)
            kept = None
            if capture_trace:
                kept = torch.zeros(2 * shard.n_shard_layers + 1, max_rows, self.config.hidden_size, dtype=dtype,
                                   device=self.device)
            step = DecodeStep(self.model, self.cache, self.cos, self.sin, Ops(use_triton=True), kept)
            self.graphs = GraphedDecoder(step, max_sessions, max_sessions, self.max_seq_len,
                                         None if shard.is_first else self.config.hidden_size, dtype, self.device,
                                         max_rows=max_rows)
        # On a GPU prompt rows run the decode step's fused ops too (`_forward_rows`): through the layers'
        # eager ops an 8B prefill step costs an H200 ~25 ms of launches, however few its rows. None: the layers.
        self.fused_rows: Ops | None = self.graphs.step.ops if self.graphs is not None else None
        self.sessions: dict[str, Session] = {}
        # new prompts of one prefill step attend in one call (`Packed`): on a GPU per-prompt calls cost
        # more in launches than in work; on the CPU the bit-exact per-prompt recipe audits replay stays
        self.pack_prompts = self.device.type == "cuda"
        # On the last stage: the hidden states (before the final norm) behind the logits of the
        # latest step, which the stage retains for audits. A view, valid until the next step.
        self.last_hidden: torch.Tensor | None = None
        self._free_slots = list(range(max_sessions - 1, -1, -1))  # pop() hands out low slots first
        # Cache positions below this mark hold finite values, per slot. A batched decode reads every
        # row up to the longest context in the batch, and torch.empty memory may hold NaNs, which
        # poison attention even where masked (0 x NaN); so positions are zeroed before first read.
        self._finite_upto = [0] * self.cache.k.shape[1]

    # -- sessions -------------------------------------------------------------------------

    def open(self, session_id: str) -> Session:
        if session_id in self.sessions:
            raise SessionError(f"session {session_id!r} already open")
        if not self._free_slots:
            self.evict_idle()
        if not self._free_slots:
            raise SessionError(f"all {self.max_sessions} session slots are busy")
        session = Session(slot=self._free_slots.pop(), last_used_s=time.monotonic())
        self.sessions[session_id] = session
        return session

    def close(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            self._free_slots.append(session.slot)

    def evict_idle(self, now_s: float | None = None) -> list[str]:
        now_s = time.monotonic() if now_s is None else now_s
        idle = [sid for sid, s in self.sessions.items() if now_s - s.last_used_s > self.idle_timeout_s]
        for sid in idle:
            self.close(sid)
        return idle

    # -- compute --------------------------------------------------------------------------

    @on_own_device
    @torch.inference_mode()
    def prefill(self, session_id: str, x: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
        """Feed T new tokens of one session (opening it if new): ids (T,) on stage 0, hidden (T, D)
        after. Returns hidden (T, D), or on the last stage logits (T, V) if `all_positions`
        else (1, V) for the last position only."""
        x = self._check_input(x, to_device=False)
        session = self.sessions.get(session_id) or self.open(session_id)
        T, start = x.shape[0], session.n_tokens
        try:
            self._check_room(session_id, session, T)
        except SessionError:
            if start == 0:
                self.close(session_id)
            raise
        if self._fits_fused([T], [start]):
            out, taken = self._forward_rows([session], x, [T], None if all_positions else [T - 1])
        else:
            x = self._to_device(x)
            write, read, mask = self._prefill_attention(session.slot, start, T)
            positions = slice(start, start + T)
            h = self._forward(x[None], self.cos[positions][None, None], self.sin[positions][None, None], write, read,
                              mask)[0]  # (T, D)
            taken = torch.stack(self._taken)[:, 0] if self._taken is not None else None  # (2L + 1, T, D)
            self._taken = None
            out = h
            if self.shard.is_last:
                self.last_hidden = h
                out = self._head(h if all_positions else h[-1:])
        if taken is not None:
            session.trace.append(taken)
        session.n_tokens += T
        session.last_used_s = time.monotonic()
        return out

    def _fits_fused(self, lengths: list[int], starts: list[int]) -> bool:
        return self.fused_rows is not None and sum(T * (p + T) for T, p in zip(lengths, starts)) <= FUSED_ROW_KEYS

    def _forward_rows(self, sessions: list[Session], x: torch.Tensor, lengths: list[int],
                      head_rows: list[int] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """New rows `x` of `sessions` (lengths[i] each, after what each has cached; on the host or the
        device) as the rows of one fused decode step: every row writes its key and value, then attends
        to its slot's keys up to its own position, so each prompt is causal and follows its session's
        cache; replayed from the CUDA graphs when its rows fit them. Returns hidden (N, D), or on the
        last stage the logits of `head_rows` (all rows if None; `last_hidden` then holds all N rows),
        and the rows' trace (2L + 1, N, D) if captured."""
        slots = [s.slot for s, T in zip(sessions, lengths) for _ in range(T)]
        positions = [p for s, T in zip(sessions, lengths) for p in range(s.n_tokens, s.n_tokens + T)]
        n = len(positions)
        if self.graphs is not None and self.graphs.fits(n, head_rows):
            out = self.graphs.rows(slots, positions, [x], head_rows)
            if self.shard.is_last:
                self.last_hidden = self.graphs.last_hidden
            # the step's static buffer: copied out before the next replay
            return out, self.graphs.step.trace[:, :n].clone() if self.capture_trace else None
        # rows padded to 16 bytes: Triton compiles a kernel again for an argument off that alignment
        # (an H200 paid ~150 ms for it on the first prompt of odd length)
        pad = [0] * (-n % 2)
        index = torch.tensor([slots + pad, positions + pad, [p + 1 for p in positions] + pad]).to(self.device)[:, :n]
        taken = [] if self.capture_trace else None
        step = DecodeStep(self.model, self.cache, self.cos, self.sin, self.fused_rows, taken)
        rows = None if head_rows is None else torch.tensor(head_rows, device=self.device)
        out = step(self._to_device(x), *index, attention_plan(max(positions) + 1, self.max_seq_len), rows)
        if isinstance(out, tuple):  # the last stage: logits, and the hidden states behind every row
            out, self.last_hidden = out
        return out, torch.stack(taken) if taken is not None else None

    def _prefill_attention(self, slot: int, start: int, T: int):
        """write, read and mask for T new rows of the session in `slot` that holds `start` tokens."""
        def write(cache, new):  # new: (1, Hkv, T, Dh)
            cache[slot, :, start:start + T] = new[0]

        def read(cache):
            return cache[slot:slot + 1, :, :start + T]

        # A fresh session attends causally over its own T tokens; a continued one also sees
        # the `start` cached tokens, all of which precede every new query.
        mask = None
        if start > 0:
            mask = torch.ones(T, start + T, dtype=torch.bool, device=self.device).tril(diagonal=start)[None, None]
        return write, read, mask

    def _packed_attention(self, lo: int, slot_list: list[int], lengths: list[int]) -> Packed:
        """New prompts of sessions in `slot_list` (`lengths` rows each), rows from `lo` of a ragged step."""
        slots = torch.tensor([s for s, n in zip(slot_list, lengths) for _ in range(n)], device=self.device)
        pos = torch.cat([torch.arange(n, device=self.device) for n in lengths])
        prompt = torch.repeat_interleave(torch.arange(len(lengths), device=self.device),
                                         torch.tensor(lengths, device=self.device))
        # a row sees the rows of its own prompt up to itself
        mask = (prompt[:, None] == prompt[None, :]) & (pos[:, None] >= pos[None, :])

        def write(cache, new):  # new: (1, Hkv, n, Dh)
            cache[slots, :, pos] = new[0].transpose(0, 1)

        return Packed(lo, lo + len(pos), write, mask[None, None])

    @on_own_device
    @torch.inference_mode()
    def prefill_many(self, steps: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """Feed several sessions' new tokens as one ragged batch (opening new sessions): session i's
        ids (T_i,) on stage 0, hidden (T_i, D) after; a session that is decoding may feed its one token.
        The rows of all sessions go through each weight matrix once, as one (N = sum T_i) matrix;
        each session attends only to its own keys. On a GPU all rows are rows of one fused decode step
        (`_forward_rows`) unless their attention is long; otherwise one attention call for all the
        one-token sessions together (as a decode step batches them), on CUDA one for all new prompts,
        and one per other prompt. Returns hidden (N, D), or on the last stage logits (n, V) at each
        session's last row; `last_hidden` holds all N rows. Each session's state and trace rows are as
        if it had been fed alone."""
        if not steps:
            raise SessionError("empty prefill batch")
        ids = [sid for sid, _ in steps]
        if len(set(ids)) != len(ids):
            raise SessionError("a session appears twice in one prefill batch")
        xs = [self._check_input(x, to_device=False) for _, x in steps]
        opened = []  # sessions this call opened: closed again if it refuses the batch
        try:
            sessions = []
            for sid, x in zip(ids, xs):
                session = self.sessions.get(sid)
                if session is None:
                    session = self.open(sid)
                    opened.append(sid)
                self._check_room(sid, session, x.shape[0])
                sessions.append(session)
        except SessionError:
            for sid in opened:
                self.close(sid)
            raise
        lengths = [x.shape[0] for x in xs]
        starts = [s.n_tokens for s in sessions]
        # one copy to the device for the whole step: one a session cost a GPU a synchronous copy each
        # (an H200 spent 2.6 of 5.9 ms of host time of a prompt and 30 riding decodes on 31 of them)
        x = torch.cat(xs)
        if self._fits_fused(lengths, starts):
            ends = list(itertools.accumulate(lengths))
            out, taken = self._forward_rows(sessions, x, lengths, [e - 1 for e in ends])
            bounds = {i: (e - T, e) for i, (T, e) in enumerate(zip(lengths, ends))}
        else:
            out, taken, bounds = self._forward_groups(sessions, list(self._to_device(x).split(lengths)), lengths,
                                                      starts)
        now = time.monotonic()
        for i, s in enumerate(sessions):
            if taken is not None:
                s.trace.append(taken[:, bounds[i][0]:bounds[i][1]])
            s.n_tokens += lengths[i]
            s.last_used_s = now
        return out

    def _forward_groups(self, sessions: list[Session], xs: list[torch.Tensor], lengths: list[int],
                        starts: list[int]) -> tuple[torch.Tensor, torch.Tensor | None, dict[int, tuple[int, int]]]:
        """prefill_many through the layers: the stage's output (rows in the order of `sessions`), the
        trace of every row (or None) and each session's rows in it."""
        # one-token rows of sessions with a context attend as a decode does; on CUDA new prompts attend
        # together, one call for all (per-prompt calls cost a GPU more in launches than in work); the
        # others one by one
        single = [i for i, (T, p) in enumerate(zip(lengths, starts)) if T == 1 and p > 0]
        fresh = [i for i, p in enumerate(starts) if p == 0] if self.pack_prompts else []
        fresh = fresh if len(fresh) > 1 else []
        order = single + fresh + [i for i in range(len(sessions)) if i not in set(single) | set(fresh)]
        bounds, groups, lo = {}, [], 0
        if single:
            write, read, mask = self._decode_attention([sessions[i].slot for i in single], [starts[i] for i in single])
            groups.append(Group(0, len(single), len(single), write, read, mask))
            bounds.update({i: (k, k + 1) for k, i in enumerate(single)})
            lo = len(single)
        if fresh:
            groups.append(self._packed_attention(lo, [sessions[i].slot for i in fresh], [lengths[i] for i in fresh]))
            for i in fresh:
                bounds[i] = (lo, lo + lengths[i])
                lo += lengths[i]
        for i in order[len(single) + len(fresh):]:
            T = lengths[i]
            groups.append(Group(lo, lo + T, 1, *self._prefill_attention(sessions[i].slot, starts[i], T)))
            bounds[i] = (lo, lo + T)
            lo += T
        x = torch.cat([xs[i] for i in order])  # (N,) ids or (N, D)
        pos = torch.cat([torch.arange(starts[i], starts[i] + lengths[i], device=self.device) for i in order])
        with threads_for_step(x.shape[0], self.device):
            h = self._forward(x[None], self.cos[pos][None, None], self.sin[pos][None, None], None, None, None,
                              groups)[0]  # (N, D), rows in `order`
        taken = None
        if self._taken is not None:
            taken = torch.stack(self._taken)[:, 0]  # (2L + 1, N, D), rows in `order`
            self._taken = None
        back = torch.cat([torch.arange(*bounds[i], device=self.device) for i in range(len(sessions))])
        h = h[back] if order != list(range(len(sessions))) else h  # rows in the order of `sessions`
        if not self.shard.is_last:
            return h, taken, bounds
        self.last_hidden = h
        ends = torch.tensor(lengths, device=self.device).cumsum(0) - 1
        return self._head(h[ends]), taken, bounds

    @on_own_device
    @torch.inference_mode()
    def decode(self, steps: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """One new token for each of B open sessions, as one batch: ids (B,) stacked from each
        step's (1,) or hidden (B, D) from each step's (1, D). Returns (B, D) or logits (B, V);
        on CUDA a view valid until the next decode of this shard."""
        if not steps:
            raise SessionError("empty decode batch")
        ids = [sid for sid, _ in steps]
        if len(set(ids)) != len(ids):
            raise SessionError("a session appears twice in one decode batch")
        sessions = []
        for sid, _ in steps:
            if sid not in self.sessions:
                raise SessionError(f"unknown session {sid!r} (prefill first)")
            sessions.append(self.sessions[sid])
            self._check_room(sid, sessions[-1], 1)
        xs = [self._check_input(x, to_device=False, check_range=False) for _, x in steps]
        if any(x.shape[0] != 1 for x in xs):
            raise SessionError("each decode step carries exactly one token")
        if self.shard.is_first:  # token ids: one range check for the batch
            xs = [self._check_input(torch.cat(xs), to_device=self.graphs is None)]
        slot_list = [s.slot for s in sessions]
        pos_list = [s.n_tokens for s in sessions]
        taken = None  # with capture_trace: (2L + 1, B, D)
        if self.graphs is not None:
            out = self.graphs.decode(slot_list, pos_list, xs)
            self.last_hidden = self.graphs.last_hidden
            if self.capture_trace:  # the step's static buffer: copied out before the next replay
                taken = self.graphs.step.trace[:, :len(steps)].clone()
        else:
            x = xs[0] if self.shard.is_first else torch.cat([x.to(self.device, self.dtype) for x in xs])
            with threads_for_step(len(steps), self.device):
                out = self._decode_layers(x, slot_list, pos_list)
            if self._taken is not None:
                taken = torch.stack(self._taken)[:, :, 0]
                self._taken = None
        if taken is not None:
            for row, s in enumerate(sessions):
                s.trace.append(taken[:, row:row + 1])
        now = time.monotonic()
        for s in sessions:
            s.n_tokens += 1
            s.last_used_s = now
        return out

    def _decode_layers(self, x: torch.Tensor, slot_list: list[int], pos_list: list[int]) -> torch.Tensor:
        pos = torch.tensor(pos_list, device=self.device)
        write, read, mask = self._decode_attention(slot_list, pos_list)
        cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]  # (B, 1, 1, Dh)
        h = self._forward(x[:, None], cos, sin, write, read, mask)[:, 0]  # (B, D)
        if not self.shard.is_last:
            return h
        self.last_hidden = h
        return self._head(h)

    def _decode_attention(self, slot_list: list[int], pos_list: list[int]):
        """write, read and mask for one new row of each session in `slot_list`, at `pos_list`."""
        B = len(slot_list)
        slots = torch.tensor(slot_list, device=self.device)
        pos = torch.tensor(pos_list, device=self.device)
        visible = max(pos_list) + 1
        for slot, p in zip(slot_list, pos_list):
            start = max(p + 1, self._finite_upto[slot])  # positions up to p are this session's own
            if start < visible:
                self.cache.k[:, slot, :, start:visible].zero_()
                self.cache.v[:, slot, :, start:visible].zero_()
            self._finite_upto[slot] = max(self._finite_upto[slot], visible)
        # Sessions in consecutive slots read the cache as a view; otherwise gather their rows.
        lo = slot_list[0]
        contiguous = slot_list == list(range(lo, lo + B))

        def write(cache, new):  # new: (B, Hkv, 1, Dh)
            cache[slots, :, pos] = new[:, :, 0]

        def read(cache):
            return cache[lo:lo + B, :, :visible] if contiguous else cache[slots, :, :visible]

        mask = (torch.arange(visible, device=self.device)[None, :] <= pos[:, None])[:, None, None, :]  # (B,1,1,L)
        return write, read, mask

    def _forward(self, x, cos, sin, write, read, mask, groups=None) -> torch.Tensor:
        h = self.model.embed(x) if self.shard.is_first else x.to(self.dtype)  # (B, T, D)
        if self.capture_trace:
            return self._forward_captured(h, cos, sin, write, read, mask, groups)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, self.cache.k[i], self.cache.v[i], write, read, mask, None, groups)
        return h

    def _forward_captured(self, h, cos, sin, write, read, mask, groups=None) -> torch.Tensor:
        taken = [h]  # each update is a new tensor: keeping references copies nothing
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, self.cache.k[i], self.cache.v[i], write, read, mask, taken, groups)
        self._taken = taken
        return h

    @torch.inference_mode()
    def capture_graphs(self) -> int:
        """On a GPU, capture every CUDA graph a step of this shard can replay, before it serves
        (`GraphedDecoder.capture_all`); how many were captured now."""
        return self.graphs.capture_all() if self.graphs is not None else 0

    def trace(self, session_id: str) -> torch.Tensor:
        """The layer trace of every position fed to an open session so far: (2 n_shard_layers + 1,
        T, D) in the serving dtype, on the runtime's device."""
        if not self.capture_trace:
            raise SessionError("this runtime does not capture layer traces")
        session = self.sessions.get(session_id)
        if session is None:
            raise SessionError(f"unknown session {session_id!r}")
        if not session.trace:
            raise SessionError(f"session {session_id!r} has run no step yet")
        if len(session.trace) > 1:
            session.trace[:] = [torch.cat(session.trace, dim=1)]
        return session.trace[0]

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.model.norm(h), self.model.head_weight())

    # -- input checks ---------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor, to_device: bool = True, check_range: bool = True) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise SessionError(f"expected a tensor, got {type(x).__name__}")
        if self.shard.is_first:
            if x.dim() != 1 or x.dtype not in (torch.int64, torch.int32) or x.numel() == 0:
                raise SessionError(f"stage 0 takes a non-empty 1-d tensor of token ids, got {x.dtype} {tuple(x.shape)}")
            if check_range and (int(x.min()) < 0 or int(x.max()) >= self.config.vocab_size):
                raise SessionError(f"token id out of range [0, {self.config.vocab_size})")
            return self._to_device(x) if to_device else x
        if x.dim() != 2 or x.shape[1] != self.config.hidden_size or x.shape[0] == 0 or not x.is_floating_point():
            raise SessionError(
                f"stage takes hidden states (T, {self.config.hidden_size}) of floats, got {x.dtype} {tuple(x.shape)}"
            )
        return self._to_device(x) if to_device else x

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        """Input on the device, in the dtype the shard takes (ids: int64)."""
        return x.to(self.device, torch.int64 if self.shard.is_first else self.dtype)

    def _check_room(self, session_id: str, session: Session, n_new: int) -> None:
        if session.n_tokens + n_new > self.max_seq_len:
            raise SessionError(
                f"session {session_id!r} would hold {session.n_tokens + n_new} tokens, over the limit of {self.max_seq_len}"
            )
