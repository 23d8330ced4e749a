"""Text <-> token ids and chat rendering, over a `tokenizers` backend built by a loader."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from functools import cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders

from services.engine.chat_tools import apply_tools, template_tool_support

# Markers that close a turn or a document in common chat vocabularies. A model trained on one of
# these may end its reply with either its declared eos or the turn marker, so both stop generation.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
)

# Used only when a model ships no template: ChatML, the format most small instruct models use.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character, so BPE never sees
    whitespace or control bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@cache
def unicode_to_bytes() -> dict[str, int]:
    return {char: byte for byte, char in bytes_to_unicode().items()}


def end_token_ids(declared: Iterable[int], token_to_id: Callable[[str], int | None]) -> list[int]:
    """The declared eos ids first, then any end-of-turn marker the vocabulary has."""
    ids = list(dict.fromkeys(declared))
    for token in END_OF_TURN_TOKENS:
        token_id = token_to_id(token)
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    return ids


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; when
    rendering a prompt it only has to render its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes; templates expect plain JSON, as transformers renders it.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile the way transformers does, so renders match `apply_chat_template` exactly."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"chat template does not compile: {exc}") from exc


class Tokenizer:
    """One model's tokenizer. Immutable after construction and safe to share across requests."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: list[int],
        chat_template: str | None,
        template_tokens: dict[str, str] | None = None,
    ) -> None:
        self.backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(eos_token_ids)
        self.chat_template = chat_template
        added = backend.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, tok in added.items() if tok.special)
        # Byte-level vocabularies decode by concatenating piece bytes, which makes incremental
        # detokenization exact; other decoders need the re-decode fallback.
        self.is_byte_level = isinstance(backend.decoder, decoders.ByteLevel)
        template_source = chat_template or DEFAULT_CHAT_TEMPLATE
        self._template = compile_chat_template(template_source)
        self._template_tokens = template_tokens or self._default_template_tokens()
        self._tool_support = template_tool_support(
            self._template, template_source, self._base_context()
        )
        self._piece_bytes: list[bytes] | None = None

    def _base_context(self) -> dict[str, Any]:
        """What the template renders with besides the messages, before a request's own."""
        return {"tools": None, "documents": None, **self._template_tokens}

    def _default_template_tokens(self) -> dict[str, str]:
        tokens: dict[str, str] = {}
        if self.bos_token_id is not None:
            tokens["bos_token"] = self.id_to_piece(self.bos_token_id)
        if self.eos_token_ids:
            tokens["eos_token"] = self.id_to_piece(self.eos_token_ids[0])
        return tokens

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # Special tokens written in the text (e.g. "<|im_start|>") always map to their ids;
        # add_special_tokens only controls the bos/eos the post-processor adds around the text.
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, token_id: int) -> str:
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary ({self.vocab_size})")
        return piece

    def token_to_id(self, piece: str) -> int | None:
        return self.backend.token_to_id(piece)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def piece_bytes(self) -> list[bytes]:
        """Each id's bytes under the byte-level alphabet, indexed by id; built once."""
        if not self.is_byte_level:
            raise ValueError("piece bytes exist only for byte-level vocabularies")
        if self._piece_bytes is None:
            table = unicode_to_bytes()
            pieces: list[bytes] = []
            for token_id in range(self.vocab_size):
                piece = self.backend.id_to_token(token_id) or ""
                # Mirrors the ByteLevel decoder: a piece with any character outside the alphabet
                # (an added token spelled in plain text) is emitted as its own UTF-8.
                if all(char in table for char in piece):
                    pieces.append(bytes(table[char] for char in piece))
                else:
                    pieces.append(piece.encode())
            self._piece_bytes = pieces
        return self._piece_bytes

    def render_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """`tools` are OpenAI function tools. They, and the messages' tool calls and results,
        go through the template where it has a place for them, else the default format."""
        messages = apply_tools(messages, tools, self._tool_support)
        context = self._base_context()
        if tools and self._tool_support.tools:
            context["tools"] = tools
        context.update(template_kwargs)
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **context
            )
        except jinja2.TemplateError as exc:
            raise ValueError(f"chat template rejected the messages: {exc}") from exc
