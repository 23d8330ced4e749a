"""Tokenizer, chat rendering and incremental detokenization on the default model's vocabulary.

The reference is transformers' own GGUF tokenizer for the same file.
"""

from __future__ import annotations

import random

import gguf
import pytest
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from services.decode.text_stream import TextStream
from services.engine import gguf_loader
from services.engine.config import DEFAULT_MODEL
from services.engine.detokenizer import IncrementalDetokenizer
from services.engine.loader import default_gguf_path, load_tokenizer
from services.engine.tokenizer import Tokenizer

STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < 10; ++i) { x[i] = i * 2; }",
    "1234567890",
    "Pi is 3.14159, e is 2.71828",
    "$100,000.00 and 50%",
    "a1b2c3 x2 2x",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\n",
    "    indented code\n\tand tab",
    "héllo café naïve",
    "日本語のテキスト 你好世界",
    "Emoji: 😀👍🏽🇺🇸 ❤️",
    "Привет, мир",
    "مرحبا بالعالم",
    "I'm sure they'll say it's fine, don't you?",
    "<|im_start|>user\nHi<|im_end|>\n",
    "text<|endoftext|>more",
    "\u00a0nbsp\u200bzero width",
    "",
]
# Whitespace right before a digit: the model's published tokenizer (and llama.cpp's "smollm"
# pre-tokenizer) isolates every digit first, so "  " stays one piece; transformers' GGUF path
# skips that step and splits the spaces. These are compared against the published pre-tokenizer.
DIGIT_AFTER_SPACE = ["x  1", "a\n\n\n  42", "line1\n 2\n  3", "٣٤ ² ½ Ⅻ"]

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "Thanks! 😀"},
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    path = default_gguf_path()
    with pytest.MonkeyPatch.context() as patch:
        # Share our parsed reader: parsing the header is slow and is not what is compared.
        patch.setattr(gguf, "GGUFReader", gguf_loader.open_reader)
        return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_special_ids(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == 49152
    assert tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_ids == [2, 0]  # <|im_end|>, then <|endoftext|>
    assert [tokenizer.id_to_piece(i) for i in (0, 1, 2)] == [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
    ]
    assert tokenizer.is_special(1) and not tokenizer.is_special(4093)


def test_ids_match_transformers(tokenizer: Tokenizer, reference) -> None:
    for text in STRINGS:
        assert tokenizer.encode(text) == reference.encode(text, add_special_tokens=False), text
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_digits_split_like_published_tokenizer(tokenizer: Tokenizer, reference) -> None:
    published = BackendTokenizer.from_str(reference.backend_tokenizer.to_str())
    published.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    for text in STRINGS + DIGIT_AFTER_SPACE:
        assert tokenizer.encode(text) == published.encode(text, add_special_tokens=False).ids
    assert [tokenizer.id_to_piece(i) for i in tokenizer.encode("x  12")] == ["x", "ĠĠ", "1", "2"]


def test_special_tokens_in_text_are_single_ids(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("<|im_start|>assistant\nok<|im_end|><|endoftext|>")
    assert ids[0] == 1 and ids[-2:] == [2, 0]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "assistant\nok"
    # The GGUF says add_bos_token = false, so add_special_tokens adds nothing here.
    assert tokenizer.encode("hi", add_special_tokens=True) == tokenizer.encode("hi")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("with_system", [True, False])
def test_chat_render_matches_transformers(
    tokenizer: Tokenizer, reference, add_generation_prompt: bool, with_system: bool
) -> None:
    messages = MESSAGES if with_system else MESSAGES[1:]
    ours = tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt)
    theirs = reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_chat_template_errors_are_value_errors() -> None:
    backend = BackendTokenizer(models.BPE(vocab={"a": 0}, merges=[]))
    template = "{{ raise_exception('roles must alternate') }}"
    tok = Tokenizer(backend, bos_token_id=None, eos_token_ids=[], chat_template=template)
    with pytest.raises(ValueError, match="roles must alternate"):
        tok.render_chat([{"role": "user", "content": "x"}])


def test_template_helpers_like_transformers() -> None:
    backend = BackendTokenizer(models.BPE(vocab={"a": 0}, merges=[]))
    template = (
        "{% for m in messages %}{% generation %}{{ m['content'] | tojson }}{% endgeneration %}"
        "{% break %}{% endfor %}{{ tools }}|{{ flavour }}"
    )
    tok = Tokenizer(backend, bos_token_id=None, eos_token_ids=[], chat_template=template)
    messages = [{"role": "user", "content": 'é"'}, {"role": "user", "content": "never"}]
    assert tok.render_chat(messages, flavour="x") == '"é\\""None|x'


def test_default_template_is_chatml() -> None:
    backend = BackendTokenizer(models.BPE(vocab={"a": 0}, merges=[]))
    tok = Tokenizer(backend, bos_token_id=None, eos_token_ids=[], chat_template=None)
    rendered = tok.render_chat([{"role": "user", "content": "hi"}])
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def _stream(tokenizer: Tokenizer, ids: list[int], skip: bool) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    return [detok.push([token_id]) for token_id in ids] + [detok.flush()]


@pytest.mark.parametrize("skip", [True, False])
def test_detokenizer_streams_whole_characters(tokenizer: Tokenizer, skip: bool) -> None:
    texts = ["naïve café à la crème", "中文字符和日本語", "emoji 😀👍🏽🇺🇸 and ❤️!", *STRINGS]
    for text in texts:
        ids = tokenizer.encode(f"<|im_start|>assistant\n{text}<|im_end|>")
        deltas = _stream(tokenizer, ids, skip)
        assert all("\ufffd" not in delta for delta in deltas), text
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip)
    deltas = _stream(tokenizer, tokenizer.encode("<|im_start|>hi<|im_end|>"), skip)
    assert "".join(deltas) == ("hi" if skip else "<|im_start|>hi<|im_end|>")


