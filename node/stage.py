"""One stage of a pipeline: checks a `stage.step` frame, runs it on the shard, and builds the frame
to send on (hidden states to the next stage, or sampled tokens to the coordinator). It records
what each session took and sent; when a session closes for a request it seals that record for
audits and signs the request's receipt."""

from __future__ import annotations

import time

import torch

from ledger.receipts import StageReceipt
from node.faults import Fault
from node.protocol import MAX_BATCH_SESSIONS, MAX_REQUEST_ID_CHARS, MAX_SESSION_ID_CHARS, RESULT, STEP, STEP_KINDS
from node.retention import RetentionStore, SessionRecord
from node.runtime import SessionError, ShardRuntime
from node.sampling import SamplingParams, sample
from wire.frames import Frame
from node.transport.identity import Identity


MAX_STAGES_TIMED = 64


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

    def step(self, frame: Frame) -> Frame:
        kind, sessions, positions, params = self._check(frame)
        x = frame.tensors[0]
        started_s = time.perf_counter()
        try:
            if kind == "prefill":
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
        fields = dict(frame.fields)
        last = self.runtime.shard.is_last
        if last:
            if self.fault is not None:
                perturbed = self.fault.perturb_last_hidden(self.runtime, last_only=kind == "prefill")
                out = out if perturbed is None else perturbed
            hidden = self.runtime.last_hidden
        elif self.fault is not None:
            out = self.fault.perturb(out)
        chosen = [p + n_new for p in positions]
        tokens = sample(out, params, chosen) if last else []
        # a prefill's record holds all its rows; a decode's, one row per session
        rows = [(x, hidden if last else out)] if kind == "prefill" else [
            (x[i:i + 1], (hidden if last else out)[i:i + 1]) for i in range(len(sessions))]
        for i, (sid, (taken, sent)) in enumerate(zip(sessions, rows)):
            record = self.records.setdefault(sid, SessionRecord())
            record.add(taken, sent, (chosen[i], tokens[i]) if last else None)
        fields["stage_ms"] = [*fields["stage_ms"], round((time.perf_counter() - started_s) * 1000, 3)]
        if not last:
            return Frame(STEP.type, STEP.version, fields, [out])
        return Frame(RESULT.type, RESULT.version, {
            "pipeline": fields["pipeline"], "step": fields["step"], "sessions": sessions, "tokens": tokens,
            "stage_ms": fields["stage_ms"],
        })

    def close(self, sessions: list, requests: list | None = None) -> list[StageReceipt]:
        """Free the sessions; for each named with a request id, seal its record and sign a receipt."""
        receipts = []
        for i, sid in enumerate(sessions):
            if not isinstance(sid, str):
                continue
            self.runtime.close(sid)
            record = self.records.pop(sid, None)
            request_id = requests[i] if requests and i < len(requests) else ""
            if record is None or not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_REQUEST_ID_CHARS:
                continue
            if self.identity is not None and self.retained is not None:
                retained = record.seal()
                self.retained.put(request_id, retained)
                receipts.append(self._sign(request_id, record.n_tokens, retained.input_hash, retained.output_hash))
        return receipts

    def _sign(self, request_id: str, n_tokens: int, input_hash: str, output_hash: str) -> StageReceipt:
        shard = self.runtime.shard
        unsigned = StageReceipt(request_id=request_id, model=shard.model_id, layer_start=shard.start,
                                layer_end=shard.end, token_count=n_tokens, input_hash=input_hash,
                                output_hash=output_hash, provider_id=self.identity.peer_id_str,
                                public_key=self.identity.public_key_bytes.hex())
        signature = self.identity.sign(unsigned.signed_bytes()).hex()
        return StageReceipt(**{**unsigned.to_dict(), "signature": signature})

    def _check(self, frame: Frame):
        f = frame.fields
        if f["pipeline"] != self.pipeline_id:
            raise StepError(f"step for pipeline {f['pipeline']!r}, this stage serves {self.pipeline_id!r}")
        kind, sessions, positions, sampling = f["kind"], f["sessions"], f["positions"], f["sampling"]
        if kind not in STEP_KINDS:
            raise StepError(f"unknown step kind {kind!r}")
        if not 0 < len(sessions) <= MAX_BATCH_SESSIONS or len(positions) != len(sessions) or len(sampling) != len(sessions):
            raise StepError("sessions, positions and sampling must be equally long, 1..256 entries")
        if any(not isinstance(s, str) or not 0 < len(s) <= MAX_SESSION_ID_CHARS for s in sessions):
            raise StepError("session ids are strings of 1..64 characters")
        if any(not isinstance(p, int) or isinstance(p, bool) or p < 0 for p in positions):
            raise StepError("positions are non-negative integers")
        if kind == "prefill" and len(sessions) != 1:
            raise StepError("a prefill step carries one session")
        if len(f["stage_ms"]) >= MAX_STAGES_TIMED:
            raise StepError(f"a step passes at most {MAX_STAGES_TIMED} stages")
        x = frame.tensors[0]
        rows = x.shape[0] if x.dim() >= 1 else 0
        if kind == "decode" and rows != len(sessions):
            raise StepError(f"decode step of {len(sessions)} sessions carries {rows} rows")
        try:
            params = [SamplingParams(float(t), float(p), int(s)) for t, p, s in sampling]
        except (TypeError, ValueError) as exc:
            raise StepError(f"bad sampling parameters: {exc}") from exc
        return kind, sessions, positions, params


def step_frame(pipeline_id: str, step: int, kind: str, sessions: list[str], positions: list[int],
               sampling: list[SamplingParams], x: torch.Tensor) -> Frame:
    return Frame(STEP.type, STEP.version, {
        "pipeline": pipeline_id, "step": step, "kind": kind, "sessions": sessions, "positions": positions,
        "sampling": [[p.temperature, p.top_p, p.seed] for p in sampling], "stage_ms": [],
    }, [x])
