"""One stage of a pipeline: runs a `Step` (checked on decode, wire/messages.py) on the shard and
builds the message to send on (hidden states to the next stage, or sampled tokens to the coordinator). It records
what each session took and sent; when a session closes for a request it seals that record for
audits and signs the request's receipt."""

from __future__ import annotations

import time

from ledger.receipts import StageReceipt
from node.faults import Fault
from node.retention import Retained, RetentionStore, SessionRecord
from node.runtime import SessionError, ShardRuntime
from node.transport.identity import Identity
from verification.sampling import sample
from wire.messages import Close, Result, Step, dtype_name


class StepError(ValueError):
    """A step this stage refuses: malformed, or out of line with the sessions it holds."""


class StageWorker:
    def __init__(self, runtime: ShardRuntime, pipeline_id: str, identity: Identity | None = None,
                 retained: RetentionStore | None = None, fault: Fault | None = None):
        """`identity` signs receipts and `retained` keeps sealed records (both or neither);
        `fault`: a deliberate misbehaviour of the outputs, for testing the auditors (its changes to the
        runtime are installed once, by whoever loads the runtime)."""
        self.runtime, self.pipeline_id = runtime, pipeline_id
        self.identity, self.retained, self.fault = identity, retained, fault
        self.records: dict[str, SessionRecord] = {}

    def step(self, step: Step) -> Step | Result:
        if step.pipeline != self.pipeline_id:
            raise StepError(f"step for pipeline {step.pipeline!r}, this stage serves {self.pipeline_id!r}")
        if self.fault is not None and self.fault.refuses_steps:
            raise StepError("this stage refuses every step (fault injection 'refuse')")
        kind, sessions, positions, params, x = step.kind, step.sessions, step.positions, step.sampling, step.x
        started_s = time.perf_counter()
        try:
            if kind != "decode":  # a prompt, or a chunk of one
                [sid], [start] = sessions, positions
                held = self.runtime.sessions.get(sid)
                if held is not None and start == 0:
                    self.runtime.close(sid)  # a replay from the start replaces the old session
                elif (held.n_tokens if held else 0) != start:
                    raise StepError(f"session {sid!r} holds {held.n_tokens if held else 0} tokens, step says {start}")
                out = self.runtime.prefill(sid, x)
                n_new = x.shape[0]
                # records of sessions the runtime evicted go; a prefill from position 0 starts anew
                self.records = {k: r for k, r in self.records.items()
                                if k in self.runtime.sessions and (k != sid or start > 0)}
            else:
                for sid, pos in zip(sessions, positions):
                    held = self.runtime.sessions.get(sid)
                    if held is None or held.n_tokens != pos:
                        raise StepError(f"session {sid!r} is not at position {pos}")
                out = self.runtime.decode([(sid, x[i:i + 1]) for i, sid in enumerate(sessions)])
                n_new = 1
        except SessionError as exc:
            raise StepError(str(exc)) from exc
        last = self.runtime.shard.is_last
        if last:
            if self.fault is not None:
                perturbed = self.fault.perturb_last_hidden(self.runtime, last_only=kind != "decode")
                out = out if perturbed is None else perturbed
            hidden = self.runtime.last_hidden
        elif self.fault is not None:
            out = self.fault.perturb(out)
        chosen = [p + n_new for p in positions]
        # a chunk samples nothing: its last row is not the prompt's end, so no token is chosen there
        sampled = last and kind != "chunk"
        tokens = sample(out, list(params), chosen) if sampled else []
        # a prefill's or chunk's record holds all its rows; a decode's, one row per session
        rows = [(x, hidden if last else out)] if kind != "decode" else [
            (x[i:i + 1], (hidden if last else out)[i:i + 1]) for i in range(len(sessions))]
        for i, (sid, (taken, sent)) in enumerate(zip(sessions, rows)):
            record = self.records.setdefault(sid, SessionRecord())
            record.add(taken, sent, (chosen[i], tokens[i]) if sampled else None)
        forward = step.forward(out, (time.perf_counter() - started_s) * 1000)
        if not last:
            return forward
        return Result(step.pipeline, step.step, sessions, tuple(tokens), forward.stage_ms)

    def close(self, close: Close) -> list[StageReceipt]:
        """Free the sessions; for each named with a request id, seal its record and sign a receipt."""
        receipts = []
        for sid, request_id in zip(close.sessions, close.requests):
            record = self.records.pop(sid, None)
            keep = record is not None and request_id and self.identity is not None and self.retained is not None
            trace = None
            if keep and self.runtime.capture_trace and sid in self.runtime.sessions:
                trace = self.runtime.trace(sid)
            self.runtime.close(sid)
            if keep:
                retained = record.seal(trace)
                self.retained.put(request_id, retained)
                receipts.append(self._sign(request_id, record.n_tokens, retained))
        return receipts

    def _sign(self, request_id: str, n_tokens: int, retained: Retained) -> StageReceipt:
        shard = self.runtime.shard
        unsigned = StageReceipt(request_id=request_id, model=shard.model_id, layer_start=shard.start,
                                layer_end=shard.end, token_count=n_tokens, input_hash=retained.input_hash,
                                output_hash=retained.output_hash, provider_id=self.identity.peer_id_str,
                                public_key=self.identity.public_key_bytes.hex(), layers_hash=retained.layers_hash,
                                dtype=dtype_name(self.runtime.dtype))
        signature = self.identity.sign(unsigned.signed_bytes()).hex()
        return StageReceipt(**{**unsigned.to_dict(), "signature": signature})
