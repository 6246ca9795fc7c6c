"""From the driver's token callbacks to text deltas on the asyncio loop.

`TokenStream` bridges `GenerationRequest.on_token` (called on a driver thread) into an asyncio
queue; `Detokenizer` turns the growing token list into text deltas, holding back what may be
an incomplete UTF-8 character or the start of a stop sequence, and cuts at the first stop sequence.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from coordinator.driver import GenerationRequest

POLL_S = 0.05  # how often a waiting stream checks whether its request ended
_END = object()


class TokenStream:
    """Tokens of one request as an async iterator; ends when the request is done."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self.request, self.loop = request, loop
        self.queue: asyncio.Queue = asyncio.Queue()  # bounded by the request's max_new_tokens
        request.on_token = self._on_token

    def _on_token(self, token: int) -> None:  # driver thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, token)

    async def tokens(self, timeout_s: float) -> AsyncIterator[int]:
        deadline = self.loop.time() + timeout_s
        ending = False
        while True:
            try:
                item = await asyncio.wait_for(self.queue.get(), POLL_S)
            except TimeoutError:
                if self.loop.time() > deadline:
                    raise
                if self.request.done.is_set() and not ending:
                    # Tokens the driver added before it set `done` were scheduled before this marker.
                    ending = True
                    self.loop.call_soon(self.queue.put_nowait, _END)
                continue
            if item is _END:
                return
            yield item


class Detokenizer:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = ""  # text sent so far
        self.stopped = False  # a stop sequence was found: the text ends before it

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """The new text that is safe to send after this token ('' while held back)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self._text()
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next bytes
            return ""
        return self._advance(text, final=False)

    def flush(self) -> str:
        """The rest of the text once generation has ended."""
        if self.stopped:
            return ""
        return self._advance(self._text(), final=True)

    def _advance(self, text: str, final: bool) -> str:
        if not text.startswith(self.emitted):  # decoding revised earlier text: send nothing more of it
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

    def _held_back(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop sequence."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
