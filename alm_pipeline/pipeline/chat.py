"""Chat data: conversations rendered with each model's own chat template, tokenized with exact byte offsets, and
mapped onto the bytes they share with every other model: the messages' content.

A corpus row may hold ``messages`` (a list of ``{"role", "content"}``) instead of ``text``. Each model renders
it with its own template (``apply_chat_template``'s Jinja, or one given with ``--chat-template FILE``; the
``bytes`` tokenizer has :data:`BYTES_CHAT_TEMPLATE`). Two models' renderings differ in their template text
(role headers, turn separators, BOS/EOS) and agree only on the messages' content, so alignment works in
**content coordinates**: the byte position inside the concatenated contents of the messages.

* :class:`ChatTemplate` renders a conversation by first rendering it with a unique placeholder in place of each
  content (so the template's own text and the content's place in it are known exactly, whatever the template
  does around the content), then putting the content in. A template that drops, repeats or reorders a message
  is an error naming it. Content is inserted verbatim: a template that strips or rewrites content (``| trim``,
  Qwen3's ``</think>`` split) is rendered with the content as given.
* :func:`encode_chat` tokenizes the rendering piece by piece: template text with the tokenizer's special tokens
  recognised (``<|im_start|>`` is one control token), content as plain text (a ``<|im_start|>`` typed inside a
  message stays text), and records for every token the message it belongs to (-1: template).
* :func:`content_offsets` maps a token's end offset in the rendering onto content coordinates; template tokens
  cover no content bytes and are treated like special tokens by the aligner: a run of them on one side pairs
  with the other side's run at the same content position (between the same two messages), or is left out.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from alm_pipeline.pipeline.byteview import ByteView, TokenizerMismatchError

ROLES = ("system", "user", "assistant", "tool")

# the ``bytes`` tokenizer's template: its BOS, then per message a plain-text role header; EOS after each assistant
# turn (<bos> and <eos> are its special tokens; the header is ordinary bytes)
BYTES_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
)

_MAX_TEMPLATE_PIECES = 4096  # distinct template texts remembered per tokenizer (see encode_chat)
_PLACEHOLDER = "\ue000{}\ue001"  # private-use characters: no template rewrites them, no real text holds them
_PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")


class ChatError(ValueError):
    """A conversation cannot be rendered or tokenized; the message names the row or the template."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str


def parse_messages(value, where: str) -> tuple[Message, ...]:
    """A corpus row's ``messages`` as :class:`Message`\\ s; errors name ``where`` (file:line) and the message."""
    if not isinstance(value, list) or not value:
        raise ChatError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatError(f"{where}: message {i} must be an object with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ChatError(
                f"{where}: message {i} has an unknown role {role!r} (use one of {', '.join(ROLES)})"
            )
        if not isinstance(content, str):
            raise ChatError(
                f"{where}: message {i} ({role}) content is {type(content).__name__}, expected a string"
            )
        if not content.strip():
            raise ChatError(f"{where}: message {i} ({role}) has empty content")
        if "\ue000" in content or "\ue001" in content:
            raise ChatError(
                f"{where}: message {i} ({role}) holds U+E000/U+E001, which chat rendering reserves"
            )
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ChatError(f"{where}: message {i} ({role}) is not valid Unicode ({err.reason})") from None
        out.append(Message(role, content))
    return tuple(out)


def messages_json(messages: tuple[Message, ...]) -> str:
    """The canonical JSON a cache stores (and document ids hash)."""
    return json.dumps([{"role": m.role, "content": m.content} for m in messages], ensure_ascii=False)


def messages_from_json(text: str) -> tuple[Message, ...]:
    return tuple(Message(m["role"], m["content"]) for m in json.loads(text))


