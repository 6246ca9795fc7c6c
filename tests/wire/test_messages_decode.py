"""Decoding typed messages from frames: each class's field decoders, built once, keep every check."""

from __future__ import annotations

import pytest
import torch

from wire.frames import Frame, decode_frame, encode_frame
from wire.messages import Close, MessageError, Result, SamplingParams, Step, decode


def _step(**fields) -> Step:
    base = dict(pipeline="p", step=7, kind="decode", sessions=("s0", "s1"), positions=(3, 9),
                sampling=(SamplingParams(), SamplingParams(0.7, 0.9, 42)), stage_ms=(1.5,))
    return Step(**{**base, **fields}, x=torch.tensor([5, 6]))


def _tampered(message, **changes) -> Frame:
    frame = message.to_frame()
    return Frame(frame.type, frame.version, {**frame.fields, **changes}, list(frame.tensors))


def test_messages_survive_the_wire_unchanged() -> None:
    step = _step()
    back = decode(decode_frame(encode_frame(step.to_frame())), Step)
    assert back == step and torch.equal(back.x, step.x)
    assert isinstance(back.sessions, tuple) and isinstance(back.sampling[1], SamplingParams)
    result = Result("p", 7, ("s0",), (11,), (0.5, 0.25))
    assert decode(decode_frame(encode_frame(result.to_frame())), Result) == result
    close = Close("p", ("s0", "s1"), ("cmpl-1", ""))
    assert decode(decode_frame(encode_frame(close.to_frame())), Close) == close


@pytest.mark.parametrize("changes, match", [
    ({"step": True}, "step must be int"),  # a bool is not a number here
    ({"step": "7"}, "step must be int"),
    ({"sessions": "s0"}, "sessions must be a list"),
    ({"positions": [3, "9"]}, "every entry of positions must be int"),
    ({"positions": [3, False]}, "every entry of positions must be int"),
    ({"stage_ms": [1.5, None]}, "every entry of stage_ms must be float"),
    ({"sampling": [[0.0, 1.0, 0]] * 257}, "sampling is a list of at most 256"),
    ({"sampling": [[0.0, 1.0]] * 2}, r"sampling is \[temperature, top_p, seed\]"),
    ({"sampling": [[True, 1.0, 0]] * 2}, "temperature and top_p are numbers"),
])
def test_a_field_of_the_wrong_type_is_refused(changes: dict, match: str) -> None:
    with pytest.raises(MessageError, match=match):
        decode(_tampered(_step(), **changes), Step)


def test_each_class_checks_its_own_fields() -> None:
    # the same field name, typed differently per class: Result's tokens are ints, Close's requests strings
    with pytest.raises(MessageError, match="every entry of tokens must be int"):
        decode(_tampered(Result("p", 1, ("s0",), (3,), ()), tokens=["3"]), Result)
    with pytest.raises(MessageError, match="every entry of requests must be str"):
        decode(_tampered(Close("p", ("s0",), ("r",)), requests=[3]), Close)
    assert decode(_tampered(Result("p", 1, ("s0",), (3,), ()), stage_ms=[1, 2.5]), Result).stage_ms == (1, 2.5)
