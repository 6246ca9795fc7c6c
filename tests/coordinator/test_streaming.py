"""The token path from the driver's callback to text deltas (coordinator/streaming.py).

The detokenizer decodes only a window of recent ids; its output must be exactly what decoding every
id after every token gave, for any ids: the algorithm before (bench/token_path.py `OldDetokenizer`)
and it run over random sequences of the default model's tokenizer (multi-byte characters cut
anywhere, byte tokens alone, special tokens, stop sequences taken from the text), and of two small
tokenizers built here whose decoders do what the default one never does: one joins byte tokens into
characters (byte fallback, so a later byte turns earlier text into U+FFFD) and strips the leading
space of what it decodes; one cleans up spaces before punctuation.

The stream is driven from a thread as a driver drives it; wakes of the loop are counted.
"""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from coordinator.driver import GenerationRequest
from bench.token_path import OldDetokenizer, count_wakes
from coordinator.streaming import Detokenizer, TokenStream

TEXTS = ["café ☕ 東京 😀 naïve – “quotes” 𝔘𝔫𝔦", "The Eiffel Tower\n\nUser: hi", " Paris is the capital. 🥐🥐",
         "a.b.c ... !! isn't"]
CUT_CHARACTERS = "é☕東😀𝔘"  # 2, 3, 3, 4 and 4 bytes
STOP_PICKS = ["\ufffd", "é", "東京", "😀", "\n\nUser:", " the", "aa", "a", ".", ""]


