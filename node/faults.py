"""Faults a dishonest provider might commit, injected on purpose to test the auditors. Off unless asked.

    fault = Fault.parse("skip")          # None for None / "" (an honest stage)
    fault.install(runtime)               # alters a loaded ShardRuntime in place
    out = fault.perturb(out)             # each step output the stage sends (hidden states)
    logits = fault.perturb_last_hidden(runtime)  # last stage: after a step, before sampling

Kinds:
- noise[:rel]      Gaussian noise of `rel` x the row's RMS (default 1e-2) on every output row; on
                   the last stage on the hidden state before the head, whose logits are recomputed.
                   Deterministic: a generator seeded by `seed`, advanced step by step.
- skip             runs only the first half of its layers (floor(n/2); at least one skipped).
- wrong-model      its layers' weights replaced by a different model of the same shape: a seeded
                   random init, each tensor Gaussian with that tensor's own mean and std.
- lazy             runs none of its layers: echoes its input (stage 0 returns the embeddings).
- bad-verifier     serves honestly, but lies as a verifier (`lies_as_verifier`).
- refuse           loads its shard, then refuses every step (`refuses_steps`): a broken stage, for
                   testing how the pool takes it out of the plan.
- crash            loads its shard, then fails every step with an error that is no refusal (as a
                   device fault or a bug would, `crashes_steps`): the stage still says so at once.
- inflate-profile[:factor]  serves honestly, but signs a profile claiming `factor` x (default 1000)
                   its measured memory bandwidth and matmul rate (the planner must not believe it).
Cheaper or sloppier copies of the work, on every layer of the range unless said otherwise:
- int8             linear weights rounded to 8 bits, one absmax scale per output channel.
- fp8              linear weights rounded to float8_e4m3, one absmax scale per tensor.
- int4             linear weights rounded to 4 bits, one absmax scale per group of 32 inputs.
- tamper           every weight (norms too) x (1 + 1e-3 N(0, 1)), seeded.
- skip-layer       one layer skipped: the middle one of the range.
- window           attention sees only the last WINDOW_TOKENS tokens (itself included).
- token            stage 0: the first token of every prefill step (T > 1) embedded as the next id.
- other-model      another model's layers: as wrong-model, from another seed.
Skipped layers are replaced by an identity module with the layer's signature, so the KV-cache
bookkeeping (slots, positions) is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

FAULT_KINDS = ("noise", "skip", "wrong-model", "lazy", "bad-verifier", "refuse", "crash", "inflate-profile",
               "int8", "fp8", "int4", "tamper", "skip-layer", "window", "token", "other-model")
QUANTIZED_KINDS = ("int8", "fp8", "int4")
DEFAULT_NOISE_REL = 1e-2
TAMPER_REL = 1e-3
WINDOW_TOKENS = 64
INT4_GROUP = 32
FP8_MAX = 448.0  # largest finite float8_e4m3fn
DEFAULT_INFLATE_FACTOR = 1000.0


def quantize(w: torch.Tensor, kind: str) -> torch.Tensor:
    """`w` (out, in) rounded the way a cheaper copy would hold it, dequantized back to float32."""
    w = w.float()
    if kind == "int8":
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 127  # (out, 1)
        return (w / scale).round().clamp(-127, 127) * scale
    if kind == "int4":
        out, n_in = w.shape
        g = w.reshape(out, -1, INT4_GROUP) if n_in % INT4_GROUP == 0 else w[:, None, :]  # (out, groups, 32)
        scale = g.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30) / 7
        return ((g / scale).round().clamp(-8, 7) * scale).reshape(out, n_in)
    if kind == "fp8":
        scale = w.abs().amax().clamp_min(1e-30) / FP8_MAX
        return (w / scale).to(torch.float8_e4m3fn).float() * scale
    raise ValueError(f"no quantizer {kind!r}")


class WindowedAttention(nn.Module):
    """An Attention whose every query sees only the last `window` tokens up to itself."""

    def __init__(self, attn: nn.Module, window: int):
        super().__init__()
        self.attn, self.window = attn, window

    def forward(self, x, cos, sin, k_cache, v_cache, write, read, mask, groups=None):
        if groups is not None:  # a ragged step: each group's mask is narrowed alike
            groups = [replace(g, mask=self._narrow(g.mask, (g.hi - g.lo) if g.batch == 1 else 1, x.device))
                      for g in groups]
            return self.attn(x, cos, sin, k_cache, v_cache, write, read, mask, groups)
        return self.attn(x, cos, sin, k_cache, v_cache, write, read, self._narrow(mask, x.shape[1], x.device))

    def _narrow(self, mask, T, device):
        if mask is None:  # a fresh prefill: plain causal over T tokens
            mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]
        # masks here are a prefix of True per row (causal): keep only its last `window` entries
        from_end = mask.flip(-1).cumsum(-1).flip(-1)  # (B, 1, T, L): True entries at or after each key
        return mask & (from_end <= self.window)


class SwappedTokenEmbedding(nn.Module):
    """An embedding that embeds the first token of every step as the next id of the vocabulary."""

    def __init__(self, embed: nn.Embedding):
        super().__init__()
        self.embed = embed

    @property
    def weight(self) -> torch.Tensor:  # a tied head still reads the true matrix
        return self.embed.weight

    def forward(self, ids):  # (B, T)
        if ids.shape[1] > 1:  # prefill steps only; decode rows pass unchanged
            ids = ids.clone()
            ids[:, 0] = (ids[:, 0] + 1) % self.embed.num_embeddings
        return self.embed(ids)


class SkippedLayer(nn.Module):
    """Stands in for a DecoderLayer and does nothing: same forward signature, returns its input
    (and commits to updates of nothing)."""

    def forward(self, x, cos, sin, k_cache, v_cache, write, read, mask, trace=None, groups=None):
        if trace is not None:
            trace += (torch.zeros_like(x), torch.zeros_like(x))
        return x


def _through_modules(runtime) -> None:
    """Steps through the (altered) modules: the CUDA graphs captured the real layers, and the fused
    ops that decode and prefill with read the real layers' weights."""
    runtime.graphs = None
    runtime.fused_rows = None


