"""Byte views: every token's exact bytes, offsets that reproduce the text, refusal of lossy tokenizers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from alm_pipeline.pipeline.byteview import TokenizerMismatchError, byte_view_from_hf, load_byte_view
from tests import factories

TRICKY_TEXTS = [
    "Hello world",
    " leading space and trailing space ",
    "CRLF line\r\nnext\ttab\t\tdouble",
    "NUL \x00 and control \x07\x1b chars",
    "emoji with ZWJ 👩‍💻 flag 🇺🇳 skin 👍🏽",
    "combining e\u0301 a\u0308 and precomposed é",
    "中文文本 and 日本語 and 한국어",
    "RTL العربية עברית mixed",
    "special strings <|endoftext|> <s> </s> <unk> <pad>",
    "    many    spaces     ",
    "\n\n\nnewlines only at start",
    "literal \u2581 pieces a\u2581b \u2581\u2581c  d",
    "\u2581 starts with a literal \u2581",
]


def _views(tokenizer_dirs):
    views = {kind: load_byte_view(path) for kind, path in tokenizer_dirs.items() if kind != "char"}
    views["bytes"] = load_byte_view("bytes")
    return views


def _covered(view, enc) -> bytes:
    """Bytes of the text as cut by the offsets, in order; checks they are contiguous and monotone."""
    data = enc.text.encode("utf-8")
    starts = np.concatenate([[0], enc.offsets[:-1]])
    assert np.all(np.diff(enc.offsets) >= 0)
    assert np.all(starts <= enc.offsets)
    return b"".join(data[s:e] for s, e in zip(starts, enc.offsets, strict=True))


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_offsets_cover_text_exactly(tokenizer_dirs, text):
    for kind, view in _views(tokenizer_dirs).items():
        enc = view.encode(text)
        data = text.encode("utf-8")
        assert enc.text == text
        assert _covered(view, enc) == data, kind
        assert enc.offsets[-1] == len(data), kind
        # each byte-covering token's span equals its own bytes (except a dummy-prefix space)
        starts = np.concatenate([[0], enc.offsets[:-1]])
        for tok, s, e in zip(enc.token_ids, starts, enc.offsets, strict=True):
            tb = view.token_bytes[tok]
            assert data[s:e] == tb or view.reads_as(int(tok), data[s:e]), (kind, tok)


def test_special_token_strings_are_plain_text(tokenizer_dirs):
    for kind, view in _views(tokenizer_dirs).items():
        enc = view.encode("a <|endoftext|> b <s> c </s> d <bos> <eos> <pad>")
        body = enc.token_ids[len(view.prefix_ids) :]
        assert not view.is_special[body].any(), kind


def test_prefix_tokens_follow_tokenizer(tokenizer_dirs):
    views = _views(tokenizer_dirs)
    assert views["byte_level"].prefix_ids == []  # GPT-2 style: no BOS
    sp = views["sentencepiece"]
    assert len(sp.prefix_ids) == 1 and sp.is_special[sp.prefix_ids[0]]
    enc = sp.encode("Hi")
    assert enc.offsets[0] == 0  # BOS covers no bytes
    assert views["bytes"].encode("Hi").token_ids.tolist() == [257, ord("H"), ord("i")]


def test_sentencepiece_dummy_prefix_and_byte_fallback(tokenizer_dirs):
    sp = load_byte_view(tokenizer_dirs["sentencepiece"])
    assert sp.kind == "sentencepiece"
    enc = sp.encode("Ωmega 🦜")  # characters outside the tiny vocab: byte fallback pieces
    assert _covered(sp, enc) == "Ωmega 🦜".encode()
    # the first text token carries the dummy-prefix space, which covers no byte of the text
    first = enc.token_ids[len(sp.prefix_ids)]
    assert sp.token_bytes[first].startswith(b" ")


def test_boundary_mask(tokenizer_dirs):
    view = load_byte_view(tokenizer_dirs["byte_level"])
    for i in range(view.vocab_size):
        b = view.token_bytes[i]
        expected = view.is_special[i] or (len(b) > 0 and b[:1] in (b" ", b"\n", b"\t"))
        assert view.boundary_mask[i] == expected
    assert view.boundary_mask.sum() > 10


@pytest.mark.parametrize("max_length", [1, 2, 3, 5, 17])
def test_truncation_cuts_text_at_kept_tokens(tokenizer_dirs, max_length):
    text = "Emoji 👩‍💻 and café 中文 " * 4
    for kind, view in _views(tokenizer_dirs).items():
        enc = view.encode(text, max_length=max_length)
        assert len(enc.token_ids) <= max_length
        assert enc.truncated
        assert text.startswith(enc.text)
        assert enc.text.encode() == _covered(view, enc)
        assert (enc.offsets[-1] if len(enc.offsets) else 0) == len(enc.text.encode()), kind


def test_huge_document_is_bounded(tokenizer_dirs):
    view = load_byte_view(tokenizer_dirs["byte_level"])
    text = "word " * 200_000 + "tail"  # 1M characters
    enc = view.encode(text, max_length=64)
    assert len(enc.token_ids) == 64 and enc.truncated
    assert text.startswith(enc.text)


def test_pickle_keeps_plain_text_special_strings(tokenizer_dirs):
    view = pickle.loads(pickle.dumps(load_byte_view(tokenizer_dirs["sentencepiece"])))
    enc = view.encode("x <s> y")
    assert not view.is_special[enc.token_ids[1:]].any()


def test_lowercasing_tokenizer_is_refused():
    tok = factories.train_byte_level_bpe()
    tok.normalizer = normalizers.Lowercase()
    with pytest.raises(TokenizerMismatchError, match="Lowercase"):
        byte_view_from_hf(tok, name="lowercasing")


def test_whitespace_dropping_tokenizer_is_refused():
    tok = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(TokenizerMismatchError, match="cannot reproduce"):
        byte_view_from_hf(tok, name="wordlevel")


def test_a_tokenizer_without_byte_fallback_that_knows_no_probe_text_is_refused():
    """Probe texts with unknown characters are skipped for such tokenizers (a per-document problem), but one
    whose vocabulary lacks characters of every probe text cannot be checked and is refused."""
    tok = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "q": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    with pytest.raises(TokenizerMismatchError, match="every probe text .* outside its vocabulary"):
        byte_view_from_hf(tok, name="tiny")


def test_nfc_normalizer_is_recorded_and_applied_to_text():
    tok = factories.train_byte_level_bpe()
    tok.normalizer = normalizers.NFC()
    view = byte_view_from_hf(tok, name="nfc")
    assert view.text_normalization == "NFC"
    decomposed = "e\u0301"
    assert view.normalize_text(decomposed) == "é"
    enc = view.encode(decomposed)  # the backend no longer normalizes: bytes are reproduced exactly
    assert _covered(view, enc) == decomposed.encode()


def test_unknown_character_is_a_clear_error(tokenizer_dirs):
    view = load_byte_view(tokenizer_dirs["char"])
    with pytest.raises(TokenizerMismatchError, match="doc-7"):
        view.encode("Ω is not in this vocabulary", doc_ref="doc-7")


@pytest.mark.parametrize("max_length", [None, 1, 7, 40])
def test_encode_batch_equals_encode_text_by_text(tokenizer_dirs, max_length):
    texts = [*TRICKY_TEXTS, "", "x" * 3000, "é" * 700, "👍🏽" * 300]
    for kind, view in _views(tokenizer_dirs).items():
        batch = view.encode_batch(texts, max_length, doc_refs=[f"doc{i}" for i in range(len(texts))])
        assert batch.failed == {}, kind
        assert (
            len(batch.rows) == len(texts) + 1
            and batch.rows[0] == 0
            and batch.rows[-1] == len(batch.token_ids)
        )
        assert batch.token_ids.dtype == np.int32 and batch.offsets.dtype == np.int32, kind
        for i, text in enumerate(texts):
            enc = view.encode(text, max_length=max_length)
            row = slice(int(batch.rows[i]), int(batch.rows[i + 1]))
            np.testing.assert_array_equal(batch.token_ids[row], enc.token_ids, err_msg=f"{kind} text {i}")
            np.testing.assert_array_equal(batch.offsets[row], enc.offsets, err_msg=f"{kind} text {i}")
            assert batch.text_bytes[i] == len(text.encode("utf-8"))


def test_encode_batch_reports_the_texts_it_cannot_reproduce(tokenizer_dirs):
    view = load_byte_view(tokenizer_dirs["char"])
    texts = ["abc", "unknown ☃ character", "abc abc"]
    with pytest.raises(TokenizerMismatchError) as single:
        view.encode(texts[1], doc_ref="snowman")
    batch = view.encode_batch(texts, doc_refs=["first", "snowman", "third"])
    assert list(batch.failed) == [1]
    assert batch.failed[1] == str(single.value)[:200]
    for i in (0, 2):
        row = slice(int(batch.rows[i]), int(batch.rows[i + 1]))
        np.testing.assert_array_equal(batch.token_ids[row], view.encode(texts[i]).token_ids)


def test_a_literal_spiece_space_in_the_text_is_read_per_occurrence(tokenizer_dirs):
    """In a SentencePiece-style tokenizer ``▁`` stands for a space, yet U+2581 may be in the text itself: the
    same id then covers a space in one place and the three bytes of U+2581 in another. Before: such texts were
    refused as not reproducible."""
    view = load_byte_view(tokenizer_dirs["sentencepiece"])
    text = "a \u2581b"
    data = text.encode()
    enc = view.encode(text)
    starts = np.concatenate([[0], enc.offsets[:-1]])
    spans = [(int(t), data[s:e]) for t, s, e in zip(enc.token_ids, starts, enc.offsets, strict=True)]
    literal = [t for t, span in spans if "\u2581".encode() in span]
    assert literal, spans  # some token covers the literal character
    assert all(b"\xe2\x96\x81" not in view.token_bytes[t] for t in literal)  # its usual reading is a space
    space_id = view.tokenizer.token_to_id("\u2581")
    assert view.reads_as(space_id, b" ") and view.reads_as(space_id, "\u2581".encode())
    assert not view.reads_as(space_id, b"x") and not view.reads_as(space_id, b"  ")


def test_a_normalizer_that_collapses_spaces_is_refused_naming_it():
    """T5's normalizer replaces runs of spaces by one ``▁``: the number of spaces is lost. Refused up front, the
    message naming the pattern. Before: it was taken for the harmless one-space replacement."""
    from tokenizers import Regex

    tok = factories.train_sentencepiece_bpe()
    tok.normalizer = normalizers.Sequence(
        [normalizers.Replace(Regex(" {2,}"), "\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    with pytest.raises(
        TokenizerMismatchError, match=r"'Replace' normalizer \(pattern \{'Regex': ' \{2,\}'\}"
    ):
        byte_view_from_hf(tok, name="t5-like")


def test_which_tokenizers_emit_an_unknown_token(tokenizer_dirs):
    """Only a tokenizer without byte fallback whose model has an unknown token emits it for text."""
    emits = {kind: load_byte_view(path).unknown_token for kind, path in tokenizer_dirs.items()}
    assert emits["char"] == "<unk>"
    assert emits["sentencepiece"] is None  # has <unk>, but byte fallback covers every character
    assert emits["byte_level"] is None and load_byte_view("bytes").unknown_token is None
