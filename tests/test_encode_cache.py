"""The tokenizer service's encoding cache: the ids of whole-text encoding, with repeated
messages taken from the cache."""

import copy
import random

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import processors

from services.engine.config import DEFAULT_MODEL
from services.engine.loader import load_tokenizer
from services.engine.tokenizer import Tokenizer
from services.tokenizer.encode_cache import EncodeCache
from tests.test_tokenizer import STRINGS, _metaspace_words


class CountingBackend:
    """A tokenizer backend that records the texts encoded piece by piece."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.encoded: list[str] = []

    def encode_batch(self, texts, add_special_tokens):
        self.encoded += texts
        return self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)

    def encode(self, text, add_special_tokens):
        self.encoded.append(text)
        return self.backend.encode(text, add_special_tokens=add_special_tokens)

    def __getattr__(self, name: str):
        return getattr(self.backend, name)


def counting(tokenizer: Tokenizer) -> tuple[Tokenizer, CountingBackend]:
    counted = copy.copy(tokenizer)
    counted.backend = backend = CountingBackend(tokenizer.backend)
    return counted, backend


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer(DEFAULT_MODEL)


def test_texts_with_added_tokens_encode_as_whole_texts(tokenizer: Tokenizer) -> None:
    cache = EncodeCache(tokenizer, 1 << 16)
    added = [t.content for t in tokenizer.backend.get_added_tokens_decoder().values()]
    rng = random.Random(0)
    texts = list(STRINGS)
    for _ in range(2000):
        parts = [rng.choice(STRINGS)[: rng.randint(0, 12)] for _ in range(rng.randint(0, 6))]
        texts.append("".join(p + (rng.choice(added) if rng.random() < 0.5 else "") for p in parts))
    # Two new pieces long enough to be encoded in parallel.
    for _ in range(20):
        long_pieces = [" ".join(rng.choices(STRINGS, k=200)) for _ in range(2)]
        assert min(map(len, long_pieces)) >= 2048
        texts.append(rng.choice(added).join(long_pieces))
    for text in texts + texts:  # the second time from the cache
        assert cache.encode(text) == tokenizer.encode(text), repr(text)


def test_the_next_turn_encodes_only_its_new_messages(tokenizer: Tokenizer) -> None:
    counted, backend = counting(tokenizer)
    cache = EncodeCache(counted, 1 << 16)
    backend.encoded.clear()  # the start-up check
    chat = [{"role": "user", "content": "Name three rivers."}]
    first = tokenizer.render_chat(chat, add_generation_prompt=True)
    assert cache.encode(first) == tokenizer.encode(first)
    chat += [
        {"role": "assistant", "content": "Nile, Amazon, Danube."},
        {"role": "user", "content": "Which is longest?"},
    ]
    backend.encoded.clear()
    second = tokenizer.render_chat(chat, add_generation_prompt=True)
    assert cache.encode(second) == tokenizer.encode(second)
    assert backend.encoded == ["assistant\nNile, Amazon, Danube.", "user\nWhich is longest?"]
    backend.encoded.clear()
    assert cache.encode(second) == tokenizer.encode(second)
    assert backend.encoded == []


def test_cached_answers_only_what_needs_no_tokenizer(tokenizer: Tokenizer) -> None:
    counted, backend = counting(tokenizer)
    cache = EncodeCache(counted, 1 << 16)
    text = "<|im_start|>user\nNew words here<|im_end|>\n"
    assert cache.cached(text) is None
    cache.encode(text)
    backend.encoded.clear()
    assert cache.cached(text) == tokenizer.encode(text)
    assert cache.cached(text + "and more") is None
    assert backend.encoded == []


def test_the_least_recently_used_text_leaves_first(tokenizer: Tokenizer) -> None:
    counted, backend = counting(tokenizer)
    cache = EncodeCache(counted, 8)  # tokens
    texts = ["one two three", "four five six", "seven eight nine"]  # 3 tokens each
    for text in texts[:2] + texts[:1] + texts[2:]:  # uses the first again, then a third
        cache.encode(text)
    backend.encoded.clear()
    for text in texts[::2] + texts[1:2]:  # the two kept, then the one that left
        cache.encode(text)
    assert backend.encoded == ["four five six"]


def test_special_tokens_added_around_a_text_come_with_the_cached_ids(
    tokenizer: Tokenizer,
) -> None:
    framed = copy.copy(tokenizer)  # a BOS before every text, an EOS after it
    framed.backend = BackendTokenizer.from_str(tokenizer.backend.to_str())
    framed.backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A <|im_end|>",
        special_tokens=[("<|im_start|>", 1), ("<|im_end|>", 2)],
    )
    cache = EncodeCache(framed, 1 << 16)
    for text in ["Once upon a time", "<|im_start|>user\nHi<|im_end|>", ""]:
        expected = framed.encode(text, add_special_tokens=True)
        assert expected[0] == 1 and expected[-1] == 2
        assert cache.encode(text, add_special_tokens=True) == expected
        assert cache.cached(text, add_special_tokens=True) == expected


def test_a_tokenizer_whose_pieces_depend_on_their_place_encodes_whole() -> None:
    # Metaspace with prepend_scheme "first" marks only the text's first word.
    metaspace = _metaspace_words()
    tok, backend = counting(metaspace)
    cache = EncodeCache(tok, 1 << 16)
    text = "The capital</s>of France<s>is Paris."
    backend.encoded.clear()
    assert cache.encode(text) == metaspace.encode(text)
    assert backend.encoded == [text]