@dataclass
class Fault:
    kind: str
    noise_rel: float = DEFAULT_NOISE_REL
    seed: int = 0
    inflate_factor: float = DEFAULT_INFLATE_FACTOR
    _generator: torch.Generator | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {self.kind!r}; known: {', '.join(FAULT_KINDS)}")
        if not (self.noise_rel > 0 and self.noise_rel < 1e3):
            raise ValueError(f"noise size must be in (0, 1000), got {self.noise_rel}")
        if not (1 <= self.inflate_factor <= 1e9):
            raise ValueError(f"inflate factor must be in [1, 1e9], got {self.inflate_factor}")

    @classmethod
    def parse(cls, kind: str | None, seed: int = 0) -> "Fault | None":
        """"noise", "noise:1e-3", "skip", "inflate-profile:1000", ...; None or "" for no fault."""
        if not kind:
            return None
        name, _, arg = kind.partition(":")
        if name not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; known: {', '.join(FAULT_KINDS)} (noise takes ':<relative size>', "
                             f"inflate-profile ':<factor>')")
        if arg and name not in ("noise", "inflate-profile"):
            raise ValueError(f"fault {name!r} takes no argument, got {kind!r}")
        try:
            value = float(arg) if arg else None
        except ValueError:
            raise ValueError(f"the argument of {name} {arg!r} is not a number") from None
        if name == "inflate-profile":
            return cls(name, seed=seed, inflate_factor=DEFAULT_INFLATE_FACTOR if value is None else value)
        return cls(name, noise_rel=DEFAULT_NOISE_REL if value is None else value, seed=seed)

    @property
    def lies_as_verifier(self) -> bool:
        return self.kind == "bad-verifier"

    @property
    def refuses_steps(self) -> bool:
        return self.kind == "refuse"

    @property
    def crashes_steps(self) -> bool:
        return self.kind == "crash"

    def verifier_report(self, honest_ok: bool) -> bool:
        """What this provider reports as a verifier, given the honest outcome of its comparison."""
        return not honest_ok if self.lies_as_verifier else honest_ok

    def inflate_profile(self, profile: dict) -> dict:
        """The profile this provider signs: every device's bandwidth and matmul rate x the factor."""
        if self.kind != "inflate-profile":
            return profile
        devices = [{**d, **{k: d[k] * self.inflate_factor for k in ("mem_bandwidth_gb_per_s", "matmul_tflops")
                            if isinstance(d.get(k), (int, float))}} for d in profile.get("devices", [])]
        return {**profile, "devices": devices}

    # -- serving --------------------------------------------------------------------------

    def install(self, runtime) -> None:
        """Alter a loaded ShardRuntime in place (noise and bad-verifier leave it as it is)."""
        layers = runtime.model.layers
        n = len(layers)
        if self.kind in ("skip", "lazy"):
            keep = n // 2 if self.kind == "skip" else 0
            for i in range(keep, n):
                layers[i] = SkippedLayer()
            _through_modules(runtime)
        elif self.kind == "skip-layer":
            layers[n // 2] = SkippedLayer()
            _through_modules(runtime)
        elif self.kind == "window":
            for layer in layers:
                layer.attn = WindowedAttention(layer.attn, WINDOW_TOKENS)
            _through_modules(runtime)
        elif self.kind == "token":
            if runtime.model.embed is None:
                raise ValueError("the 'token' fault needs stage 0 (it changes an input token)")
            runtime.model.embed = SwappedTokenEmbedding(runtime.model.embed)
            _through_modules(runtime)
        elif self.kind in QUANTIZED_KINDS or self.kind == "tamper":
            generator = torch.Generator().manual_seed(self.seed)
            with torch.no_grad():
                for layer in layers:
                    for name, p in layer.named_parameters():
                        if self.kind == "tamper":
                            noise = torch.randn(p.shape, generator=generator).to(p.device)
                            fake = p.float() * (1 + TAMPER_REL * noise)
                        elif p.dim() == 2:  # linear weights; norms and biases stay
                            fake = quantize(p, self.kind)
                        else:
                            continue
                        p.copy_(fake.to(p.dtype))  # in place: CUDA graphs keep pointing at p
        elif self.kind in ("wrong-model", "other-model"):
            generator = torch.Generator().manual_seed(self.seed + (1 << 20 if self.kind == "other-model" else 0))
            with torch.no_grad():
                for layer in layers:
                    for p in layer.parameters():
                        mean, std = p.float().mean(), p.float().std() if p.numel() > 1 else torch.tensor(0.0)
                        fake = (torch.randn(p.shape, generator=generator) * std.cpu() + mean.cpu()).to(p.device)
                        p.copy_(fake.to(p.dtype))  # in place: CUDA graphs keep pointing at p

    def perturb(self, out: torch.Tensor) -> torch.Tensor:
        """A step output (rows of hidden states) as the faulty stage sends it."""
        if self.kind != "noise":
            return out
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        x = out.float()
        rms = x.pow(2).mean(-1, keepdim=True).sqrt()  # (T, 1)
        noise = torch.randn(x.shape, generator=self._generator).to(x.device)
        return (x + self.noise_rel * rms * noise).to(out.dtype)

    def perturb_last_hidden(self, runtime, last_only: bool = False, rows: list[int] | None = None) -> torch.Tensor | None:
        """On the last stage, after a step: perturb `runtime.last_hidden` (what the stage keeps as its
        claimed output) and return the logits of the perturbed rows (only the last row if
        `last_only`, as prefill returns; only `rows` if given, as a prefill of several sessions
        returns), or None when this fault leaves the outputs alone."""
        if self.kind != "noise":
            return None
        runtime.last_hidden = self.perturb(runtime.last_hidden)
        h = runtime.last_hidden[-1:] if last_only else runtime.last_hidden
        h = h if rows is None else runtime.last_hidden[rows]
        with torch.inference_mode():
            return runtime._head(h)
