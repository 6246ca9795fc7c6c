"""From the driver's token callbacks to text deltas on the asyncio loop.

`TokenStream` bridges `GenerationRequest.on_token` (called on a driver thread) to the loop: the
driver appends to a list under a lock and wakes the loop only when the consumer waits, and the
consumer takes every token that has arrived at once, so a burst of tokens costs one wake and one
delta. `Detokenizer` turns the growing token list into text deltas, decoding only a short window of
recent ids each time, holding back what may be an incomplete UTF-8 character or the start of a stop
sequence, and cuts at the first stop sequence.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator, Sequence

from coordinator.driver import GenerationRequest


class _LoopWaker:
    """Wakes waiting streams of one event loop from other threads: the futures to wake are gathered
    and one `call_soon_threadsafe` (one write to the loop's self-pipe) wakes all that gathered before
    the loop ran it, so a step that gives many requests a token costs one system call, not one each."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.waiting: list[asyncio.Future] = []  # at most one per stream of this loop

    def wake(self, waiter: asyncio.Future) -> None:  # any thread
        with self.lock:
            self.waiting.append(waiter)
            first = len(self.waiting) == 1
        if first:
            self.loop.call_soon_threadsafe(self._run)

    def _run(self) -> None:  # the loop
        with self.lock:
            waiters, self.waiting = self.waiting, []
        for waiter in waiters:
            if not waiter.done():  # a consumer cancelled meanwhile
                waiter.set_result(None)


_wakers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopWaker] = weakref.WeakKeyDictionary()


def _waker(loop: asyncio.AbstractEventLoop) -> _LoopWaker:
    """Only the loop's own thread creates its waker (TokenStream is made on the loop)."""
    waker = _wakers.get(loop)
    if waker is None:
        waker = _wakers[loop] = _LoopWaker(loop)
    return waker


class TokenStream:
    """Tokens of one request as an async iterator of batches; ends when the request is done."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop):
        if request.done.is_set():
            raise ValueError("the request has already ended")
        self.request, self.loop = request, loop
        self._waker = _waker(loop)
        self._lock = threading.Lock()
        self._arrived: list[int] = []  # told, not yet taken; bounded by the request's max_new_tokens
        self._waiter: asyncio.Future | None = None  # set while the consumer waits
        self._timed_out = False
        request.on_token = self._on_token
        # the stream ends as soon as the request does, whoever ends it (the driver, a cancel, the pool
        # giving up), with no polling
        request.on_done = self._wake

    def _on_token(self, token: int) -> None:  # driver thread
        with self._lock:
            self._arrived.append(token)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._waker.wake(waiter)

    def _wake(self) -> None:  # any thread
        with self._lock:
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._waker.wake(waiter)

    def _expire(self) -> None:  # the loop, at the deadline
        self._timed_out = True
        self._wake()

    async def batches(self, timeout_s: float) -> AsyncIterator[list[int]]:
        """Every token that arrived since the last batch, in order, until the request is done;
        TimeoutError once `timeout_s` have passed with the request not done and nothing left to take."""
        deadline = self.loop.call_later(timeout_s, self._expire)
        try:
            while True:
                with self._lock:
                    batch, self._arrived = self._arrived, []
                    # read under the lock, after the take: the driver tells a request's tokens before it
                    # sets `done`, so once `done` is seen here every token is in this batch or an earlier one
                    ended = self.request.done.is_set()
                    if not batch and not ended:
                        if self._timed_out:
                            raise TimeoutError
                        waiter = self._waiter = self.loop.create_future()
                if batch:
                    yield batch
                elif ended:
                    return
                else:
                    await waiter
        finally:
            deadline.cancel()
            self._waiter = None


def _cleans_up_spaces(tokenizer) -> bool:
    """Whether `tokenizer.decode` removes spaces before punctuation. transformers skips that for BPE
    tokenizers even where `clean_up_tokenization_spaces` is set, so the tokenizer is asked."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    probe = "a ."
    return tokenizer.decode(tokenizer.encode(probe, add_special_tokens=False), skip_special_tokens=True) != probe


