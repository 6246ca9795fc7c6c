"""A userspace TCP proxy that makes a link look far away: one-way delay and a bandwidth limit per
direction of every connection through it (tc netem is not available in this kernel).

    python -m node.transport.shaper --listen 127.0.0.1:9100 --to 127.0.0.1:9000 --delay-ms 20 --rate-mbit 100

Each direction reads what arrives, stamps it, and sends it on no sooner than `delay_ms` after it
arrived and no faster than `rate_mbit` (a chunk leaves when the link has finished the previous
ones: the link's serialisation time, then the delay). Benchmarks put one in front of each
provider (`provider join --announce-addr` names the proxy) and one in front of the coordinator.
The bulk side channel's socket does not go through those (its port is offered on the stream): with
`MESHPOOL_SHAPE_BULK=DELAY_MS,RATE_MBIT` in a node's environment (benchmarks and tests only) the
node puts a shaper of that shape in front of its own bulk listener (node/transport/bulk.py).
"""

from __future__ import annotations

import argparse
import math
import os
import threading
from dataclasses import dataclass

import trio

CHUNK_BYTES = 64 * 1024  # granularity of pacing: 5 ms at 100 Mbit/s
MAX_QUEUED_CHUNKS = 1024  # per direction: 64 MiB in flight at most, then the reader waits


@dataclass(frozen=True)
class Shape:
    delay_ms: float = 0.0  # one way
    rate_mbit: float = math.inf  # Mbit/s, 1 Mbit = 1e6 bits

    def __post_init__(self):
        assert self.delay_ms >= 0 and self.rate_mbit > 0, self

    @classmethod
    def from_env(cls, name: str = "MESHPOOL_SHAPE_BULK") -> "Shape | None":
        """`DELAY_MS,RATE_MBIT` from the environment (benchmarks and tests only), or None."""
        text = os.environ.get(name, "").strip()
        if not text:
            return None
        try:
            delay_ms, rate_mbit = (float(x) for x in text.split(","))
            return cls(delay_ms, rate_mbit)
        except (ValueError, AssertionError):
            raise ValueError(f"{name}={text!r}: expected DELAY_MS,RATE_MBIT, e.g. 20,100") from None


@dataclass
class Shaped:
    """What a shaper did, both directions together (read for tests and benchmarks): the bytes it
    forwarded and the link time it scheduled for them (serialisation + delay, per chunk)."""

    bytes: int = 0
    chunks: int = 0
    serialisation_s: float = 0.0
    delay_s: float = 0.0


async def _pump(src: trio.SocketStream, dst: trio.SocketStream, shape: Shape, shaped: Shaped | None = None) -> None:
    send, recv = trio.open_memory_channel(MAX_QUEUED_CHUNKS)

    async def reader() -> None:
        async with send:
            try:
                while data := await src.receive_some(CHUNK_BYTES):
                    await send.send((trio.current_time(), data))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def writer() -> None:
        busy_until = 0.0
        async with recv:
            async for arrived, data in recv:
                # the link serialises chunks back to back; each arrives delay_ms after it left
                start = max(arrived, busy_until)
                busy_until = start + len(data) * 8 / (shape.rate_mbit * 1e6)
                if shaped is not None:
                    shaped.bytes, shaped.chunks = shaped.bytes + len(data), shaped.chunks + 1
                    shaped.serialisation_s += len(data) * 8 / (shape.rate_mbit * 1e6)
                    shaped.delay_s += shape.delay_ms / 1e3
                await trio.sleep_until(busy_until + shape.delay_ms / 1e3)
                try:
                    await dst.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
        try:
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        nursery.start_soon(writer)


async def _serve_one(client: trio.SocketStream, to: tuple[str, int], shape: Shape, shaped: Shaped | None) -> None:
    try:
        upstream = await trio.open_tcp_stream(*to)
    except OSError:
        await client.aclose()
        return
    async with client, upstream:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump, client, upstream, shape, shaped)
            nursery.start_soon(_pump, upstream, client, shape, shaped)


async def serve(listen: tuple[str, int], to: tuple[str, int], shape: Shape, shaped: Shaped | None = None,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    listeners = await trio.open_tcp_listeners(listen[1], host=listen[0])
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(lambda c: _serve_one(c, to, shape, shaped), listeners)


class ShaperThread:
    """A shaper in a thread of this process (benchmarks): start() returns its port."""

    def __init__(self, to: tuple[str, int], shape: Shape, listen: tuple[str, int] = ("127.0.0.1", 0)):
        self.to, self.shape, self.listen = to, shape, listen
        self.port: int | None = None
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._thread = threading.Thread(target=lambda: trio.run(self._main), daemon=True, name="shaper")

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._cancel = nursery.cancel_scope
            self.port = await nursery.start(serve, self.listen, self.to, self.shape)
            self._ready.set()

    def start(self) -> int:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("shaper did not start")
        return self.port

    def close(self) -> None:
        if self._token is not None and self._cancel is not None:
            try:
                self._token.run_sync_soon(self._cancel.cancel)
            except trio.RunFinishedError:
                pass
        self._thread.join(5)


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", required=True, type=_hostport, help="HOST:PORT to accept on (port 0: any)")
    p.add_argument("--to", required=True, type=_hostport, help="HOST:PORT to forward to")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay added to each direction")
    p.add_argument("--rate-mbit", type=float, default=math.inf, help="bandwidth of each direction, Mbit/s")
    args = p.parse_args(argv)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve, args.listen, args.to, Shape(args.delay_ms, args.rate_mbit))
            print(f"shaper ready port={port}", flush=True)

    trio.run(run)


if __name__ == "__main__":
    main()