@dataclass(frozen=True)
class RenderedChat:
    """A rendered conversation as pieces in order: ``(text, message index)``, -1 for the template's own text."""

    pieces: tuple[tuple[str, int], ...]

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.pieces)


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and the special-token strings it may refer to (``bos_token``, ``eos_token``...)."""

    source: str
    name: str  # where it came from, for messages
    tokens: tuple[tuple[str, str], ...] = ()

    def render(self, messages: tuple[Message, ...], where: str = "") -> RenderedChat:
        """The rendering as pieces. The template only ever sees placeholders for the contents, so what it writes
        depends on the roles alone: the layout (template text and where each content goes) is rendered once
        per sequence of roles and remembered."""
        key = (self.source, self.tokens, tuple(m.role for m in messages))
        layout = _LAYOUTS.get(key)
        if layout is None:
            layout = self._layout(messages, where)
            if len(_LAYOUTS) < _MAX_LAYOUTS:
                _LAYOUTS[key] = layout
        return RenderedChat(tuple((messages[i].content, i) if i >= 0 else (text, i) for text, i in layout))

    def _layout(self, messages: tuple[Message, ...], where: str) -> tuple[tuple[str, int], ...]:
        placeholders = [{"role": m.role, "content": _PLACEHOLDER.format(i)} for i, m in enumerate(messages)]
        try:
            rendered = _compile(self.source).render(
                messages=placeholders, add_generation_prompt=False, **dict(self.tokens)
            )
        except Exception as err:  # a template's raise_exception, or a Jinja error
            raise ChatError(f"{where}: the chat template ({self.name}) failed: {err}") from None
        pieces: list[tuple[str, int]] = []
        pos, expected = 0, 0
        for match in _PLACEHOLDER_RE.finditer(rendered):
            index = int(match.group(1))
            if index != expected:
                raise ChatError(
                    f"{where}: the chat template ({self.name}) does not render the messages once each, in order "
                    f"(message {expected} expected, found {index}); the conversation cannot be aligned"
                )
            if match.start() > pos:
                pieces.append((rendered[pos : match.start()], -1))
            pieces.append(("", index))
            pos, expected = match.end(), expected + 1
        if expected != len(messages):
            raise ChatError(
                f"{where}: the chat template ({self.name}) leaves out message {expected} "
                f"({messages[expected].role}); the conversation cannot be aligned"
            )
        if pos < len(rendered):
            pieces.append((rendered[pos:], -1))
        return tuple(pieces)

    def describe(self) -> dict:
        import hashlib

        return {"name": self.name, "sha256": hashlib.sha256(self.source.encode()).hexdigest()[:16]}


def load_chat_template(tokenizer: str, override: str | None = None) -> ChatTemplate | None:
    """The chat template of a tokenizer folder (``chat_template.jinja`` or ``tokenizer_config.json``'s
    ``chat_template``), of ``bytes`` (:data:`BYTES_CHAT_TEMPLATE`), or the file ``override``; None when the
    tokenizer has none."""
    folder = Path(tokenizer) if tokenizer != "bytes" else None
    tokens = (
        _special_token_strings(folder)
        if folder is not None
        else (("bos_token", "<bos>"), ("eos_token", "<eos>"))
    )
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise ChatError(f"--chat-template {override}: no such file")
        return ChatTemplate(path.read_text(encoding="utf-8"), str(path), tokens)
    if folder is None:
        return ChatTemplate(BYTES_CHAT_TEMPLATE, "the bytes tokenizer's built-in template", tokens)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return ChatTemplate(jinja.read_text(encoding="utf-8"), str(jinja), tokens)
    config = _tokenizer_config(folder)
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: the default one
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    if isinstance(source, str) and source.strip():
        return ChatTemplate(source, f"{folder / 'tokenizer_config.json'}", tokens)
    return None


def no_template_message(tokenizer: str, role: str) -> str:
    return (
        f"the {role} tokenizer {tokenizer!r} has no chat template, and the corpus holds conversations "
        "(rows with messages): pass --chat-template FILE (a Jinja template, as in a tokenizer_config.json)"
    )


def _tokenizer_config(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _special_token_strings(folder: Path) -> tuple[tuple[str, str], ...]:
    config = _tokenizer_config(folder)
    out = []
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out.append((key, value))
    return tuple(out)


_COMPILED: dict[str, object] = {}
# (template source, its tokens, the roles of a conversation) -> the rendering's layout (see ChatTemplate.render)
_LAYOUTS: dict[tuple, tuple[tuple[str, int], ...]] = {}
_MAX_LAYOUTS = 65536


def _compile(source: str):
    """A sandboxed Jinja template with what chat templates expect (as transformers sets it up)."""
    if source not in _COMPILED:
        from jinja2 import StrictUndefined  # noqa: F401  (imported for side effects in some templates)
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ChatError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _COMPILED[source] = env.from_string(source)
    return _COMPILED[source]


# ------------------------------------------------------------------------------------------ tokenization


@dataclass(frozen=True)
class ChatEncoding:
    """A rendered conversation tokenized with exact byte offsets into ``text`` (the rendering, cut after the last
    kept token when truncated): ``token_message[u]`` is the message token u belongs to (-1: template), and
    ``content_spans`` (int32, 2 per message) each message's content as [start, end) bytes of ``text``."""

    text: str
    token_ids: np.ndarray  # int32
    offsets: np.ndarray  # int32 byte ends into text
    token_message: np.ndarray  # int16
    content_spans: np.ndarray  # int32, flat (start, end) per message
    truncated: bool


