"""Frames: round trips, every limit and malformation, and random garbage."""

from __future__ import annotations

import random
import struct

import msgpack
import pytest
import torch

from wire.frames import (
    DTYPES,
    MAGIC,
    PREFIX,
    PREFIX_BYTES,
    Frame,
    FrameError,
    FrameLimits,
    MessageSpec,
    decode_frame,
    encode_frame,
    encode_frame_parts,
    parse_prefix,
    register_message,
    validate_message,
)

ALL_DTYPES = [dt for dt, _ in DTYPES.values()]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bit patterns (NaNs, infs, subnormals included) of the given dtype."""
    g = torch.Generator().manual_seed(seed)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (max(1, int(torch.tensor(shape).prod().item())) * itemsize,), dtype=torch.uint8, generator=g)
    n = int(torch.tensor(shape).prod().item()) if shape else 1
    return raw[: n * itemsize].view(dtype).reshape(shape)


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def raw_frame(header: object, payload: bytes = b"", *, header_bytes: bytes | None = None,
              payload_len: int | None = None, magic: bytes = MAGIC) -> bytes:
    hb = header_bytes if header_bytes is not None else msgpack.packb(header, use_bin_type=True)
    pad = bytes((-len(hb)) % 8)
    n = len(payload) if payload_len is None else payload_len
    return PREFIX.pack(magic, len(hb), n) + hb + pad + payload


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_round_trip_every_dtype_bit_exact(dtype: torch.dtype) -> None:
    tensors = [random_tensor(dtype, (3, 5, 7), 1), random_tensor(dtype, (1,), 2), random_tensor(dtype, (), 3)]
    frame = Frame("stage.activations", 2, {"session": "s1", "pos": 17, "blob": b"\x00\xff"}, tensors)
    out = decode_frame(encode_frame(frame))
    assert (out.type, out.version, out.fields) == (frame.type, frame.version, frame.fields)
    assert len(out.tensors) == 3
    for a, b in zip(tensors, out.tensors):
        assert b.dtype == a.dtype and b.shape == a.shape
        assert bits(a) == bits(b)


def test_mixed_dtypes_are_aligned_and_exact() -> None:
    tensors = [random_tensor(dt, (i + 1, 3), i) for i, dt in enumerate(ALL_DTYPES * 2)]
    data = encode_frame(Frame("x", 1, {}, tensors))
    out = decode_frame(data)
    for a, b in zip(tensors, out.tensors):
        assert bits(a) == bits(b)
        assert b.data_ptr() % b.element_size() == 0


def test_empty_and_zero_size_tensors() -> None:
    out = decode_frame(encode_frame(Frame("x", 1, {}, [torch.empty(0, 4), torch.zeros(2, 0, dtype=torch.int64)])))
    assert out.tensors[0].shape == (0, 4) and out.tensors[1].shape == (2, 0)
    assert out.tensors[1].dtype == torch.int64
    assert decode_frame(encode_frame(Frame("nothing"))).tensors == []


def test_non_contiguous_input_is_sent_in_logical_order() -> None:
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6).t()
    out = decode_frame(encode_frame(Frame("x", 1, {}, [t])))
    assert torch.equal(out.tensors[0], t)


def test_decoded_tensors_are_writable_and_independent_of_input() -> None:
    data = encode_frame(Frame("x", 1, {}, [torch.ones(4)]))
    out = decode_frame(data)
    out.tensors[0] += 1
    assert torch.equal(out.tensors[0], torch.full((4,), 2.0))


def test_encode_parts_do_not_copy_contiguous_tensors() -> None:
    t = torch.randn(1024)
    parts = encode_frame_parts(Frame("x", 1, {}, [t]))
    view = parts[-1]
    t[0] = 123.0
    assert torch.frombuffer(bytearray(view), dtype=torch.float32)[0] == 123.0


# ---------------------------------------------------------------- encode-side refusals
def test_encode_refuses_bad_dtype_and_limits() -> None:
    with pytest.raises(FrameError, match="dtype"):
        encode_frame(Frame("x", 1, {}, [torch.zeros(2, dtype=torch.float64)]))
    with pytest.raises(FrameError, match="dims"):
        encode_frame(Frame("x", 1, {}, [torch.zeros([1] * 9)]))
    with pytest.raises(FrameError, match="tensors"):
        encode_frame(Frame("x", 1, {}, [torch.zeros(1)] * 17))
    with pytest.raises(FrameError, match="limit"):
        encode_frame(Frame("x", 1, {}, [torch.zeros(1024)]), FrameLimits(max_frame_bytes=2048, max_header_bytes=512))
    with pytest.raises(FrameError, match="header"):
        encode_frame(Frame("x", 1, {"s": "a" * 70_000}))
    with pytest.raises(FrameError, match="msgpack"):
        encode_frame(Frame("x", 1, {"obj": object()}))
    with pytest.raises(FrameError, match="torch.Tensor"):
        encode_frame(Frame("x", 1, {}, [[1.0, 2.0]]))  # type: ignore[list-item]


# ---------------------------------------------------------------- decode-side refusals
GOOD_HEADER = {"t": "x", "v": 1, "f": {}, "x": [["float32", [2, 2]]]}
GOOD_PAYLOAD = bytes(16)


def test_raw_helper_builds_a_valid_frame() -> None:
    assert decode_frame(raw_frame(GOOD_HEADER, GOOD_PAYLOAD)).tensors[0].shape == (2, 2)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "truncated prefix"),
        (b"MPF1\x00\x00", "truncated prefix"),
        (raw_frame(GOOD_HEADER, GOOD_PAYLOAD, magic=b"HTTP"), "bad magic"),
        (raw_frame(GOOD_HEADER, GOOD_PAYLOAD)[:-1], "prefix says"),
        (raw_frame(GOOD_HEADER, GOOD_PAYLOAD) + b"\x00", "prefix says"),
        (raw_frame(None, b"", header_bytes=b""), "header length"),
        (raw_frame(None, b"", header_bytes=b"\xc1\xc1\xc1"), "not valid msgpack"),
        (raw_frame(None, b"", header_bytes=msgpack.packb({"t": "x"}) + b"\x01"), "msgpack"),
        (raw_frame([1, 2, 3]), "map with exactly"),
        (raw_frame({**GOOD_HEADER, "extra": 1}, GOOD_PAYLOAD), "map with exactly"),
        (raw_frame({**GOOD_HEADER, "t": ""}, GOOD_PAYLOAD), "message type"),
        (raw_frame({**GOOD_HEADER, "t": 5}, GOOD_PAYLOAD), "message type"),
        (raw_frame({**GOOD_HEADER, "v": -1}, GOOD_PAYLOAD), "version"),
        (raw_frame({**GOOD_HEADER, "v": True}, GOOD_PAYLOAD), "version"),
        (raw_frame({**GOOD_HEADER, "f": [1]}, GOOD_PAYLOAD), "fields"),
        (raw_frame({**GOOD_HEADER, "x": {}}, GOOD_PAYLOAD), "tensors"),
        (raw_frame({**GOOD_HEADER, "x": [["float64", [2]]]}, GOOD_PAYLOAD), "dtype 'float64'"),
        (raw_frame({**GOOD_HEADER, "x": [["float32", [2, -2]]]}, GOOD_PAYLOAD), "dim -2"),
        (raw_frame({**GOOD_HEADER, "x": [["float32", [2.0, 2]]]}, GOOD_PAYLOAD), "dim 2.0"),
        (raw_frame({**GOOD_HEADER, "x": [["float32", [2, 3]]]}, GOOD_PAYLOAD), "needs 24 bytes"),
        (raw_frame({**GOOD_HEADER, "x": [["float32", [3]]]}, GOOD_PAYLOAD), "describe 12 payload bytes"),
        (raw_frame({**GOOD_HEADER, "x": [["int64", [2, 2]]]}, GOOD_PAYLOAD), "needs 32 bytes"),
        (raw_frame({**GOOD_HEADER, "x": [["float32", [1] * 9]]}, GOOD_PAYLOAD), "9 dims"),
        (raw_frame({**GOOD_HEADER, "x": [["float32", [1]]] * 17}, bytes(17 * 8)), "17 tensors"),
        (raw_frame({**GOOD_HEADER, "x": [["float32"]]}, GOOD_PAYLOAD), "descriptor"),
        (raw_frame({**GOOD_HEADER, "x": [["float32", [2**40, 2**40]]]}, GOOD_PAYLOAD), "dim"),
        (raw_frame({**GOOD_HEADER, "x": [["float32", [2**30, 2**30]]]}, GOOD_PAYLOAD), "needs"),
    ],
)
def test_decode_rejects(data: bytes, match: str) -> None:
    with pytest.raises(FrameError, match=match):
        decode_frame(data)


def test_huge_lengths_fail_on_the_prefix_before_any_allocation() -> None:
    limits = FrameLimits()
    with pytest.raises(FrameError, match="exceeds the limit"):
        parse_prefix(PREFIX.pack(MAGIC, 10, 2**62), limits)
    with pytest.raises(FrameError, match="header length"):
        parse_prefix(PREFIX.pack(MAGIC, 2**32 - 1, 0), limits)
    small = FrameLimits(max_frame_bytes=1 << 20, max_header_bytes=1024)
    with pytest.raises(FrameError, match="exceeds the limit"):
        decode_frame(raw_frame(GOOD_HEADER, GOOD_PAYLOAD, payload_len=2 << 20), small)


def test_map_keys_must_be_strings_and_ext_types_are_refused() -> None:
    with pytest.raises(FrameError, match="msgpack"):
        decode_frame(raw_frame(None, header_bytes=msgpack.packb({1: 2})))
    ext = msgpack.packb({"t": "x", "v": 1, "f": {"e": msgpack.ExtType(5, b"abc")}, "x": []})
    with pytest.raises(FrameError, match="msgpack"):
        decode_frame(raw_frame(None, header_bytes=ext))


# ---------------------------------------------------------------- registry
def test_registry_validates_named_versioned_messages() -> None:
    register_message(MessageSpec("test.hop", 1, {"session": str, "pos": int}, min_tensors=1, max_tensors=1))
    register_message(MessageSpec("test.hop", 1, {"session": str, "pos": int}, min_tensors=1, max_tensors=1))  # same: ok
    with pytest.raises(ValueError):
        register_message(MessageSpec("test.hop", 1, {"session": str}))
    good = Frame("test.hop", 1, {"session": "a", "pos": 3}, [torch.zeros(2)])
    assert decode_frame(encode_frame(good)).fields["pos"] == 3
    for bad, match in [
        (Frame("test.hop", 1, {"session": "a"}, [torch.zeros(2)]), "missing field 'pos'"),
        (Frame("test.hop", 1, {"session": "a", "pos": "3"}, [torch.zeros(2)]), "field 'pos'"),
        (Frame("test.hop", 1, {"session": "a", "pos": True}, [torch.zeros(2)]), "field 'pos'"),
        (Frame("test.hop", 1, {"session": "a", "pos": 1}, []), "0 tensors"),
    ]:
        with pytest.raises(FrameError, match=match):
            decode_frame(encode_frame(bad))
    with pytest.raises(FrameError, match="unknown message"):
        validate_message(Frame("test.nope", 1), require_registered=True)
    validate_message(Frame("test.hop", 2))  # another version, unregistered: allowed unless required


# ---------------------------------------------------------------- fuzz
def _valid_frames() -> list[bytes]:
    return [
        encode_frame(Frame("stage.activations", 1, {"s": "abc", "n": 3}, [random_tensor(torch.bfloat16, (2, 8), 7)])),
        encode_frame(Frame("x", 1, {}, [random_tensor(dt, (3,), i) for i, dt in enumerate(ALL_DTYPES)])),
        encode_frame(Frame("empty")),
    ]


def test_fuzz_random_garbage_only_ever_raises_frame_error() -> None:
    rng = random.Random(1234)
    for _ in range(3000):
        n = rng.choice([0, 1, 5, 15, 16, 17, 40, 200, 5000])
        data = bytes(rng.getrandbits(8) for _ in range(n))
        if rng.random() < 0.5 and n >= PREFIX_BYTES:  # plausible prefix, garbage after
            data = PREFIX.pack(MAGIC, rng.randint(0, 300), rng.randint(0, 5000)) + data[PREFIX_BYTES:]
        try:
            decode_frame(data)
        except FrameError:
            pass


def test_fuzz_mutated_valid_frames_decode_or_raise_frame_error() -> None:
    rng = random.Random(99)
    frames = _valid_frames()
    decoded = 0
    for _ in range(3000):
        data = bytearray(rng.choice(frames))
        op = rng.randrange(4)
        if op == 0:  # flip bytes
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif op == 1:  # truncate
            del data[rng.randrange(len(data)) :]
        elif op == 2:  # append junk
            data += bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 20)))
        else:  # overwrite inside the header
            end = min(len(data), PREFIX_BYTES + 40)
            i = rng.randrange(PREFIX_BYTES, end)
            data[i] = rng.getrandbits(8)
        try:
            decode_frame(bytes(data))
            decoded += 1
        except FrameError:
            pass
    assert decoded > 0  # payload-only flips still decode: the frame checks structure, not content


def test_fuzz_random_msgpack_headers() -> None:
    rng = random.Random(5)
    atoms = [None, True, 0, -1, 2**63, 1.5, "float32", "t", b"x", [], {}, [1, 2], {"a": 1}, [["int32", [1]]]]
    for _ in range(2000):
        header = {k: rng.choice(atoms) for k in rng.sample(["t", "v", "f", "x", "y"], rng.randint(0, 5))}
        try:
            data = raw_frame(header, bytes(rng.choice([0, 4, 8])))
        except (OverflowError, TypeError):
            continue
        try:
            decode_frame(data)
        except FrameError:
            pass


def test_prefix_struct_is_16_bytes_big_endian() -> None:
    assert PREFIX_BYTES == 16
    assert struct.unpack(">4sIQ", encode_frame(Frame("x"))[:16])[0] == MAGIC
