"""The admission probe's work, the same on a provider and on the coordinator that checks it.

A `Probe` names a few middle layers, a batch and a seed: both sides load those layers, prefill
`batch` sessions with hidden states drawn from the seed and decode a warm-up step or two (untimed),
then (on `ProbeRun`, with a second seed only sent when the timed part starts) run `steps` batched
decode steps. The provider returns the last step's output; the coordinator, which times the run with
its own clock, recomputes it (coordinator/admission.py). A prepared probe answers up to `RUNS` runs,
each continuing the sessions where the last left them. Inputs are drawn on the CPU in float32 so
both sides draw the same.
"""

from __future__ import annotations

from pathlib import Path

import torch

from node.runtime import ShardRuntime
from node.shard import Shard
from wire.messages import MAX_PROBE_STEPS, Probe, ProbeRun

WARM_UP_STEPS = 2  # decode steps of the whole batch after the prefill, before the timed run
# Timed runs one prepared probe answers: the coordinator keeps the fastest, as anything else on the
# machine (another process loading its weights, say) can only slow a run down
RUNS = 3


def probe_inputs(seed: int, rows: int, hidden: int) -> torch.Tensor:
    """(rows, hidden) float32 from `seed`: unit-RMS rows, like a normalised hidden state."""
    return torch.randn(rows, hidden, generator=torch.Generator().manual_seed(seed))


class ProbeWork:
    """Layers loaded and sessions prefilled for one probe; `run` is the part that is timed."""

    def __init__(self, model_dir: str | Path | None, probe: Probe, device: torch.device | str = "cpu",
                 runtime: ShardRuntime | None = None):
        """`runtime`: the probe's layers already loaded (benchmarks on random weights); else from `model_dir`."""
        self.probe = probe
        shard = Shard(probe.model, probe.start, probe.end, probe.n_layers)
        self.runtime = runtime or ShardRuntime(model_dir, shard, device=device, dtype=getattr(torch, probe.dtype),
                                               max_sessions=probe.batch,
                                               max_seq_len=probe.tokens + WARM_UP_STEPS + RUNS * MAX_PROBE_STEPS)
        self.runs_left = RUNS
        hidden = self.runtime.config.hidden_size
        self.sessions = [f"probe{i}" for i in range(probe.batch)]
        x = probe_inputs(probe.seed, probe.batch * probe.tokens, hidden)  # (B * T, D)
        for i, sid in enumerate(self.sessions):
            self.runtime.prefill(sid, x[i * probe.tokens:(i + 1) * probe.tokens])
        # untimed decode steps first: a GPU's first decode pays for compiling and capturing the decode
        # path it serves with (fused kernels, CUDA graphs), which the timed run then replays; an honest
        # H200 measured ~300x slower than its claim without them, a false "misconduct"
        self._decode(probe_inputs(probe.seed + 1, WARM_UP_STEPS * probe.batch, hidden), WARM_UP_STEPS)

    def run(self, run: ProbeRun) -> torch.Tensor:
        """`run.steps` decode steps of the whole batch; the last step's output (B, D) in float32."""
        if not self.runs_left:
            raise ValueError(f"a probe answers {RUNS} runs")
        self.runs_left -= 1
        hidden = self.runtime.config.hidden_size
        return self._decode(probe_inputs(run.seed, run.steps * len(self.sessions), hidden), run.steps)

    def _decode(self, xs: torch.Tensor, steps: int) -> torch.Tensor:
        out = None
        for step in range(steps):
            rows = xs[step * len(self.sessions):(step + 1) * len(self.sessions)]
            out = self.runtime.decode([(sid, rows[i:i + 1]) for i, sid in enumerate(self.sessions)])
        return out.float().cpu().clone()