def encode_chat(
    view: ByteView,
    rendered: RenderedChat,
    num_messages: int,
    max_length: int | None = None,
    where: str = "",
    template_pieces: dict | None = None,
) -> ChatEncoding:
    """Tokenize ``rendered`` piece by piece (see the module docstring). Raises :class:`TokenizerMismatchError`
    naming ``where`` when a piece cannot be reproduced byte for byte.

    ``template_pieces``: a dict, kept by the caller across conversations of one tokenizer, that remembers the
    tokens of template text already seen (role headers and turn separators repeat in every conversation)."""
    ids: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    owners: list[np.ndarray] = []
    spans = np.zeros(2 * num_messages, dtype=np.int64)
    pos = 0
    for text, message in rendered.pieces:
        data = text.encode("utf-8")
        if message < 0:
            known = template_pieces.get(text) if template_pieces is not None else None
            if known is None:
                known = _encode_template(view, text, where)
                if template_pieces is not None and len(template_pieces) < _MAX_TEMPLATE_PIECES:
                    template_pieces[text] = known
            piece_ids, piece_lengths = known
        else:
            piece_ids = np.asarray(view.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)
            piece_lengths = view.byte_lengths(piece_ids, data, f" ({where}, message {message})")
            spans[2 * message : 2 * message + 2] = (pos, pos + len(data))
        ids.append(piece_ids)
        lengths.append(np.asarray(piece_lengths, dtype=np.int64))
        owners.append(np.full(len(piece_ids), message, dtype=np.int16))
        pos += len(data)
    token_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    ends = np.cumsum(np.concatenate(lengths)) if lengths else np.zeros(0, dtype=np.int64)
    token_message = np.concatenate(owners) if owners else np.zeros(0, dtype=np.int16)
    data = rendered.text.encode("utf-8")
    truncated = False
    if max_length is not None and len(token_ids) > max_length:
        keep = max_length
        while keep > 0 and not _is_char_boundary(data, int(ends[keep - 1])):
            keep -= 1  # a token ending inside a UTF-8 character: back off so the kept text is valid
        token_ids, ends, token_message = token_ids[:keep], ends[:keep], token_message[:keep]
        data = data[: int(ends[-1]) if keep else 0]
        spans = np.minimum(spans, len(data))
        truncated = True
    return ChatEncoding(
        text=data.decode("utf-8"),
        token_ids=token_ids.astype(np.int32),
        offsets=ends.astype(np.int32),
        token_message=token_message,
        content_spans=spans.astype(np.int32),
        truncated=truncated,
    )


def _encode_template(view: ByteView, text: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Template text with special tokens recognised: each special covers its literal string; the text between
    them is read back exactly (:meth:`ByteView.byte_lengths`)."""
    tokenizer = view.tokenizer
    tokenizer.encode_special_tokens = False
    try:
        enc = tokenizer.encode(text, add_special_tokens=False)
    finally:
        tokenizer.encode_special_tokens = True
    ids = np.asarray(enc.ids, dtype=np.int64)
    lengths = np.zeros(len(ids), dtype=np.int64)
    special = view.is_special[ids] if len(ids) else np.zeros(0, dtype=bool)
    char_pos, run_start = 0, 0
    for u in [*np.flatnonzero(special).tolist(), len(ids)]:
        run_end_char = enc.offsets[u][0] if u < len(ids) else len(text)
        if u > run_start:  # the plain run before this special token
            run = text[char_pos:run_end_char].encode("utf-8")
            lengths[run_start:u] = view.byte_lengths(ids[run_start:u], run, f" ({where}, chat template text)")
        elif run_end_char > char_pos:
            raise TokenizerMismatchError(
                f"{where}: chat template text {text[char_pos:run_end_char]!r} got no tokens"
            )
        if u < len(ids):
            literal = text[enc.offsets[u][0] : enc.offsets[u][1]]
            lengths[u] = len(literal.encode("utf-8"))
            char_pos, run_start = enc.offsets[u][1], u + 1
    if int(lengths.sum()) != len(text.encode("utf-8")):
        raise TokenizerMismatchError(
            f"{where}: the tokens of the chat template text {text!r} do not cover it"
        )
    return ids, lengths


def _is_char_boundary(data: bytes, offset: int) -> bool:
    return offset <= 0 or offset >= len(data) or (data[offset] & 0xC0) != 0x80


def content_offsets(
    offsets: np.ndarray, token_message: np.ndarray, content_spans: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(per token its end in content coordinates, per token whether it is template, per message its
    [start, end) in content coordinates, flat). Content coordinates count only the messages' content bytes."""
    spans = np.asarray(content_spans, dtype=np.int64).reshape(-1, 2)
    starts, ends = spans[:, 0], spans[:, 1]
    sizes = ends - starts
    before = np.concatenate([[0], np.cumsum(sizes)])  # content bytes before each message
    x = np.asarray(offsets, dtype=np.int64)
    k = np.searchsorted(starts, x, side="right") - 1  # the last message starting at or before x
    inside = np.where(k >= 0, np.minimum(x - starts[np.maximum(k, 0)], sizes[np.maximum(k, 0)]), 0)
    cc = np.where(k >= 0, before[np.maximum(k, 0)] + inside, 0)
    ranges = np.stack([before[:-1], before[1:]], axis=1).reshape(-1)
    return cc.astype(np.int32), np.asarray(token_message) < 0, ranges.astype(np.int64)