class Detokenizer:
    """Token ids to text deltas, exactly as decoding all ids after each token and sending what grew,
    but at a cost per token that does not grow with the length (the prefix / read offsets of vLLM
    and TGI): each token decodes the ids from `_prefix` on, and what that adds to the decode of
    `_prefix:_read` is the new end of the text. `_read` moves after every token whose text does not
    end in an incomplete character, and `_prefix` (context, so that a decoder that strips a leading
    space strips it inside the window) follows it every `WINDOW_TOKENS` tokens. Should a window ever
    disagree with its context (a decoder that revises earlier text), that token decodes everything,
    as before; so does every token of a tokenizer that cleans up spaces after decoding (" ." -> "."),
    a pass over the whole text that a window cannot see.

    Only the end of the text is kept: `_tail` is the text from character `_base` on, and `_sent_tail`
    what was sent from there; `_base` trails the text sent by the longest stop sequence, which is as
    far back as stop sequences are searched."""

    WINDOW_TOKENS = 16  # most ids a window spans before its context moves on: one more decode each time

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.stop_chars = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.stopped = False  # a stop sequence was found: the text ends before it
        self.decode_calls = 0  # the cost, for tests and bench/detokenize.py
        self.decoded_ids = 0
        self._prefix = 0  # where the window starts
        self._read = 0  # the text of ids[:_read] ended on a whole character
        self._read_text = ""  # decode(ids[_prefix:_read])
        self._base = 0  # characters of the text before `_tail`: sent, and past the reach of stop sequences
        self._tail = ""  # the text of ids[:_read] from `_base`
        self._sent_tail = ""  # the text sent, from `_base`
        self._sent: list[str] = []  # every delta sent
        self._whole = _cleans_up_spaces(tokenizer)  # decode everything after every token

    @property
    def emitted(self) -> str:
        """The text sent so far."""
        return "".join(self._sent)

    def _decode(self, start: int, end: int) -> str:
        self.decode_calls += 1
        self.decoded_ids += end - start
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=True)

    def _text(self) -> tuple[str, str | None]:
        """The text of all ids from `_base`, and the window's decode (None for a tokenizer decoded whole)."""
        window = None if self._whole else self._decode(self._prefix, len(self.ids))
        if window is not None and window.startswith(self._read_text):
            return self._tail + window[len(self._read_text):], window
        self._rebase_to_start()  # decode everything
        return self._decode(0, len(self.ids)), window

    def add(self, token: int) -> str:
        """The new text that is safe to send after this token ('' while held back)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        text, window = self._text()
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next bytes
            return ""
        delta = self._advance(text, final=False)
        if window is not None:
            self._checkpoint(text, window)
        return delta

    def flush(self) -> str:
        """The rest of the text once generation has ended."""
        if self.stopped:
            return ""
        return self._advance(self._text()[0], final=True)

    def _advance(self, text: str, final: bool) -> str:
        """`text` and the positions here count from `_base`."""
        sent = self._sent_tail
        if not text.startswith(sent):  # decoding revised earlier text: send nothing more of it
            return ""
        start = max(0, len(sent) - self.stop_chars)
        cut = min((i for i in (text.find(s, start) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            end = cut
        elif final:
            end = len(text)
        else:
            end = len(text) - self._held_back(text)
        end = max(end, len(sent))
        delta = text[len(sent):end]
        if delta:
            self._sent_tail += delta
            self._sent.append(delta)
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

    def _checkpoint(self, text: str, window: str) -> None:
        """The text of all ids ended on a whole character: later windows need only look from here."""
        n, last_read = len(self.ids), self._read
        self._tail, self._read, self._read_text = text, n, window
        if n - self._prefix > self.WINDOW_TOKENS and self._prefix < last_read:
            # the context moves to the last checkpoint: a window must start where the text of the
            # ids before it ended on a whole character, or a decoder that joins byte tokens (byte
            # fallback) would read a different run of bytes than decoding everything does
            context = self._decode(last_read, n)
            if context:  # a context that decodes to nothing (special tokens) could not hold a stripped space
                self._prefix, self._read_text = last_read, context
        # drop what no later search reaches (only while the text sent is the start of the text)
        drop = len(self._sent_tail) - self.stop_chars
        if drop > 0 and self._tail.startswith(self._sent_tail):
            self._base += drop
            self._tail, self._sent_tail = self._tail[drop:], self._sent_tail[drop:]

    def _rebase_to_start(self) -> None:
        """Positions count from the start of the text again, for a full decode (the text before
        `_base` is the text sent up to there)."""
        emitted = self.emitted
        self._tail, self._sent_tail, self._base = emitted[:self._base] + self._tail, emitted, 0
