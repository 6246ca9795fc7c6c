"""Every message that crosses a process boundary, defined once: fields, limits, encode, decode, validate.

Data path of one step: the coordinator sends a `Step` (token ids) to stage 0 on PROTO_STAGE; each
stage runs its layers and sends a `Step` (hidden states) on to the next; the last stage samples and
sends a `Result` to the coordinator on PROTO_RESULT. A finished request's sessions are freed by a
`Close` that follows the same path; each stage then signs a receipt (`Receipts`, on PROTO_CONTROL).

Control: a provider `Register`s a signed profile, sends a `Heartbeat` every second, asks for its
`AccountQuery` -> `AccountInfo`, reports a `Failed` step, and `Leave`s; the coordinator answers each
with an `Ack`. The coordinator `Assign`s a shard (or `Unassign`s it, or `Ping`s) on PROTO_ASSIGN, where
it also times a newcomer: a `Probe` prepares layers and sessions, a timed `ProbeRun` answers a
`ProbeResult` (coordinator/admission.py). A `LinkTest` asks a provider to time its hop to another provider
(node/link_test.py): it sends `LinkPayload`s on PROTO_LINK_TEST, each answered with an `Ack`, and answers
the coordinator a `LinkMeasured`.

Audits (PROTO_AUDIT): the coordinator gives a verifier an `AuditTask`; the verifier sends the
audited stage an `AuditFetch` with the coordinator's ticket and gets `AuditData`; it answers the
coordinator an `AuditVerdict` (pass, fail, or could not check).

Each message is a frozen dataclass. `to_frame()` encodes it; `decode(frame)` (or `Cls.from_frame`)
checks the type, every field's type and every limit before anything is built from it, and raises
`MessageError` (a ValueError) with the reason otherwise. Versions on the wire are explicit: a
message changes its VERSION when its fields change.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, ClassVar

import torch

from ledger.errors import ReceiptError
from ledger.receipts import StageReceipt
from wire.frames import Frame, MessageSpec, register_message

PROTO_CONTROL = "/meshpool/control/1"  # provider -> coordinator: register, heartbeat, leave, receipts
PROTO_ASSIGN = "/meshpool/assign/1"  # coordinator -> provider: load a shard, or drop it
PROTO_STAGE = "/meshpool/stage/1"  # upstream -> stage: steps and closes, long-lived stream
PROTO_RESULT = "/meshpool/result/1"  # last stage -> coordinator: sampled tokens, long-lived stream
PROTO_AUDIT = "/meshpool/audit/1"  # coordinator -> verifier: tasks; verifier -> stage: retained tensors
PROTO_LINK_TEST = "/meshpool/linktest/1"  # provider -> provider: a timed transfer on the path stage frames take

# Limits, each checked on decode before a value is built.
MAX_BATCH_SESSIONS = 256  # sessions in one step
MAX_SESSION_ID_CHARS = 64
MAX_REQUEST_ID_CHARS = 128
MAX_PEER_ID_CHARS = 128
MAX_HARDWARE_CLASS_CHARS = 256
MAX_ADDRS = 8  # multiaddrs a peer announces
MAX_ADDR_CHARS = 512
MAX_REASON_CHARS = 2000
MAX_STAGES_TIMED = 64  # stages a step passes, each appending its compute time
MAX_RECEIPTS_PER_FRAME = 64
MAX_PROFILE_BYTES = 16 * 1024  # a registration's signed body
MAX_METRICS = 32  # entries in an audit verdict's metrics
MAX_CONTEXT_TOKENS = 1 << 20  # positions a session can claim
# "chunk": a part of a prompt prefilled ahead of the rest, so that a long prompt shares the pipeline
# with running decodes; its last stage samples nothing (the step that feeds the prompt's end does)
STEP_KINDS = ("prefill", "chunk", "decode")
SERVING_DTYPES = ("float32", "bfloat16")  # precisions the coordinator may assign a stage
AUDIT_OUTCOMES = ("pass", "fail", "unchecked")  # unchecked: the verifier could not check, nobody is to blame


class MessageError(ValueError):
    """A frame that is not a valid message: wrong type, missing or mistyped field, over a limit."""


def _require(ok: bool, reason: str) -> None:
    if not ok:
        raise MessageError(reason)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: Any, name: str, max_chars: int, allow_empty: bool = True) -> None:
    _require(isinstance(value, str) and (allow_empty or value) and len(value) <= max_chars,
             f"{name} must be a string of {0 if allow_empty else 1}..{max_chars} characters")


def _texts(values: tuple, name: str, max_items: int, max_chars: int, allow_empty: bool = False) -> None:
    _require(len(values) <= max_items, f"{name}: at most {max_items} entries, got {len(values)}")
    for v in values:
        _text(v, f"each of {name}", max_chars, allow_empty)


def _count(value: Any, name: str, upper: int = 2**63) -> None:
    _require(_is_int(value) and 0 <= value < upper, f"{name} must be an integer in [0, {upper})")


# -- values carried inside messages -----------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    """How the last stage picks a session's next token (verification/sampling.py applies it)."""

    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and 0.0 <= self.temperature <= 100.0):
            raise MessageError(f"temperature must be in [0, 100], got {self.temperature}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise MessageError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (_is_int(self.seed) and 0 <= self.seed < 2**63):
            raise MessageError(f"seed must be in [0, 2**63), got {self.seed}")

    def encode(self) -> list:
        return [float(self.temperature), float(self.top_p), self.seed]

    @classmethod
    def decode(cls, value: Any) -> "SamplingParams":
        _require(isinstance(value, (list, tuple)) and len(value) == 3, "sampling is [temperature, top_p, seed]")
        temperature, top_p, seed = value
        _require(isinstance(temperature, (int, float)) and isinstance(top_p, (int, float))
                 and not isinstance(temperature, bool) and not isinstance(top_p, bool),
                 "sampling temperature and top_p are numbers")
        return cls(float(temperature), float(top_p), seed)


@dataclass(frozen=True)
class Stage:
    """One stage of a pipeline: the provider `peer_id` serves layers [start, end)."""

    peer_id: str
    start: int  # first layer, inclusive
    end: int  # last layer, exclusive
    dtype: str = ""  # the precision it was assigned ("" before the pool assigns it)

    @property
    def n_layers(self) -> int:
        return self.end - self.start


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_dtype(name: Any) -> None:
    _require(name in SERVING_DTYPES, f"dtype must be one of {SERVING_DTYPES}, got {name!r}")


def check_layer_range(start: Any, end: Any, n_layers: Any) -> None:
    _require(_is_int(start) and _is_int(end) and _is_int(n_layers) and 0 <= start < end <= n_layers <= 4096,
             f"layer range [{start}, {end}) of {n_layers} layers is not a valid range")


# -- the message base -------------------------------------------------------------------------

_FIELD_TYPES = {str: str, int: int, bool: bool, bytes: bytes, float: (int, float), dict: dict}
_BY_TYPE: dict[tuple[str, int], type["Message"]] = {}


def _wire_type(hint: Any) -> type | tuple[type, ...]:
    """The msgpack type a dataclass field travels as: tuples and nested values travel as lists."""
    if hint in _FIELD_TYPES:
        return _FIELD_TYPES[hint]
    if typing.get_origin(hint) is tuple or hint in (SamplingParams,):
        return list
    raise TypeError(f"no wire type for {hint!r}")


class Message:
    """Base of every message: subclasses are frozen dataclasses with TYPE and VERSION.

    Plain fields (str, int, bool, bytes, float, dict, tuples of str/int/float) travel as they are;
    SamplingParams (alone or in tuples) travel as lists; a subclass with tensors or other nested
    values overrides `_encode_fields` / `_decode_fields`."""

    TYPE: ClassVar[str]
    VERSION: ClassVar[int] = 1
    TENSORS: ClassVar[tuple[int, int]] = (0, 0)  # (min, max) tensors in the frame

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "TYPE" not in cls.__dict__:
            return
        dataclass(frozen=True)(cls)
        hints = typing.get_type_hints(cls)
        cls._hints = {f.name: hints[f.name] for f in fields(cls) if f.name not in cls._tensor_fields()}
        cls._decoders = {name: _field_decoder(name, hint) for name, hint in cls._hints.items()}
        register_message(MessageSpec(cls.TYPE, cls.VERSION, {n: _wire_type(h) for n, h in cls._hints.items()},
                                     min_tensors=cls.TENSORS[0], max_tensors=cls.TENSORS[1]))
        _BY_TYPE[(cls.TYPE, cls.VERSION)] = cls

    @classmethod
    def _tensor_fields(cls) -> tuple[str, ...]:
        return ()

    def validate(self) -> None:
        """Limits beyond the field types; raises MessageError."""

    def to_frame(self) -> Frame:
        return Frame(self.TYPE, self.VERSION, self._encode_fields(), self._tensors())

    def _encode_fields(self) -> dict:
        return {name: _encode_value(getattr(self, name)) for name in self._hints}

    def _tensors(self) -> list[torch.Tensor]:
        return []

    @classmethod
    def _decode_fields(cls, f: dict, tensors: list[torch.Tensor]) -> dict:
        return _decode_plain(cls._decoders, f)

    @classmethod
    def from_frame(cls, frame: Frame) -> "Message":
        _require(frame.type == cls.TYPE and frame.version == cls.VERSION,
                 f"expected {cls.TYPE} v{cls.VERSION}, got {frame.type} v{frame.version}")
        lo, hi = cls.TENSORS
        _require(lo <= len(frame.tensors) <= hi, f"{cls.TYPE} carries {lo}..{hi} tensors, got {len(frame.tensors)}")
        _require(isinstance(frame.fields, dict) and all(n in frame.fields for n in cls._hints),
                 f"{cls.TYPE} lacks a field of {sorted(cls._hints)}")
        try:
            message = cls(**cls._decode_fields(frame.fields, list(frame.tensors)))
        except MessageError:
            raise
        except (TypeError, ValueError, KeyError) as exc:
            raise MessageError(f"malformed {cls.TYPE}: {exc}") from exc
        message.validate()
        return message


def _encode_value(value: Any) -> Any:
    if isinstance(value, SamplingParams):
        return value.encode()
    if isinstance(value, tuple):
        return [_encode_value(v) for v in value]
    return value


def _field_decoder(name: str, hint: Any) -> Callable[[Any], Any]:
    """How one field is checked and turned from its wire form into its value: fields strictly
    typed (no bool where a number is wanted); tuples from lists; SamplingParams from their
    [temperature, top_p, seed] lists, at most MAX_BATCH_SESSIONS of them. Built once per class:
    reading the type hints again for every field of every frame cost most of a hop's decode."""
    if hint is SamplingParams:
        return SamplingParams.decode
    if typing.get_origin(hint) is tuple and typing.get_args(hint)[0] is SamplingParams:
        def sampling_list(value):
            _require(isinstance(value, list) and len(value) <= MAX_BATCH_SESSIONS,
                     f"{name} is a list of at most {MAX_BATCH_SESSIONS} entries")
            return tuple(SamplingParams.decode(v) for v in value)
        return sampling_list
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if item not in _FIELD_TYPES:  # a nested value: its class overrides _decode_fields
            return _no_plain_decoder(name)
        kinds, bool_ok = _FIELD_TYPES[item], item is bool

        def plain_list(value):
            _require(isinstance(value, (list, tuple)), f"{name} must be a list")
            _require(all(isinstance(v, kinds) and (bool_ok or not isinstance(v, bool)) for v in value),
                     f"every entry of {name} must be {item.__name__}")
            return tuple(value)
        return plain_list
    kinds, bool_ok = _FIELD_TYPES[hint], hint is bool

    def plain(value):
        _require(isinstance(value, kinds) and (bool_ok or not isinstance(value, bool)), f"{name} must be {hint.__name__}")
        return value
    return plain


def _no_plain_decoder(name: str) -> Callable[[Any], Any]:
    def refuse(value):
        raise TypeError(f"{name} has no plain decoder")
    return refuse


def _decode_plain(decoders: dict[str, Callable[[Any], Any]], f: dict) -> dict:
    """The plain fields of a frame, each through its class's decoder (`_field_decoder`)."""
    return {name: decoder(f[name]) for name, decoder in decoders.items()}


def decode(frame: Frame, *expected: type[Message]) -> Message:
    """The message a frame holds; with `expected`, only one of those types is accepted."""
    cls = _BY_TYPE.get((frame.type, frame.version))
    _require(cls is not None, f"unknown message {frame.type!r} v{frame.version}")
    _require(not expected or cls in expected,
             f"unexpected {frame.type}; expected {' or '.join(e.TYPE for e in expected)}")
    return cls.from_frame(frame)


# -- control: provider -> coordinator ---------------------------------------------------------


class OneTensor(Message):
    """A message with one tensor, its field `x`."""

    TENSORS = (1, 1)

    @classmethod
    def _tensor_fields(cls) -> tuple[str, ...]:
        return ("x",)

    def _tensors(self) -> list[torch.Tensor]:
        return [self.x]

    @classmethod
    def _decode_fields(cls, f: dict, tensors: list) -> dict:
        return {**_decode_plain(cls._decoders, f), "x": tensors[0]}


class Ack(Message):
    TYPE = "pool.ack"
    ok: bool = True
    reason: str = ""

    def validate(self) -> None:
        _text(self.reason, "reason", MAX_REASON_CHARS)


def refuse(reason: str) -> Ack:
    return Ack(False, reason[:MAX_REASON_CHARS])


class Register(Message):
    TYPE = "pool.register"
    profile: dict
    addrs: tuple[str, ...]
    max_memory_bytes: int
    public_key: bytes
    signature: bytes

    def validate(self) -> None:
        _texts(self.addrs, "addrs", MAX_ADDRS, MAX_ADDR_CHARS)
        _require(_is_int(self.max_memory_bytes) and 0 < self.max_memory_bytes < 2**63, "max_memory_bytes must be > 0")
        _require(len(self.public_key) <= 64 and len(self.signature) <= 128, "key or signature too long")

    def signed_bytes(self, peer: str) -> bytes:
        """The exact bytes a provider signs and the coordinator verifies."""
        body = {"peer": peer, "profile": self.profile, "addrs": list(self.addrs),
                "max_memory_bytes": self.max_memory_bytes}
        data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        _require(len(data) <= MAX_PROFILE_BYTES, f"profile over {MAX_PROFILE_BYTES} bytes")
        return data


# How a provider holds its connection to a peer: "direct" (dialed, either way), "hole-punched" (a
# direct connection DCUtR made out of a relayed one) or "relayed" (through the relay only)
LINK_KINDS = ("direct", "hole-punched", "relayed")
MAX_LINKS = 8  # the peers a heartbeat reports links to: the next stages and the coordinator


class Heartbeat(Message):
    """A provider's beat, with how it holds its links to its next stages and the coordinator now
    (v2: link_peers, link_kinds, entries paired, each kind one of LINK_KINDS)."""

    TYPE = "pool.heartbeat"
    VERSION = 2
    peer: str
    link_peers: tuple[str, ...] = ()
    link_kinds: tuple[str, ...] = ()

    def validate(self) -> None:
        _texts(self.link_peers, "link_peers", MAX_LINKS, MAX_PEER_ID_CHARS)
        _require(len(self.link_kinds) == len(self.link_peers), "link_kinds must pair with link_peers")
        _require(all(k in LINK_KINDS for k in self.link_kinds), f"every link kind must be one of {LINK_KINDS}")
        _require(len(set(self.link_peers)) == len(self.link_peers), "a peer appears twice in link_peers")


class Leave(Message):
    TYPE = "pool.leave"
    peer: str


class AccountQuery(Message):
    """What the pool and the ledger say about the asking provider (for its status line)."""

    TYPE = "pool.account"
    peer: str


class AccountInfo(Message):
    TYPE = "pool.account_info"
    state: str
    balance_units: int
    reputation: int


class Failed(Message):
    """A stage that cannot run or forward a step tells the coordinator, naming the peer at fault."""

    TYPE = "stage.failed"
    pipeline: str
    step: int
    reason: str
    peer: str

    def validate(self) -> None:
        _text(self.reason, "reason", MAX_REASON_CHARS)


class Receipts(Message):
    """Stage -> coordinator after a close: the signed receipts of the requests it served."""

    TYPE = "stage.receipts"
    receipts: tuple[StageReceipt, ...]

    def _encode_fields(self) -> dict:
        return {"receipts": [r.to_dict() for r in self.receipts]}

    @classmethod
    def _decode_fields(cls, f: dict, tensors: list) -> dict:
        items = f["receipts"]
        _require(len(items) <= MAX_RECEIPTS_PER_FRAME, f"at most {MAX_RECEIPTS_PER_FRAME} receipts a frame")
        try:
            return {"receipts": tuple(StageReceipt.from_dict(d) if isinstance(d, dict) else None for d in items)}
        except (ReceiptError, TypeError) as exc:
            raise MessageError(f"malformed receipt: {exc}") from exc

    def validate(self) -> None:
        _require(all(isinstance(r, StageReceipt) for r in self.receipts), "every receipt must be a mapping")


# -- assignments: coordinator -> provider -----------------------------------------------------


class Retain(Message):
    """Coordinator -> stage, in answer to its receipts: the requests whose tensors it must keep for an
    audit; it may drop the others' now. The coordinator draws audits only once the stage has signed
    its receipts, so the stage learns nothing while it computes and cannot change what it committed."""

    TYPE = "stage.retain"
    request_ids: tuple[str, ...]

    def validate(self) -> None:
        _texts(self.request_ids, "request_ids", MAX_RECEIPTS_PER_FRAME, MAX_REQUEST_ID_CHARS)


class Assign(Message):
    """Serve layers [start, end) of `model` in `pipeline`, taking steps from `prev_peer` only and
    sending results to `next_peer` at `next_addrs` (the coordinator is the previous peer of stage 0
    and the next peer of the last stage)."""

    TYPE = "pool.assign"
    VERSION = 3
    pipeline: str
    model: str
    start: int
    end: int
    n_layers: int
    prev_peer: str
    next_peer: str
    next_addrs: tuple[str, ...]
    max_sessions: int
    max_seq_len: int
    dtype: str  # the precision the coordinator decided this stage serves in (SERVING_DTYPES)

    def validate(self) -> None:
        check_layer_range(self.start, self.end, self.n_layers)
        check_dtype(self.dtype)
        _text(self.prev_peer, "prev_peer", MAX_PEER_ID_CHARS, allow_empty=False)
        _text(self.next_peer, "next_peer", MAX_PEER_ID_CHARS, allow_empty=False)
        _texts(self.next_addrs, "next_addrs", MAX_ADDRS, MAX_ADDR_CHARS)
        _require(len(self.next_addrs) > 0, "next_addrs names at least one address of the next peer")
        _require(1 <= self.max_sessions <= MAX_BATCH_SESSIONS, f"max_sessions must be in 1..{MAX_BATCH_SESSIONS}")
        _require(1 <= self.max_seq_len <= MAX_CONTEXT_TOKENS, f"max_seq_len must be in 1..{MAX_CONTEXT_TOKENS}")

    def same_shard(self, other: "Assign") -> bool:
        keys = ("model", "start", "end", "n_layers", "max_sessions", "max_seq_len", "dtype")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


class Unassign(Message):
    TYPE = "pool.unassign"
    pipeline: str


class Ping(Message):
    TYPE = "pool.ping"


MAX_PROBE_LAYERS = 8
MAX_PROBE_TOKENS = 64  # prefilled per probe session
MAX_PROBE_STEPS = 64  # decode steps of one timed probe run


class Probe(Message):
    """Admission probe, part one (untimed): load layers [start, end) of `model` in `dtype` and
    prefill `batch` sessions of `tokens` positions each with inputs drawn from `seed`
    (node/probe.py). Answered with an Ack once ready for the timed part, `ProbeRun`."""

    TYPE = "pool.probe"
    model: str
    start: int
    end: int
    n_layers: int
    batch: int
    tokens: int
    seed: int
    dtype: str

    def validate(self) -> None:
        check_layer_range(self.start, self.end, self.n_layers)
        _require(0 < self.start and self.end < self.n_layers, "a probe runs middle layers (hidden states in and out)")
        _require(self.end - self.start <= MAX_PROBE_LAYERS, f"a probe runs at most {MAX_PROBE_LAYERS} layers")
        _require(1 <= self.batch <= MAX_BATCH_SESSIONS, f"batch must be in 1..{MAX_BATCH_SESSIONS}")
        _require(1 <= self.tokens <= MAX_PROBE_TOKENS, f"tokens must be in 1..{MAX_PROBE_TOKENS}")
        _count(self.seed, "seed")
        check_dtype(self.dtype)


class ProbeRun(Message):
    """Admission probe, part two (the coordinator times it): `steps` batched decode steps of the
    prepared sessions with inputs drawn from `seed`, which only now is known. Answered with a
    `ProbeResult` holding the last step's output, which the coordinator checks against its own
    computation: a provider cannot answer fast without doing the work."""

    TYPE = "pool.probe_run"
    VERSION = 2  # 2: a run's inputs are one draw of steps + batch - 1 rows, a window a step (node/probe.py)
    seed: int
    steps: int

    def validate(self) -> None:
        _count(self.seed, "seed")
        _require(1 <= self.steps <= MAX_PROBE_STEPS, f"steps must be in 1..{MAX_PROBE_STEPS}")


class ProbeResult(OneTensor):
    """Provider -> coordinator: the hidden states (batch, D) after the probe's last decode step."""

    TYPE = "pool.probe_result"
    seed: int
    x: torch.Tensor = field(repr=False, compare=False, default=None)

    def validate(self) -> None:
        _count(self.seed, "seed")
        _require(isinstance(self.x, torch.Tensor) and self.x.dim() == 2
                 and 0 < self.x.shape[0] <= MAX_BATCH_SESSIONS, "a probe result is one (batch, D) tensor")


# -- hop bandwidth: coordinator -> provider, provider -> provider --------------------------------

MAX_LINK_TEST_BYTES = 16 * 2**20  # one timed payload: a prefill's hidden states are this order
MAX_LINK_TEST_TRANSFERS = 8  # payloads timed in one test
LINK_PATHS = ("link", "libp2p")  # the frame link (node/transport/link.py), or the libp2p stream it falls back to


class LinkTest(Message):
    """Coordinator -> provider (PROTO_ASSIGN): time `transfers` payloads of `payload_bytes` to `peer`
    (dialed at `addrs`) on the path this provider's stage frames to it would take; answered with a
    `LinkMeasured` (or a refusal saying why not)."""

    TYPE = "pool.link_test"
    peer: str
    addrs: tuple[str, ...]
    payload_bytes: int
    transfers: int

    def validate(self) -> None:
        _text(self.peer, "peer", MAX_PEER_ID_CHARS, allow_empty=False)
        _texts(self.addrs, "addrs", MAX_ADDRS, MAX_ADDR_CHARS)
        _require(1 <= self.payload_bytes <= MAX_LINK_TEST_BYTES, f"payload_bytes must be in 1..{MAX_LINK_TEST_BYTES}")
        _require(1 <= self.transfers <= MAX_LINK_TEST_TRANSFERS, f"transfers must be in 1..{MAX_LINK_TEST_TRANSFERS}")


class LinkPayload(OneTensor):
    """Provider -> provider (PROTO_LINK_TEST): `x`, a 1-D float32 tensor of zeros whose bytes are the
    payload (empty: a round trip), answered with an Ack once it is all received."""

    TYPE = "pool.link_payload"
    x: torch.Tensor = field(repr=False, compare=False, default=None)

    def validate(self) -> None:
        _require(isinstance(self.x, torch.Tensor) and self.x.dim() == 1 and self.x.dtype == torch.float32
                 and self.x.numel() * 4 <= MAX_LINK_TEST_BYTES, f"a link payload is one 1-D float32 tensor of at "
                 f"most {MAX_LINK_TEST_BYTES} bytes")


class LinkMeasured(Message):
    """Provider -> coordinator, the answer to a LinkTest: the least round trip of an empty payload and
    the least time of one payload of `payload_bytes` until its Ack, on `path` (LINK_PATHS)."""

    TYPE = "pool.link_measured"
    peer: str
    payload_bytes: int
    rtt_ms: float
    transfer_ms: float
    path: str

    def validate(self) -> None:
        _text(self.peer, "peer", MAX_PEER_ID_CHARS, allow_empty=False)
        _require(1 <= self.payload_bytes <= MAX_LINK_TEST_BYTES, f"payload_bytes must be in 1..{MAX_LINK_TEST_BYTES}")
        for name in ("rtt_ms", "transfer_ms"):
            value = getattr(self, name)
            _require(math.isfinite(value) and 0 < value <= 3_600_000, f"{name} must be in (0, 3600000]")
        _require(self.path in LINK_PATHS, f"path must be one of {LINK_PATHS}")


# -- the data path ----------------------------------------------------------------------------


class Step(OneTensor):
    """One step of a pipeline: `x` is token ids (rows,) into stage 0 and hidden states (rows, D) after,
    each session's rows in turn. `kind`: "prefill" (the new tokens of one or more sessions, the last
    stage samples one token after each session's rows; a session that is already decoding may ride
    along with its one token), "chunk" (one session's tokens with more to come: nothing sampled)
    or "decode" (one token per session). `positions`: tokens each session holds before this step;
    `lengths`: rows each session feeds (empty: one each for a decode, all of them for one session);
    `stage_ms`: the compute time of each stage the step went through so far (each stage appends
    its own; for metrics only)."""

    TYPE = "stage.step"
    VERSION = 4  # 4: `lengths`, several sessions' prompts in one prefill step
    pipeline: str
    step: int
    kind: str
    sessions: tuple[str, ...]
    positions: tuple[int, ...]
    sampling: tuple[SamplingParams, ...]
    stage_ms: tuple[float, ...]
    x: torch.Tensor = field(repr=False, compare=False, default=None)
    lengths: tuple[int, ...] = ()

    @property
    def rows(self) -> tuple[int, ...]:
        """Rows of `x` each session feeds, in the order of `sessions`."""
        if self.lengths:
            return self.lengths
        return (1,) * len(self.sessions) if self.kind == "decode" else (self.x.shape[0],)

    def validate(self) -> None:
        _require(self.kind in STEP_KINDS, f"unknown step kind {self.kind!r}")
        _count(self.step, "step")
        n = len(self.sessions)
        _require(0 < n <= MAX_BATCH_SESSIONS and len(self.positions) == n and len(self.sampling) == n,
                 f"sessions, positions and sampling must be equally long, 1..{MAX_BATCH_SESSIONS} entries")
        _texts(self.sessions, "sessions", MAX_BATCH_SESSIONS, MAX_SESSION_ID_CHARS)
        _require(len(set(self.sessions)) == n, "a session appears twice in one step")
        _require(all(0 <= p < MAX_CONTEXT_TOKENS for p in self.positions),
                 f"positions are integers in [0, {MAX_CONTEXT_TOKENS})")
        _require(self.kind != "chunk" or n == 1, "a chunk step carries one session")
        _require(bool(self.lengths) or self.kind == "decode" or n == 1,
                 "a prefill step of several sessions says how many rows each feeds (lengths)")
        _require(len(self.stage_ms) < MAX_STAGES_TIMED, f"a step passes at most {MAX_STAGES_TIMED} stages")
        _require(all(math.isfinite(ms) for ms in self.stage_ms), "stage_ms are finite numbers")
        _require(isinstance(self.x, torch.Tensor) and self.x.dim() >= 1 and self.x.shape[0] > 0,
                 "a step carries one non-empty tensor")
        _require(self.kind != "decode" or self.x.shape[0] == n,
                 f"decode step of {n} sessions carries {self.x.shape[0]} rows")
        if self.lengths:
            _require(len(self.lengths) == n and all(_is_int(k) and k > 0 for k in self.lengths),
                     "lengths: one positive row count per session")
            _require(sum(self.lengths) == self.x.shape[0],
                     f"lengths add up to {sum(self.lengths)} rows, the step carries {self.x.shape[0]}")
            _require(self.kind != "decode" or all(k == 1 for k in self.lengths), "a decode step feeds one row a session")

    def forward(self, x: torch.Tensor, compute_ms: float) -> "Step":
        """This step as the next stage receives it: our output, our compute time appended."""
        return replace(self, x=x, stage_ms=(*self.stage_ms, round(compute_ms, 3)))


class Close(Message):
    """Free these sessions; `requests` names each one's request ("" for none): a stage seals what it
    retained of that session under the request id and signs the request's receipt."""

    TYPE = "stage.close"
    VERSION = 2
    pipeline: str
    sessions: tuple[str, ...]
    requests: tuple[str, ...]

    def validate(self) -> None:
        _require(len(self.requests) == len(self.sessions), "one request id per session")
        _texts(self.sessions, "sessions", MAX_BATCH_SESSIONS, MAX_SESSION_ID_CHARS)
        _texts(self.requests, "requests", MAX_BATCH_SESSIONS, MAX_REQUEST_ID_CHARS, allow_empty=True)


class Result(Message):
    """Last stage -> coordinator: the token sampled for each session of a step (none for a chunk)."""

    TYPE = "stage.result"
    VERSION = 3
    pipeline: str
    step: int
    sessions: tuple[str, ...]
    tokens: tuple[int, ...]
    stage_ms: tuple[float, ...]

    def validate(self) -> None:
        _require(len(self.tokens) in (0, len(self.sessions)) and len(self.sessions) <= MAX_BATCH_SESSIONS,
                 "one token per session, or none (a chunk)")
        _require(all(t >= 0 for t in self.tokens), "tokens are non-negative")
        _require(len(self.stage_ms) <= MAX_STAGES_TIMED, f"at most {MAX_STAGES_TIMED} stage times")


# -- audits -----------------------------------------------------------------------------------


def ticket_bytes(request_id: str, verifier: str, expires_ms: int) -> bytes:
    """What the coordinator signs to let `verifier` fetch the tensors retained for `request_id`."""
    return b"meshpool-audit-ticket/1\x00" + json.dumps([request_id, verifier, expires_ms]).encode()


class AuditTask(Message):
    """Coordinator -> verifier: audit stage [start, end) that `subject` served for `request_id`. The
    hashes are the receipt's; `ticket` (the coordinator's signature over request, verifier, expiry)
    lets the verifier fetch the subject's retained tensors."""

    TYPE = "audit.task"
    VERSION = 5  # 5: layers_hash commits to the layer trace (verification/trace.py), not the boundaries
    audit_id: str
    request_id: str
    subject: str
    subject_addrs: tuple[str, ...]
    model: str
    start: int
    end: int
    n_layers: int
    input_hash: str
    output_hash: str
    layers_hash: str  # the receipt's commitment to the layer trace (verification/trace.py)
    dtype: str  # the precision the stage was assigned and signed for
    hardware_class: str  # the class the stage served on (its profile's): a verifier of that class re-runs its recipe
    sampling: SamplingParams
    expires_ms: int
    ticket: bytes

    def validate(self) -> None:
        check_layer_range(self.start, self.end, self.n_layers)
        _text(self.request_id, "request_id", MAX_REQUEST_ID_CHARS, allow_empty=False)
        _texts(self.subject_addrs, "subject_addrs", MAX_ADDRS, MAX_ADDR_CHARS)
        _text(self.hardware_class, "hardware_class", MAX_HARDWARE_CLASS_CHARS)
        _count(self.expires_ms, "expires_ms")


class AuditVerdict(Message):
    """Verifier -> coordinator. `outcome`: pass, fail, or unchecked (it could not check: the tensors
    could not be fetched, the task was malformed, it holds another model). Only a fail blames the
    audited stage; an unchecked verdict blames nobody."""

    TYPE = "audit.verdict"
    VERSION = 2
    audit_id: str
    outcome: str
    reason: str
    metrics: dict

    def validate(self) -> None:
        _require(self.outcome in AUDIT_OUTCOMES, f"outcome must be one of {AUDIT_OUTCOMES}")
        _text(self.reason, "reason", MAX_REASON_CHARS)
        _require(len(self.metrics) <= MAX_METRICS, f"at most {MAX_METRICS} metrics")


MAX_AUDIT_PARTS = 4096  # an 8B stage's trace of 4,096 tokens is 130 parts of AUDIT_PART_BYTES


class AuditFetch(Message):
    """Verifier (or coordinator) -> audited stage: hand over part `part` of what you retained for
    this request (AuditData: a trace outgrows one frame)."""

    TYPE = "audit.fetch"
    VERSION = 2  # 2: `part`
    request_id: str
    expires_ms: int
    ticket: bytes
    part: int = 0

    def validate(self) -> None:
        _text(self.request_id, "request_id", MAX_REQUEST_ID_CHARS, allow_empty=False)
        _count(self.expires_ms, "expires_ms")
        _count(self.part, "part", MAX_AUDIT_PARTS)


class AuditData(Message):
    """Part `part` of the `parts` of what a stage retained: part 0 its input, then its output
    ([hidden] or, from a last stage, [hidden, positions, tokens]); parts 1 on, when it kept its
    layer trace (2L + 1, T, D), consecutive slices of the trace's rows, in order."""

    TYPE = "audit.data"
    VERSION = 4  # 3: the layer trace in place of the boundaries; 4: in parts
    TENSORS = (1, 4)
    request_id: str
    part: int = 0
    parts: int = 1
    tensors: tuple = field(repr=False, compare=False, default=())

    def validate(self) -> None:
        _count(self.parts, "parts", MAX_AUDIT_PARTS + 1)
        _require(0 <= self.part < self.parts, f"part {self.part} of {self.parts}")

    @classmethod
    def _tensor_fields(cls) -> tuple[str, ...]:
        return ("tensors",)

    def _tensors(self) -> list[torch.Tensor]:
        return list(self.tensors)

    @classmethod
    def _decode_fields(cls, f: dict, tensors: list) -> dict:
        _text(f["request_id"], "request_id", MAX_REQUEST_ID_CHARS)
        return {"request_id": f["request_id"], "part": f["part"], "parts": f["parts"], "tensors": tuple(tensors)}