def test_detokenizer_holds_partial_characters(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("😀")
    assert len(ids) > 1  # one character, several byte-level tokens
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.push([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.push(ids[-1:]) == "😀"


def test_detokenizer_matches_decode_on_arbitrary_ids(tokenizer: Tokenizer) -> None:
    # Random ids include stray continuation bytes and cut sequences: the stream must still end
    # equal to the backend's lossy decode, replacement characters included.
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 8))]
        for skip in (True, False):
            streamed = "".join(_stream(tokenizer, ids, skip))
            assert streamed == tokenizer.decode(ids, skip_special_tokens=skip)


def _sentencepiece_style() -> Tokenizer:
    """A Llama-2-style vocabulary: '▁' for spaces, byte fallback for anything unknown."""
    chars = "▁abcdefghijklmnopqrstuvwxyz"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    vocab.update({char: len(vocab) + i for i, char in enumerate(chars)})
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    backend = BackendTokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1),
        ]
    )
    backend.add_special_tokens([AddedToken("<s>"), AddedToken("</s>")])
    return Tokenizer(backend, bos_token_id=1, eos_token_ids=[2], chat_template=None)


@pytest.mark.parametrize("skip", [True, False])
def test_detokenizer_fallback_for_sentencepiece(skip: bool) -> None:
    tok = _sentencepiece_style()
    assert not tok.is_byte_level
    ids = tok.encode("the café theme 😀 über") + [2]
    assert any(3 <= i < 259 for i in ids)  # byte-fallback pieces are exercised
    deltas = _stream(tok, ids, skip)
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)


def _metaspace_words() -> Tokenizer:
    """A Llama-2-style tokenizer.json in miniature: Metaspace pre-tokenizer and decoder (a space
    becomes '▁' and the decoder strips the first piece's), whole words as pieces."""
    words = ["<unk>", "<s>", "</s>", "▁The", "▁capital", "▁of", "▁France", "▁is", "▁Paris", "."]
    backend = BackendTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
            pre_tokenizers.Punctuation(),
        ]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    backend.add_special_tokens([AddedToken("<s>"), AddedToken("</s>")])
    return Tokenizer(backend, bos_token_id=1, eos_token_ids=[2], chat_template=None)


@pytest.mark.parametrize("num_prompt_tokens", [1, 4, 5])
def test_metaspace_keeps_the_first_generated_space(num_prompt_tokens: int) -> None:
    tok = _metaspace_words()
    ids = [1, *tok.encode("The capital of France is Paris.")]
    prompt_ids, output_ids = ids[: num_prompt_tokens + 1], ids[num_prompt_tokens + 1 :] + [2]
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt_ids)
    deltas = [detok.push([token_id]) for token_id in output_ids] + [detok.flush()]
    full, prompt = (tok.decode(i, skip_special_tokens=True) for i in (ids, prompt_ids))
    assert "".join(deltas) == full[len(prompt) :]
    assert deltas[0].startswith(" ")  # not "capital..." or "isParis."
    # Decode streams it the same way, stop strings held back and cut as before.
    stream = TextStream(tok, ["Paris"], include_stop_str=False, prompt_ids=prompt_ids)
    text, stopped = "", False
    for token_id in output_ids:
        delta, stopped = stream.push(token_id, is_last=False)
        text += delta
        if stopped:
            break
    assert stopped and text == full[len(prompt) :].split("Paris")[0]
