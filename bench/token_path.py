"""The coordinator's cost per token from the driver's `on_token` to the text of an SSE chunk, against
the code before (kept below, so that both are measured in the same run).

1. Detokenizing: the default model's tokenizer on text with multi-byte characters and a stop
   sequence that never comes, `--lengths` tokens: microseconds per token, decode calls and ids decoded.
2. The bridge from the driver thread to the event loop: one thread adds a token to each of
   `--streams` requests per step, as a driver does (`--step-ms` apart, 0: as fast as it can), and the
   loop turns them into deltas as `openai_api.Generation._deltas` does: CPU time per token of the
   whole process, wakes of the loop (`call_soon_threadsafe`) and deltas (SSE chunks) per token.

    python bench/token_path.py [--lengths 64,1024,4000] [--streams 1,8,32] [--tokens 256] [--step-ms 0,1]

Writes bench/token_path.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.driver import GenerationRequest  # noqa: E402
from coordinator.streaming import Detokenizer, TokenStream  # noqa: E402
from node.models import default_model_dir  # noqa: E402

TEXT = ("The Eiffel Tower — la tour Eiffel — is 330 m tall; café au lait ☕ costs 3 € near 東京 station 😀. "
        "Naïve façades, “quotes”, and numbers 1,234.5 follow. ")
STOP = ["\n\nUser:"]  # a stop sequence that never comes: its prefixes are still looked for after every token


class OldDetokenizer:
    """coordinator/streaming.py's Detokenizer before: decodes every id after every token."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self._text()
        if text.endswith("\ufffd"):
            return ""
        return self._advance(text, final=False)

    def flush(self) -> str:
        if self.stopped:
            return ""
        return self._advance(self._text(), final=True)

    def _advance(self, text: str, final: bool) -> str:
        if not text.startswith(self.emitted):
            return ""
        start = max(0, len(self.emitted) - max((len(s) for s in self.stop), default=0))
        cut = min((i for i in (text.find(s, start) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            end = cut
        elif final:
            end = len(text)
        else:
            end = len(text) - self._held_back(text)
        end = max(end, len(self.emitted))
        delta = text[len(self.emitted):end]
        self.emitted += delta
        return delta

    _held_back = Detokenizer._held_back  # unchanged


_OLD_POLL_S = 0.05
_END = object()


class OldTokenStream:
    """coordinator/streaming.py's TokenStream before: one call_soon_threadsafe and one wait_for a token."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self.request, self.loop = request, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        request.on_token = self._on_token

    def _on_token(self, token: int) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, token)

    async def tokens(self, timeout_s: float) -> AsyncIterator[int]:
        deadline = self.loop.time() + timeout_s
        ending = False
        while True:
            try:
                item = await asyncio.wait_for(self.queue.get(), _OLD_POLL_S)
            except TimeoutError:
                if self.loop.time() > deadline:
                    raise
                if self.request.done.is_set() and not ending:
                    ending = True
                    self.loop.call_soon(self.queue.put_nowait, _END)
                continue
            if item is _END:
                return
            yield item


def detokenize(tokenizer, ids: list[int], old: bool) -> dict:
    d = (OldDetokenizer if old else Detokenizer)(tokenizer, STOP)
    calls, decoded = [0], [0]
    decode = tokenizer.decode

    def counted(token_ids, **kw):
        calls[0] += 1
        decoded[0] += len(token_ids)
        return decode(token_ids, **kw)

    tokenizer.decode = counted
    try:
        start = time.perf_counter()
        text = "".join(d.add(t) for t in ids) + d.flush()
        seconds = time.perf_counter() - start
    finally:
        del tokenizer.decode
    return {"us_per_token": round(seconds / len(ids) * 1e6, 2), "decode_calls": calls[0], "decoded_ids": decoded[0],
            "text": text}


async def _consume_old(stream: OldTokenStream, detok) -> int:
    deltas, pending = 0, ""
    async for token in stream.tokens(600):
        pending += detok.add(token)
        if pending and stream.queue.empty():
            deltas += 1
            pending = ""
    return deltas + bool(pending + detok.flush())


async def _consume_new(stream: TokenStream, detok) -> int:
    deltas = 0
    async for batch in stream.batches(600):
        delta = ""
        for token in batch:
            delta += detok.add(token)
        deltas += bool(delta)
    return deltas + bool(detok.flush())


def _drive(requests: list[GenerationRequest], ids: list[int], step_s: float) -> None:
    """One token to every request per step, then each request ends: as PipelineDriver tells them."""
    for token in ids:
        for request in requests:
            request.add_token(token)
        if step_s:
            time.sleep(step_s)
    for request in requests:
        request.finish()


def count_wakes(loop: asyncio.AbstractEventLoop) -> list[int]:
    """Counts `loop`'s wakes from other threads (call_soon_threadsafe) in the returned one-item list."""
    wakes = [0]
    call = loop.call_soon_threadsafe

    def counted(*args, **kw):
        wakes[0] += 1
        return call(*args, **kw)

    loop.call_soon_threadsafe = counted
    return wakes


def bridge(tokenizer, ids: list[int], n_streams: int, step_s: float, old: bool) -> dict:
    async def run() -> tuple[int, int, float, float]:
        loop = asyncio.get_running_loop()
        wakes = count_wakes(loop)
        requests = [GenerationRequest([1], len(ids)) for _ in range(n_streams)]
        streams = [(OldTokenStream if old else TokenStream)(r, loop) for r in requests]
        consume = _consume_old if old else _consume_new
        detoks = [(OldDetokenizer if old else Detokenizer)(tokenizer, STOP) for _ in requests]
        cpu0, wall0 = time.process_time(), time.perf_counter()
        driver = threading.Thread(target=_drive, args=(requests, ids, step_s))
        driver.start()
        deltas = await asyncio.gather(*(consume(s, d) for s, d in zip(streams, detoks)))
        wall_s, cpu_s = time.perf_counter() - wall0, time.process_time() - cpu0
        driver.join()
        return sum(deltas), wakes[0], cpu_s, wall_s

    deltas, wakes, cpu_s, wall_s = asyncio.run(run())
    tokens = len(ids) * n_streams
    return {"streams": n_streams, "step_ms": step_s * 1e3, "tokens": tokens,
            "cpu_us_per_token": round(cpu_s / tokens * 1e6, 2), "wall_s": round(wall_s, 3),
            "wakes_per_token": round(wakes / tokens, 3), "deltas_per_token": round(deltas / tokens, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="64,1024,4000")
    p.add_argument("--streams", default="1,8,32")
    p.add_argument("--tokens", type=int, default=256, help="tokens per stream in the bridge runs")
    p.add_argument("--step-ms", default="0,1", help="time between the driver's steps in the bridge runs")
    p.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = p.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    text_ids = tokenizer(TEXT)["input_ids"]
    out: dict = {"detokenize": [], "bridge": []}
    print(f"{'detokenize':>10} {'old us/tok':>11} {'new us/tok':>11} {'ratio':>6} {'old ids':>10} {'new ids':>8} "
          f"{'new calls':>9}")
    for n in map(int, args.lengths.split(",")):
        ids = (text_ids * (n // len(text_ids) + 1))[:n]
        old, new = detokenize(tokenizer, ids, True), detokenize(tokenizer, ids, False)
        assert old.pop("text") == new.pop("text"), "the detokenizers disagree"
        row = {"tokens": n, "old": old, "new": new, "ratio": round(old["us_per_token"] / new["us_per_token"], 1)}
        out["detokenize"].append(row)
        print(f"{n:>10} {old['us_per_token']:>11.1f} {new['us_per_token']:>11.1f} {row['ratio']:>6} "
              f"{old['decoded_ids']:>10} {new['decoded_ids']:>8} {new['decode_calls']:>9}")
    print(f"\n{'streams':>7} {'step ms':>7} {'old cpu us/tok':>14} {'new cpu us/tok':>14} {'ratio':>6} "
          f"{'old wakes/tok':>13} {'new wakes/tok':>13} {'old chunks/tok':>14} {'new chunks/tok':>14}")
    ids = (text_ids * (args.tokens // len(text_ids) + 1))[:args.tokens]
    for step_ms in map(float, args.step_ms.split(",")):
        for n in map(int, args.streams.split(",")):
            old = bridge(tokenizer, ids, n, step_ms / 1e3, True)
            new = bridge(tokenizer, ids, n, step_ms / 1e3, False)
            row = {"old": old, "new": new, "ratio": round(old["cpu_us_per_token"] / new["cpu_us_per_token"], 1)}
            out["bridge"].append(row)
            print(f"{n:>7} {step_ms:>7g} {old['cpu_us_per_token']:>14.1f} {new['cpu_us_per_token']:>14.1f} "
                  f"{row['ratio']:>6} {old['wakes_per_token']:>13} {new['wakes_per_token']:>13} "
                  f"{old['deltas_per_token']:>14} {new['deltas_per_token']:>14}")
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
