"""The link test's messages refuse what is out of bounds before anything is built from it."""

from __future__ import annotations

import pytest
import torch

from wire.frames import Frame
from wire.messages import (MAX_LINK_TEST_BYTES, LinkMeasured, LinkPayload, LinkTest, MessageError, decode)


def test_link_test_messages_round_trip_and_refuse_what_is_out_of_bounds():
    test = LinkTest("peerB", ("/ip4/127.0.0.1/tcp/1",), 1 << 20, 3)
    assert decode(test.to_frame()) == test
    assert decode(LinkPayload(torch.zeros(8)).to_frame(), LinkPayload).x.numel() == 8
    for bad in (LinkTest("peerB", (), MAX_LINK_TEST_BYTES + 1, 3), LinkTest("peerB", (), 1, 0),
                LinkTest("", (), 1, 1), LinkMeasured("peerB", 1, float("nan"), 1.0, "link"),
                LinkMeasured("peerB", 1, 1.0, 1.0, "carrier-pigeon"), LinkMeasured("peerB", 0, 1.0, 1.0, "link")):
        with pytest.raises(MessageError):
            decode(bad.to_frame())
    for tensor in (torch.zeros(2, 2), torch.zeros(4, dtype=torch.int32)):
        with pytest.raises(MessageError):
            decode(Frame(LinkPayload.TYPE, LinkPayload.VERSION, {}, [tensor]))
