"""Exact byte views of tokenizers.

Every stage of the pipeline works on bytes, never on decoded strings. A :class:`ByteView` knows, for every
token id of a tokenizer, the exact UTF-8 bytes that token stands for in the text:

* byte-level BPE (GPT-2, Llama-3, Qwen, SmolLM): vocabulary strings are written in the GPT-2
  ``bytes_to_unicode`` alphabet (``Ġ`` = space, ``Ċ`` = newline, ...), one character per byte;
* SentencePiece style (Mistral, Llama-2, Gemma): ``▁`` stands for a space and ``<0xNN>`` pieces are
  single bytes (byte fallback); the tokenizer may add a "dummy prefix" space that is not in the text;
* plain tokenizers whose vocabulary strings are the text itself (character- or word-level);
* special tokens (BOS, EOS, chat-template tokens) cover no bytes of the text.

In a SentencePiece-style tokenizer a ``▁`` stands for a space, but the same character can also be in the text
itself (U+2581), and non-special added tokens (Gemma's whitespace runs ``▁▁``, ``▁▁▁``, ...) are matched in the
raw text while the model produces the same ids from normalised spaces. So the bytes of such a token are read per
occurrence: ``token_bytes`` holds the usual reading (``▁`` = space), and a text whose tokens do not join to it is
read again token by token, each ``▁`` as a space where the text has one and as U+2581 where the text has that
(:meth:`ByteView.reads_as`).

``encode`` tokenizes a text as plain text (strings such as ``<|endoftext|>`` or ``<s>`` inside a document are
never turned into control tokens), adds the tokenizer's own prefix/suffix special tokens, and returns per
token the byte END offset into the text's UTF-8 encoding. It checks that the tokens' bytes concatenate to
the text and raises :class:`TokenizerMismatchError` otherwise: offsets that do not reproduce the text are
never returned.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from alm_pipeline.pipeline.byte_tokenizer import build_byte_tokenizer, unicode_to_bytes

# Bytes after which a new pretoken starts: the boundary set B of the method (space, newline, tab).
BOUNDARY_BYTES = frozenset(b" \n\t")

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SPIECE_SPACE = "\u2581"  # ▁
_UNICODE_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD"}
_HARMLESS_NORMALIZERS = {"Prepend", "Replace"}  # checked in detail below


class TokenizerMismatchError(ValueError):
    """The tokenizer cannot reproduce the bytes of a text (or cannot be used at all)."""


@dataclass(frozen=True)
class EncodedText:
    """A text tokenized with exact byte offsets.

    ``offsets[u]`` is the byte END offset of token u in ``text.encode("utf-8")``; a token covering no bytes
    (BOS, a dummy-prefix piece) repeats the previous offset (0 at the start).
    """

    text: str
    token_ids: np.ndarray  # int32
    offsets: np.ndarray  # int32
    truncated: bool = False


@dataclass(frozen=True)
class EncodedBatch:
    """Many texts tokenized with exact byte offsets, as flat arrays: text i's tokens are
    ``token_ids[rows[i]:rows[i + 1]]`` (int32) with byte end offsets ``offsets[...]`` (int32, as in
    :class:`EncodedText`); ``rows`` int64 (one per text + 1); ``text_bytes`` (int64) each text's UTF-8 length;
    ``failed`` {text index: error message} for the texts the tokenizer cannot reproduce (their rows hold no
    meaningful tokens)."""

    token_ids: np.ndarray
    offsets: np.ndarray
    rows: np.ndarray
    text_bytes: np.ndarray
    failed: dict[int, str]


@dataclass
class ByteView:
    """Byte representation of a tokenizer's vocabulary plus its encoding conventions."""

    name: str
    kind: str  # "byte_level" | "sentencepiece" | "plain"
    tokenizer: Tokenizer  # the backend, with unicode normalizers removed (see ``text_normalization``)
    token_bytes: list[bytes]
    is_special: np.ndarray  # bool, per id
    prefix_ids: list[int]
    suffix_ids: list[int]
    text_normalization: str | None  # "NFC" etc. when the original tokenizer normalized text that way
    fingerprint: str
    eos_id: int | None = None
    bos_id: int | None = None
    pad_id: int | None = None
    # the token (when the tokenizer has one) that stands for characters outside the vocabulary: such a tokenizer
    # cannot reproduce a text containing them (no byte fallback)
    unknown_token: str | None = None
    # per id, the piece string whose ``▁`` may read as a space or as U+2581 (SentencePiece style only)
    flex_pieces: dict[int, str] = field(default_factory=dict, repr=False)
    token_lengths: np.ndarray = field(init=False)
    boundary_mask: np.ndarray = field(init=False)
    _flat_bytes: np.ndarray = field(init=False, repr=False)  # all tokens' bytes, concatenated (uint8)
    _flat_starts: np.ndarray = field(init=False, repr=False)  # where each token's bytes start in it

    def __post_init__(self) -> None:
        self.token_lengths = np.array([len(b) for b in self.token_bytes], dtype=np.int32)
        self._flat_bytes = np.frombuffer(b"".join(self.token_bytes), dtype=np.uint8)
        self._flat_starts = (np.cumsum(self.token_lengths, dtype=np.int64) - self.token_lengths).astype(
            np.int64
        )
        starts_at_boundary = np.array(
            [len(b) > 0 and b[0] in BOUNDARY_BYTES for b in self.token_bytes], dtype=bool
        )
        self.boundary_mask = starts_at_boundary | self.is_special

    def __setstate__(self, state: dict) -> None:
        # `encode_special_tokens` is not part of a tokenizer's serialized form: restore it after unpickling
        # (Ray ships byte views to workers), or special-token strings in documents would become control tokens.
        self.__dict__.update(state)
        self.tokenizer.encode_special_tokens = True

    @property
    def vocab_size(self) -> int:
        return len(self.token_bytes)

    @property
    def emits_unknown(self) -> bool:
        """Whether characters outside the vocabulary become an unknown token (no byte fallback): a text with such
        a character cannot be reproduced."""
        return self.unknown_token is not None

    def reads_as(self, token_id: int, data: bytes) -> bool:
        """Whether an occurrence of ``token_id`` may cover exactly ``data``: its usual bytes, or (SentencePiece
        style) its piece with each ``▁`` read as a space or as U+2581, or that with a leading dummy-prefix ``▁``
        read as nothing."""
        if data == self.token_bytes[token_id]:
            return True
        ids = np.array([token_id], dtype=np.int64)
        return any(self._read_occurrences(ids, data, dummy) is not None for dummy in (False, True))

    @property
    def max_token_bytes(self) -> int:
        return int(self.token_lengths.max()) if self.vocab_size else 1

    def boundary_token_ids(self) -> np.ndarray:
        return np.flatnonzero(self.boundary_mask).astype(np.int32)

    def normalize_text(self, text: str) -> str:
        """Apply the unicode normalization the original tokenizer would have applied."""
        if self.text_normalization:
            return unicodedata.normalize(self.text_normalization, text)
        return text

    def encode(
        self,
        text: str,
        max_length: int | None = None,
        add_special_tokens: bool = True,
        doc_ref: str = "",
    ) -> EncodedText:
        """Tokenize ``text`` as plain text with exact byte offsets.

        With ``max_length``, keeps the first ``max_length`` tokens (prefix special tokens included) and cuts
        the text to exactly the bytes those tokens cover, backing off to the last token boundary that falls
        on a UTF-8 character boundary so the kept text is valid UTF-8.
        """
        where = f" (document {doc_ref})" if doc_ref else ""
        text_bytes = text.encode("utf-8")  # raises on lone surrogates: caller validates first
        prefix = self.prefix_ids if add_special_tokens else []
        suffix = self.suffix_ids if add_special_tokens else []
        source = text
        precut = False
        if max_length is not None:
            # Bound memory for huge documents: tokenizing far more bytes than max_length tokens can cover
            # is wasted work. Cut at a character boundary well past what max_length tokens can span.
            limit_bytes = (max_length + 8) * max(self.max_token_bytes, 4) * 2
            if len(text_bytes) > limit_bytes:
                source = text_bytes[:limit_bytes].decode("utf-8", errors="ignore")
                precut = True
        ids = self.tokenizer.encode(source, add_special_tokens=False).ids
        source_bytes = source.encode("utf-8") if precut else text_bytes
        lengths = self.byte_lengths(np.asarray(ids, dtype=np.int64), source_bytes, where)
        all_ids = np.array(list(prefix) + list(ids) + list(suffix), dtype=np.int32)
        body_ends = np.cumsum(lengths, dtype=np.int64)
        end = int(body_ends[-1]) if len(body_ends) else 0
        offsets = np.concatenate(
            [np.zeros(len(prefix), dtype=np.int64), body_ends, np.full(len(suffix), end, dtype=np.int64)]
        ).astype(np.int32)
        truncated = precut
        if max_length is not None and len(all_ids) > max_length:
            truncated = True
            keep = max_length
            # back off until the kept tokens end on a character boundary
            while keep > 0 and not _is_char_boundary(source_bytes, int(offsets[keep - 1])):
                keep -= 1
            all_ids, offsets = all_ids[:keep], offsets[:keep]
        if truncated:
            end = int(offsets[-1]) if len(offsets) else 0
            text = source_bytes[:end].decode("utf-8")
        return EncodedText(text=text, token_ids=all_ids, offsets=offsets, truncated=truncated)

    def encode_batch(
        self, texts: list[str], max_length: int | None = None, doc_refs: list[str] | None = None
    ) -> EncodedBatch:
        """:meth:`encode` of many texts at once (special tokens added), as one :class:`EncodedBatch`; a text
        the tokenizer cannot reproduce is reported in ``failed`` (named by ``doc_refs[i]``) instead of raising.

        The tokenizer runs once per text (``encode_batch_fast`` of one text: the ids without the character
        offsets ``encode`` computes, which are not needed here; one core); everything else - the byte check
        (the tokens' bytes must concatenate to the text, or to a dummy-prefix space plus the text), the offsets,
        the prefix / suffix special tokens and truncation to ``max_length`` - is done on flat arrays for all
        texts. A text whose check fails is passed to :meth:`encode` itself, which raises the error
        reported for it (or, should the two ever disagree, gives the encoding used).
        """
        data = [text.encode("utf-8") for text in texts]
        num_docs = len(texts)
        prefix = np.asarray(self.prefix_ids, dtype=np.int32)
        suffix = np.asarray(self.suffix_ids, dtype=np.int32)
        n_pre, n_suf = len(prefix), len(suffix)
        sources, source_data = texts, data
        if max_length is not None:  # the pre-cut of ByteView.encode, for the same texts
            limit_bytes = (max_length + 8) * max(self.max_token_bytes, 4) * 2
            long = [i for i, b in enumerate(data) if len(b) > limit_bytes]
            if long:
                sources, source_data = list(texts), list(data)
                for i in long:
                    sources[i] = data[i][:limit_bytes].decode("utf-8", errors="ignore")
                    source_data[i] = sources[i].encode("utf-8")

        tok = self.tokenizer
        fast = getattr(tok, "encode_batch_fast", None)
        if fast is not None:
            id_lists = [fast([source], add_special_tokens=False)[0].ids for source in sources]
        else:  # pragma: no cover - tokenizers without encode_batch_fast
            id_lists = [tok.encode(source, add_special_tokens=False).ids for source in sources]
        n_body = np.fromiter(map(len, id_lists), dtype=np.int64, count=num_docs)
        body_rows = np.zeros(num_docs + 1, dtype=np.int64)
        np.cumsum(n_body, out=body_rows[1:])
        ids = np.fromiter(chain.from_iterable(id_lists), dtype=np.int64, count=int(body_rows[-1]))
        lengths = self.token_lengths[ids]

        # The byte check, all texts at once.
        if len(ids) and int(lengths.max()) <= 1:  # one byte per token at most (a byte-level student)
            joined = self._flat_bytes[self._flat_starts[ids[lengths > 0]]]
        else:
            joined = self._joined_bytes(ids, lengths)
        text_arr = np.frombuffer(b"".join(source_data), dtype=np.uint8)
        text_len = np.fromiter(map(len, source_data), dtype=np.int64, count=num_docs)
        text_rows = np.zeros(num_docs + 1, dtype=np.int64)
        np.cumsum(text_len, out=text_rows[1:])
        cum = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=cum[1:])
        joined_len = cum[body_rows[1:]] - cum[body_rows[:-1]]
        if np.array_equal(joined_len, text_len):
            dummy = np.zeros(num_docs, dtype=bool)
            differ = np.flatnonzero(joined != text_arr)
            bad = np.zeros(num_docs, dtype=bool)
            bad[np.searchsorted(text_rows, differ, side="right") - 1] = True
        else:
            # a text matches exactly, or (dummy prefix) its tokens' bytes are a space followed by the text
            dummy = joined_len == text_len + 1
            dummy[dummy] = joined[cum[body_rows[:-1][dummy]]] == 0x20
            same = joined_len == text_len
            joined_mask = np.repeat(same | dummy, joined_len)
            joined_mask[cum[body_rows[:-1][dummy]]] = False  # the dummy space is not compared
            text_mask = np.repeat(same | dummy, text_len)
            compared_rows = np.zeros(num_docs + 1, dtype=np.int64)
            np.cumsum(np.where(same | dummy, text_len, 0), out=compared_rows[1:])
            differ = np.flatnonzero(joined[joined_mask] != text_arr[text_mask])
            bad = ~(same | dummy)
            bad[np.searchsorted(compared_rows, differ, side="right") - 1] = True
            dummy &= ~bad
            if dummy.any():
                lengths = lengths.copy()
                lengths[body_rows[:-1][dummy]] -= 1  # the dummy-prefix space is carried by the first token
                np.cumsum(lengths, out=cum[1:])
        body_ends = cum[1:] - np.repeat(cum[body_rows[:-1]], n_body)  # document-local byte end offsets
        text_end = cum[body_rows[1:]] - cum[body_rows[:-1]]

        # prefix + body + suffix per text
        n_tokens = n_pre + n_body + n_suf
        rows = np.zeros(num_docs + 1, dtype=np.int64)
        np.cumsum(n_tokens, out=rows[1:])
        if n_pre or n_suf:
            out_ids = np.empty(int(rows[-1]), dtype=np.int32)
            offsets = np.empty(int(rows[-1]), dtype=np.int64)
            body = np.ones(int(rows[-1]), dtype=bool)
            pre_pos = (rows[:-1, None] + np.arange(n_pre)).ravel()
            suf_pos = (rows[1:, None] - n_suf + np.arange(n_suf)).ravel()
            body[pre_pos] = False
            body[suf_pos] = False
            out_ids[body] = ids
            offsets[body] = body_ends
            out_ids[pre_pos] = np.tile(prefix, num_docs)
            offsets[pre_pos] = 0
            out_ids[suf_pos] = np.tile(suffix, num_docs)
            offsets[suf_pos] = np.repeat(text_end, n_suf)
        else:
            out_ids, offsets = ids.astype(np.int32), body_ends
        offsets = offsets.astype(np.int32)

        if max_length is not None:
            # keep the first max_length tokens, backing off until the kept tokens end on a character boundary
            over = np.flatnonzero((n_tokens > max_length) & ~bad)
            if len(over):
                keep = np.full(len(over), max_length, dtype=np.int64)
                active = np.arange(len(over))
                while len(active):
                    active = active[keep[active] > 0]
                    o = offsets[rows[over[active]] + keep[active] - 1].astype(np.int64)
                    inside = (o > 0) & (o < text_len[over[active]])
                    at = text_rows[over[active][inside]] + o[inside]
                    split = np.zeros(len(active), dtype=bool)
                    split[inside] = (text_arr[at] & 0xC0) == 0x80
                    active = active[split]
                    keep[active] -= 1
                new_tokens = n_tokens.copy()
                new_tokens[over] = keep
                position = np.arange(int(rows[-1])) - np.repeat(rows[:-1], n_tokens)
                mask = position < np.repeat(new_tokens, n_tokens)
                out_ids, offsets = out_ids[mask], offsets[mask]
                n_tokens = new_tokens
                rows = np.zeros(num_docs + 1, dtype=np.int64)
                np.cumsum(n_tokens, out=rows[1:])

        failed: dict[int, str] = {}
        replaced: dict[int, EncodedText] = {}
        for i in np.flatnonzero(bad).tolist():
            try:
                replaced[i] = self.encode(
                    texts[i], max_length=max_length, doc_ref=doc_refs[i] if doc_refs else ""
                )
            except TokenizerMismatchError as err:
                failed[i] = str(err)[:200]
        if replaced:  # texts read per occurrence (a literal ▁) or, should the two ever disagree, re-encoded
            split_ids = np.split(out_ids, rows[1:-1])
            split_off = np.split(offsets, rows[1:-1])
            for i, enc in replaced.items():
                split_ids[i], split_off[i] = enc.token_ids, enc.offsets
            out_ids, offsets = np.concatenate(split_ids), np.concatenate(split_off)
            np.cumsum([len(a) for a in split_ids], out=rows[1:])
        return EncodedBatch(
            token_ids=out_ids,
            offsets=offsets,
            rows=rows,
            text_bytes=np.fromiter(map(len, data), dtype=np.int64, count=num_docs),
            failed=failed,
        )

    def byte_lengths(self, ids: np.ndarray, data: bytes, where: str = "") -> np.ndarray:
        """How many bytes of ``data`` each token of ``ids`` (a tokenization of ``data`` without added special
        tokens) covers: their usual bytes, a dummy-prefix space on the first token dropped, or (when neither
        joins to ``data``) read per occurrence. Raises :class:`TokenizerMismatchError` (``where`` names the
        document) when no reading reproduces ``data``."""
        lengths = self.token_lengths[ids]
        joined = self._joined_bytes(ids, lengths)
        text_arr = np.frombuffer(data, dtype=np.uint8)
        if np.array_equal(joined, text_arr):
            return lengths
        if len(joined) == len(text_arr) + 1 and joined[0] == 0x20 and np.array_equal(joined[1:], text_arr):
            lengths = lengths.copy()
            lengths[0] -= 1  # dummy-prefix space: carried by the first token, not in the text
            return lengths
        read = self._read_text(ids, data)  # some ▁ stand for U+2581 in this text (see the module docstring)
        if read is not None:
            return read
        raise TokenizerMismatchError(
            f"tokenizer {self.name!r} does not reproduce the bytes of the text{where}: "
            f"{self._unknown_note(ids.tolist())}{_first_difference(joined.tobytes(), data)}"
        )

    def _unknown_note(self, ids: list[int]) -> str:
        unk = self.tokenizer.token_to_id(self.unknown_token) if self.unknown_token is not None else None
        if unk is None or unk not in ids:
            return ""
        return f"characters outside its vocabulary became {self.unknown_token!r}; "

    def _read_text(self, ids: np.ndarray, data: bytes) -> np.ndarray | None:
        """Each token's byte length in ``data``, reading the tokens one occurrence at a time (without, then with a
        dummy-prefix ``▁`` on the first token); None when no reading reproduces ``data``."""
        if not self.flex_pieces:
            return None
        for dummy in (False, True):
            lengths = self._read_occurrences(ids, data, dummy)
            if lengths is not None:
                return lengths
        return None

    def _read_occurrences(self, ids: np.ndarray, data: bytes, dummy: bool) -> np.ndarray | None:
        """Walk ``data`` token by token: a token in ``flex_pieces`` matches its piece character by character,
        ``▁`` matching a space or U+2581 (the two differ in their first byte, so at most one matches); any other
        token matches its bytes. With ``dummy``, the first token's leading ``▁`` is the dummy prefix (no bytes).
        The tokens' byte lengths, or None when they do not cover ``data`` exactly."""
        pos, out = 0, np.zeros(len(ids), dtype=np.int64)
        for k, token in enumerate(ids.tolist()):
            start = pos
            piece = self.flex_pieces.get(token)
            if dummy and k == 0:
                if piece is None or not piece.startswith(_SPIECE_SPACE):
                    return None
                piece = piece[1:]
            if piece is None:
                expected = self.token_bytes[token]
                if not data.startswith(expected, pos):
                    return None
                pos += len(expected)
            else:
                for char in piece:
                    if char == _SPIECE_SPACE and data.startswith(b" ", pos):
                        pos += 1
                    elif data.startswith(encoded := char.encode("utf-8"), pos):
                        pos += len(encoded)
                    else:
                        return None
            out[k] = pos - start
        return out if pos == len(data) else None

    def _joined_bytes(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The concatenated bytes of ``ids`` as a uint8 array (one vectorised gather, no Python loop)."""
        total = int(lengths.sum())
        if total == 0:
            return np.zeros(0, dtype=np.uint8)
        out_starts = np.cumsum(lengths, dtype=np.int64) - lengths
        index = np.arange(total, dtype=np.int64) + np.repeat(self._flat_starts[ids] - out_starts, lengths)
        return self._flat_bytes[index]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "prefix_ids": self.prefix_ids,
            "suffix_ids": self.suffix_ids,
            "special_ids": np.flatnonzero(self.is_special).tolist(),
            "text_normalization": self.text_normalization,
            "unknown_token": self.unknown_token,
            "fingerprint": self.fingerprint,
        }


def _is_char_boundary(data: bytes, offset: int) -> bool:
    return offset <= 0 or offset >= len(data) or (data[offset] & 0xC0) != 0x80


def _first_difference(got: bytes, want: bytes) -> str:
    n = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
    return (
        f"token bytes {got[max(0, n - 10) : n + 10]!r} vs text bytes {want[max(0, n - 10) : n + 10]!r} "
        f"at byte {n} (tokens cover {len(got)} bytes, text has {len(want)})"
    )


# --------------------------------------------------------------------------------------------------------
# Construction


def byte_view_from_hf(tokenizer, name: str | None = None) -> ByteView:
    """Build a :class:`ByteView` from a transformers tokenizer (fast) or a ``tokenizers.Tokenizer``."""
    backend = tokenizer if isinstance(tokenizer, Tokenizer) else getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerMismatchError(
            f"tokenizer {name or tokenizer!r} has no fast (Rust) backend; only `tokenizers`-based tokenizers "
            "are supported"
        )
    name = name or getattr(tokenizer, "name_or_path", None) or "tokenizer"
    spec = json.loads(backend.to_str())
    if (spec.get("model") or {}).get("type") == "WordPiece":
        raise TokenizerMismatchError(
            f"tokenizer {name!r} is a WordPiece tokenizer (BERT style): its pieces drop the spaces between words "
            "and mark continuations with '##', so its tokens cannot be mapped back to the document's bytes; "
            "not supported"
        )
    backend, normalization = _strip_unicode_normalizers(backend, spec, name)
    backend = _without_reachable_specials(backend)
    spec = json.loads(backend.to_str())
    backend.encode_special_tokens = True  # special-token strings inside documents are plain text

    size = backend.get_vocab_size(with_added_tokens=True)
    if not isinstance(tokenizer, Tokenizer):
        size = max(size, len(tokenizer))
    vocab = backend.get_vocab(with_added_tokens=True)
    added = {int(i): tok for i, tok in backend.get_added_tokens_decoder().items()}
    kind = _detect_kind(spec)
    strings: list[str | None] = [None] * size
    for tok, i in vocab.items():
        if i < size:
            strings[i] = tok
    model = spec.get("model") or {}
    table = unicode_to_bytes()
    token_bytes: list[bytes] = []
    flex_pieces: dict[int, str] = {}
    is_special = np.zeros(size, dtype=bool)
    for i, tok in enumerate(strings):
        if i in added and added[i].special:
            is_special[i] = True
            token_bytes.append(b"")
        elif i in added:  # matched in the raw text, or produced by the model under the same id
            content = added[i].content
            token_bytes.append(
                _token_to_bytes(content, "sentencepiece", table)
                if kind == "sentencepiece"
                else content.encode("utf-8")
            )
            if kind == "sentencepiece" and _SPIECE_SPACE in content:
                flex_pieces[i] = content
        elif tok is None:
            token_bytes.append(b"")
        else:
            token_bytes.append(_token_to_bytes(tok, kind, table))
            if kind == "sentencepiece" and _SPIECE_SPACE in tok:
                flex_pieces[i] = tok

    with_specials = backend.encode("a", add_special_tokens=True).ids
    without = backend.encode("a", add_special_tokens=False).ids
    prefix_ids, suffix_ids = _split_around(with_specials, without)
    fingerprint_source = json.dumps(
        {"tokenizer": spec, "normalization": normalization, "prefix": prefix_ids, "suffix": suffix_ids},
        sort_keys=True,
    )
    view = ByteView(
        name=str(name),
        kind=kind,
        tokenizer=backend,
        token_bytes=token_bytes,
        is_special=is_special,
        prefix_ids=prefix_ids,
        suffix_ids=suffix_ids,
        text_normalization=normalization,
        fingerprint=hashlib.sha256(fingerprint_source.encode()).hexdigest()[:32],
        eos_id=_special_id(tokenizer, "eos_token_id"),
        bos_id=_special_id(tokenizer, "bos_token_id"),
        pad_id=_special_id(tokenizer, "pad_token_id"),
        unknown_token=_unknown_token(model, kind, vocab),
        flex_pieces=flex_pieces,
    )
    _probe(view)
    return view


def load_byte_view(path_or_name: str | Path) -> ByteView:
    """Load a tokenizer by path (or the built-in name ``bytes``) and build its byte view."""
    from transformers import AutoTokenizer

    if str(path_or_name) == "bytes":
        return byte_view_from_hf(build_byte_tokenizer(), name="bytes")
    tok = AutoTokenizer.from_pretrained(str(path_or_name))
    return byte_view_from_hf(tok, name=str(path_or_name))


def _special_id(tokenizer, attr: str) -> int | None:
    value = getattr(tokenizer, attr, None)
    return int(value) if isinstance(value, int) else None


def _split_around(with_specials: list[int], without: list[int]) -> tuple[list[int], list[int]]:
    n = len(without)
    for start in range(len(with_specials) - n + 1):
        if with_specials[start : start + n] == without:
            return list(with_specials[:start]), list(with_specials[start + n :])
    raise TokenizerMismatchError(
        "could not locate the text tokens inside the tokenizer's special-token template"
    )


def _unknown_token(model: dict, kind: str, vocab: dict[str, int]) -> str | None:
    """The token a model turns characters outside its vocabulary into, when it can do that: it has an unknown
    token and no byte fallback, and (byte-level) its vocabulary lacks some of the 256 byte symbols."""
    if model.get("byte_fallback"):
        return None
    if model.get("type") == "Unigram":
        unk_id = model.get("unk_id")
        pieces = model.get("vocab") or []
        unk = pieces[unk_id][0] if isinstance(unk_id, int) and 0 <= unk_id < len(pieces) else None
    else:
        unk = model.get("unk_token")
    if unk is None:
        return None
    if kind == "byte_level" and all(c in vocab for c in unicode_to_bytes()):
        return None  # every byte has a token: nothing is unknown
    return str(unk)


def _detect_kind(spec: dict) -> str:
    def types(node) -> set[str]:
        if not node:
            return set()
        found = {node.get("type", "")}
        for key in ("pretokenizers", "normalizers", "decoders"):
            for child in node.get(key, []) or []:
                found |= types(child)
        return found

    pre, dec, norm = (
        types(spec.get("pre_tokenizer")),
        types(spec.get("decoder")),
        types(spec.get("normalizer")),
    )
    if "ByteLevel" in pre or ("ByteLevel" in dec and "Metaspace" not in pre):
        return "byte_level"
    model = spec.get("model", {})
    if "Metaspace" in pre or "Metaspace" in dec or model.get("byte_fallback") or "Prepend" in norm:
        return "sentencepiece"
    if "Replace" in norm and _SPIECE_SPACE in json.dumps(spec.get("normalizer")):
        return "sentencepiece"
    return "plain"


def _token_to_bytes(tok: str, kind: str, table: dict[str, int]) -> bytes:
    if kind == "byte_level":
        if all(c in table for c in tok):
            return bytes(table[c] for c in tok)
        return tok.encode("utf-8")
    if kind == "sentencepiece":
        m = _BYTE_FALLBACK.match(tok)
        if m:
            return bytes([int(m.group(1), 16)])
        return tok.replace(_SPIECE_SPACE, " ").encode("utf-8")
    return tok.encode("utf-8")


def _without_reachable_specials(backend: Tokenizer) -> Tokenizer:
    """A Unigram model (T5, XLM-R, ALBERT) converted from SentencePiece keeps its control symbols (``</s>``,
    ``<pad>``) as pieces with the best score, so the model itself would turn the text ``</s>`` inside a document
    into the control token. SentencePiece never produces control symbols from text: give those pieces a score
    no segmentation picks, so special-token strings stay plain text as with every other family."""
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "Unigram":
        return backend
    special_ids = {t["id"] for t in spec.get("added_tokens") or [] if t.get("special")}
    special_ids.discard(model.get("unk_id"))
    pieces = model.get("vocab") or []
    changed = False
    for i in special_ids:
        if 0 <= i < len(pieces) and pieces[i][1] > -1e6:
            pieces[i][1] = -1e9
            changed = True
    if not changed:
        return backend
    return Tokenizer.from_str(json.dumps(spec))


def _strip_unicode_normalizers(backend: Tokenizer, spec: dict, name: str) -> tuple[Tokenizer, str | None]:
    """Remove NFC/NFKC/... normalizers (recording which) and refuse normalizers that rewrite text."""
    node = spec.get("normalizer")
    if not node:
        return backend, None
    children = node.get("normalizers", []) if node.get("type") == "Sequence" else [node]
    kept, forms = [], []
    for child in children:
        kind = child.get("type")
        if kind in _UNICODE_NORMALIZERS:
            forms.append(kind)
        elif (
            kind == "Replace"
            and child.get("content") == _SPIECE_SPACE
            and child.get("pattern") == {"String": " "}
            or kind == "Prepend"
            and child.get("prepend") == _SPIECE_SPACE
        ):
            kept.append(child)  # one space -> one ▁ (or a dummy-prefix ▁): the bytes can be read back
        else:
            what = f"{kind!r} normalizer"
            if kind == "Replace":
                what += f" (pattern {child.get('pattern')}, content {child.get('content')!r})"
            raise TokenizerMismatchError(
                f"tokenizer {name!r} has a {what}, which rewrites the text; its tokens cannot "
                "be mapped back to the document's bytes, so it is not supported"
            )
    if len(forms) > 1:
        raise TokenizerMismatchError(f"tokenizer {name!r} chains several unicode normalizers {forms}")
    if not forms:
        return backend, None
    if not kept:
        spec["normalizer"] = None
    elif len(kept) == 1:
        spec["normalizer"] = kept[0]
    else:
        spec["normalizer"] = {"type": "Sequence", "normalizers": kept}
    return Tokenizer.from_str(json.dumps(spec)), forms[0]


# ASCII only: a tokenizer without byte fallback may lack rarer characters, which is a per-document problem
# (reported for the document), not a reason to refuse the tokenizer.
_PROBE_TEXTS = [
    "hello world",
    "Hello world",
    " two  spaces\tand a tab\nnewline\r\nend",
    "<|endoftext|> <s> </s>",
]


def _probe(view: ByteView) -> None:
    """Refuse, at construction, a tokenizer whose pre-tokenizer or model drops or rewrites bytes. A probe text
    with characters outside the vocabulary of a tokenizer without byte fallback is skipped: that is a
    per-document problem (T5's vocabulary has no ``{`` or tab, for one)."""
    unknown_id = view.tokenizer.token_to_id(view.unknown_token) if view.emits_unknown else None
    checked = 0
    for text in _PROBE_TEXTS:
        text = view.normalize_text(text)
        if unknown_id is not None and unknown_id in view.tokenizer.encode(text, add_special_tokens=False).ids:
            continue
        checked += 1
        try:
            view.encode(text, add_special_tokens=False)
        except TokenizerMismatchError as err:
            raise TokenizerMismatchError(
                f"tokenizer {view.name!r} cannot reproduce plain text exactly ({err}); tokenizers whose "
                "pre-tokenizer or normalizer changes the text (e.g. WordPiece, lower-casing) are not supported"
            ) from None
    if not checked:
        raise TokenizerMismatchError(
            f"tokenizer {view.name!r} cannot reproduce plain text exactly: every probe text (plain ASCII) has "
            f"characters outside its vocabulary (they become {view.unknown_token!r})"
        )
