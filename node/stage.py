"""One stage of a pipeline: checks a `stage.step` frame, runs it on the shard, and builds the frame
to send on (hidden states to the next stage, or sampled tokens to the coordinator)."""

from __future__ import annotations

import torch

from node.protocol import MAX_BATCH_SESSIONS, MAX_SESSION_ID_CHARS, RESULT, STEP, STEP_KINDS
from node.runtime import SessionError, ShardRuntime
from node.sampling import SamplingParams, sample
from node.transport.frames import Frame


class StepError(ValueError):
    """A step this stage refuses: malformed, or out of line with the sessions it holds."""


class StageWorker:
    def __init__(self, runtime: ShardRuntime, pipeline_id: str):
        self.runtime, self.pipeline_id = runtime, pipeline_id

    def step(self, frame: Frame) -> Frame:
        kind, sessions, positions, params = self._check(frame)
        x = frame.tensors[0]
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
        if not self.runtime.shard.is_last:
            return Frame(STEP.type, STEP.version, fields, [out])
        tokens = sample(out, params, [p + n_new for p in positions])
        return Frame(RESULT.type, RESULT.version, {
            "pipeline": fields["pipeline"], "step": fields["step"], "sessions": sessions, "tokens": tokens,
        })

    def close(self, sessions: list) -> None:
        for sid in sessions:
            if isinstance(sid, str):
                self.runtime.close(sid)

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
        "sampling": [[p.temperature, p.top_p, p.seed] for p in sampling],
    }, [x])