def _byte_level_ids(tokenizer) -> list[int]:
    """The id of each single byte's token in a byte-level BPE (GPT-2's byte-to-character map)."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = dict(zip(printable, map(chr, printable)))
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [tokenizer.convert_tokens_to_ids(chars[b]) for b in range(256)]


@pytest.fixture(scope="module")
def default_tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


PIECES = ["▁", "▁the", "▁a", "b", "c", "hello", "é", "▁é", "x", ".", "▁.", "'", "s", "▁'", "東", "😀", "▁▁", "ab", "▁x"]


def byte_fallback_tokenizer():
    """A SentencePiece-style tokenizer (Llama 2's decoder): byte tokens <0x..> joined into characters,
    '▁' for a space, the first space stripped; ids 1 and 2 special."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    vocab |= {p: 259 + i for i, p in enumerate(PIECES)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)


def cleanup_tokenizer():
    """A WordPiece tokenizer whose decode cleans up spaces before punctuation (" ." -> ".")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[CLS]", "a", "b", ".", "?", "'", "s", "n't", "##s", "##.", "x", "'m", "!"]
    tok = Tokenizer(models.WordPiece(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(["[CLS]"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=True)


def random_ids(rng: random.Random, tokenizer, kind: str) -> list[int]:
    """Runs of real text, lone bytes (mostly of multi-byte characters), characters cut short,
    special tokens and any ids at all, mixed."""
    n = rng.choice([1, 2, 5, 17, 20, 60, 150])
    if kind == "default":
        byte_ids, special = _byte_level_ids(tokenizer), list(range(17))
        text = [i for t in TEXTS for i in tokenizer(t)["input_ids"]]
    elif kind == "byte_fallback":
        byte_ids, special, text = list(range(3, 259)), [0, 1, 2], list(range(259, 259 + len(PIECES)))
    else:
        byte_ids, special, text = [], [1], list(range(len(tokenizer)))
    ids: list[int] = []
    while len(ids) < n:
        r = rng.random()
        if r < 0.3:
            k = rng.randrange(len(text))
            ids += text[k:k + rng.randint(1, 8)]
        elif r < 0.55 and byte_ids:
            ids.append(rng.choice(byte_ids[128:]) if rng.random() < 0.8 else rng.choice(byte_ids))
        elif r < 0.65:
            ids.append(rng.choice(special))
        elif r < 0.75 and kind == "default":
            b = rng.choice(CUT_CHARACTERS).encode()
            ids += [byte_ids[x] for x in b[:rng.randint(1, len(b))]]
        else:
            ids.append(rng.randrange(len(tokenizer)))
    return ids[:n]


def random_stops(rng: random.Random, text: str) -> list[str]:
    stops = []
    for _ in range(rng.choice([0, 0, 1, 2, 3])):
        r = rng.random()
        if r < 0.6 and text:
            i = rng.randrange(len(text))
            stops.append(text[i:i + rng.randint(1, 6)])
        elif r < 0.8:
            stops.append(rng.choice(STOP_PICKS))
        else:
            stops.append("".join(rng.choice("ab\ufffd é") for _ in range(rng.randint(1, 4))))
    return stops


def same_deltas(tokenizer, ids: list[int], stops: list[str]) -> Detokenizer:
    old, new = OldDetokenizer(tokenizer, stops), Detokenizer(tokenizer, stops)
    before = [old.add(t) for t in ids] + [old.flush()]
    after = [new.add(t) for t in ids] + [new.flush()]
    assert after == before, (ids, stops)
    assert (new.stopped, new.emitted) == (old.stopped, old.emitted)
    return new


@pytest.mark.parametrize("kind, cases", [("default", 4000), ("byte_fallback", 3000), ("cleanup", 300)])
def test_detokenizer_sends_what_decoding_everything_sent(default_tokenizer, kind, cases):
    tokenizer = {"default": lambda: default_tokenizer, "byte_fallback": byte_fallback_tokenizer,
                 "cleanup": cleanup_tokenizer}[kind]()
    rng = random.Random(f"detokenizer-{kind}")
    for _ in range(cases):
        ids = random_ids(rng, tokenizer, kind)
        same_deltas(tokenizer, ids, random_stops(rng, tokenizer.decode(ids, skip_special_tokens=True)))


def test_detokenizer_windows_whose_context_is_special_tokens_keep_the_space_they_strip():
    """Decoding from a special token strips the next piece's leading space; the window keeps a
    context that decodes to text."""
    tokenizer = byte_fallback_tokenizer()
    the, x, space = 259 + PIECES.index("▁the"), 259 + PIECES.index("▁x"), 259
    for ids in ([the] * 16 + [1, the, x], [the] * 17 + [2, 1, x, the], [the] * 16 + [space, x, x]):
        same_deltas(tokenizer, ids, [])
    rng = random.Random("specials")
    for _ in range(300):
        ids = [rng.choice([1, 2, 1, 2, 259] + list(range(259, 259 + len(PIECES)))) for _ in range(rng.randint(17, 40))]
        same_deltas(tokenizer, ids, random_stops(rng, ""))


def test_detokenizer_cost_per_token_does_not_grow_with_the_length(default_tokenizer):
    text_ids = [i for t in TEXTS for i in default_tokenizer(t)["input_ids"]]
    ids = (text_ids * (4000 // len(text_ids) + 1))[:4000]
    d = Detokenizer(default_tokenizer, ["\n\nAssistant:"])
    text = "".join(d.add(t) for t in ids) + d.flush()
    assert text == default_tokenizer.decode(ids, skip_special_tokens=True)
    # decoding everything each time decodes n (n + 1) / 2 = 8,002,000 ids in 4,000 calls
    assert d.decode_calls <= 2 * len(ids)
    assert d.decoded_ids <= (Detokenizer.WINDOW_TOKENS + 2) * len(ids)


def test_a_tokenizer_that_cleans_up_spaces_is_decoded_whole():
    tokenizer = cleanup_tokenizer()
    a, dot = tokenizer.convert_tokens_to_ids("a"), tokenizer.convert_tokens_to_ids(".")
    d = Detokenizer(tokenizer)
    assert d.add(a) + d.add(a) + d.add(dot) == "a a."
    assert d.decoded_ids == 1 + 2 + 3


# -- TokenStream -------------------------------------------------------------------------------


async def collect(stream: TokenStream, timeout_s: float = 60) -> list[list[int]]:
    return [batch async for batch in stream.batches(timeout_s)]


def test_tokens_told_while_the_loop_is_busy_arrive_as_one_batch_for_no_wake():
    async def main():
        loop = asyncio.get_running_loop()
        wakes = count_wakes(loop)
        request = GenerationRequest([1], 100)
        stream = TokenStream(request, loop)
        for t in range(100):  # the consumer is not waiting yet
            request.add_token(t)
        request.finish()
        assert await collect(stream) == [list(range(100))]
        return wakes[0]

    assert asyncio.run(main()) == 0


def test_a_stream_ends_when_its_request_is_done_whoever_ends_it():
    """The driver tells each token, then sets `done`; the pool or a cancel set `done` with no token.
    Either ends the stream: the end wakes it (a hang would fail at the test's timeout)."""
    async def main():
        loop = asyncio.get_running_loop()
        finished = GenerationRequest([1], 3)
        failed = GenerationRequest([1], 3)
        streams = TokenStream(finished, loop), TokenStream(failed, loop)

        def drive():
            for t in (7, 8, 9):
                finished.add_token(t)
            finished.finish()
            failed.fail("gave up after 3 pipeline failures")

        consumers = asyncio.gather(*(collect(s) for s in streams))
        await asyncio.sleep(0)  # both wait
        threading.Thread(target=drive).start()
        got_finished, got_failed = await asyncio.wait_for(consumers, 30)
        assert sum(got_finished, []) == [7, 8, 9] and got_failed == []
        assert failed.error == "gave up after 3 pipeline failures"

    asyncio.run(main())


def test_one_wake_serves_every_waiting_stream_of_a_loop():
    """A step gives a token to each of 32 requests while the loop runs something else: when the loop
    comes back, one call_soon_threadsafe has woken all 32 streams."""
    async def main():
        loop = asyncio.get_running_loop()
        requests = [GenerationRequest([1], 1) for _ in range(32)]
        streams = [TokenStream(r, loop) for r in requests]
        consumers = asyncio.gather(*(collect(s) for s in streams))
        await asyncio.sleep(0)  # all 32 wait
        wakes = count_wakes(loop)

        def step():
            for r in requests:
                r.add_token(5)

        driver = threading.Thread(target=step)
        driver.start()
        driver.join()  # on the loop's thread: the loop is busy until the step is told
        after_step = wakes[0]
        for r in requests:
            r.finish()
        assert await asyncio.wait_for(consumers, 30) == [[[5]]] * 32
        return after_step

    assert asyncio.run(main()) == 1


def test_a_stream_with_no_token_and_no_end_times_out():
    async def main():
        request = GenerationRequest([1], 3)
        stream = TokenStream(request, asyncio.get_running_loop())
        with pytest.raises(TimeoutError):
            await collect(stream, timeout_s=0.05)
        request.add_token(1)  # a token after the consumer left goes nowhere, and breaks nothing
        request.finish()

    asyncio.run(main())


def test_a_stream_is_made_before_its_request_ends():
    request = GenerationRequest([1], 3)
    request.finish()
    with pytest.raises(ValueError, match="already ended"):
        TokenStream(request, asyncio.new_event_loop())
