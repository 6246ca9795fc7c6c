"""The admission probe's work, the same on a provider and on the coordinator that checks it.

A `Probe` names a few middle layers, a batch and a seed: both sides load those layers, prefill
`batch` sessions with hidden states drawn from the seed and decode a warm-up step or two (untimed),
then (on `ProbeRun`, with a second seed only sent when the timed part starts) run `steps` batched
decode steps. A run draws its inputs once, steps + batch - 1 rows, and step t gives session i row
t + i: drawing a row a session a step (before) cost ~0.9 ms a step at batch 32 of the 8B shape's width
on a CPU core, more than four layers' work on an H200, and the probe timed the draw. The provider
returns the last step's output; the coordinator, which times the run with its own clock, recomputes
it (coordinator/admission.py, `expected_answers`). A prepared probe answers up to `RUNS` runs,
each continuing the sessions where the last left them. Inputs are drawn on the CPU in float32 so
both sides draw the same.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from node.runtime import ShardRuntime
from node.shard import Shard
from wire.messages import MAX_PROBE_STEPS, Probe, ProbeRun

WARM_UP_STEPS = 2  # decode steps of the whole batch after the prefill, before the timed run
# Timed runs one prepared probe answers: long and short ones, two of each; the coordinator keeps the
# fastest of each length, as anything else on the machine (another process loading its weights, say)
# can only slow a run down
RUNS = 4


def probe_inputs(seed: int, rows: int, hidden: int) -> torch.Tensor:
    """(rows, hidden) float32 from `seed`: unit-RMS rows, like a normalised hidden state."""
    return torch.randn(rows, hidden, generator=torch.Generator().manual_seed(seed))


def _prompt_rows(probe: Probe, hidden: int) -> tuple[torch.Tensor, ...]:
    """Each session's prefilled rows, (tokens, hidden) apiece."""
    return probe_inputs(probe.seed, probe.batch * probe.tokens, hidden).split(probe.tokens)


def _step_rows(probe: Probe, hidden: int, run: ProbeRun | None = None) -> tuple[torch.Tensor, int]:
    """The inputs of a run's decode steps (None: the warm-up's) and how many steps: steps + batch - 1
    rows drawn at once, session i's input at step t being row t + i."""
    seed, steps = (probe.seed + 1, WARM_UP_STEPS) if run is None else (run.seed, run.steps)
    return probe_inputs(seed, steps + probe.batch - 1, hidden), steps


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
        for sid, rows in zip(self.sessions, _prompt_rows(probe, hidden)):
            self.runtime.prefill(sid, rows)
        # untimed decode steps first: a GPU's first decode pays for compiling and capturing the decode
        # path it serves with (fused kernels, CUDA graphs), which the timed run then replays; an honest
        # H200 measured ~300x slower than its claim without them, a false "misconduct"
        self._decode(*_step_rows(probe, hidden))

    def run(self, run: ProbeRun) -> torch.Tensor:
        """`run.steps` decode steps of the whole batch; the last step's output (B, D) in float32."""
        if not self.runs_left:
            raise ValueError(f"a probe answers {RUNS} runs")
        self.runs_left -= 1
        return self._decode(*_step_rows(self.probe, self.runtime.config.hidden_size, run))

    def _decode(self, xs: torch.Tensor, steps: int) -> torch.Tensor:
        out = None
        for step in range(steps):  # session i's input at this step: row step + i
            rows = xs[step:step + len(self.sessions)]
            # each step's output to the host, as a serving stage hands its output on: the timed run
            # holds a step's whole cost (a GPU's launches would otherwise overlap the next step's)
            out = self.runtime.decode([(sid, rows[i:i + 1]) for i, sid in enumerate(self.sessions)]).to("cpu")
        return out.float().clone()


def expected_answers(model_dir: str | Path, probe: Probe, runs: list[ProbeRun]) -> list[torch.Tensor]:
    """What `ProbeWork.run` answers to each of `runs` in turn, on the CPU in float32, by one prefill:
    a session's decode steps are the rows of one causal sequence, so its whole sequence goes through
    the layers as one matrix (the coordinator's check took as long as the provider's timed runs,
    step by step; this is ~2x cheaper on a CPU and reads the weights once)."""
    shard = Shard(probe.model, probe.start, probe.end, probe.n_layers)
    length = probe.tokens + WARM_UP_STEPS + sum(run.steps for run in runs)  # a session's rows
    runtime = ShardRuntime(model_dir, shard, max_sessions=probe.batch, max_seq_len=length)
    hidden = runtime.config.hidden_size
    draws = [_step_rows(probe, hidden)] + [_step_rows(probe, hidden, run) for run in runs]
    sequences = []  # session i: its prompt, then row t + i of each draw's t-th step
    for i, prompt in enumerate(_prompt_rows(probe, hidden)):
        sequences.append((f"probe{i}", torch.cat([prompt] + [xs[i:i + steps] for xs, steps in draws])))
    out = runtime.prefill_many(sequences).view(probe.batch, length, hidden)
    last_rows = list(itertools.accumulate([probe.tokens + WARM_UP_STEPS - 1] + [run.steps for run in runs]))[1:]
    return [out[:, row].clone() for row in last_rows]
