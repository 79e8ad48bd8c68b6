"""Hypothesis strategies shared by the property tests: mixed-script text (ZWJ emoji, combining marks, RTL,
control characters, special-token strings), text the "char" test tokenizer can encode, and length limits."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tests.factories import corpus_lines

FRAGMENTS = [
    "👩‍💻",  # ZWJ sequence
    "👨‍👩‍👧‍👦",
    "🇺🇳",  # regional indicators
    "👍🏽",  # skin-tone modifier
    "e\u0301",  # combining acute
    "a\u0308\u0323",  # two combining marks
    "中文文本",
    "日本語の",
    "한국어",
    "العربية نص",  # RTL
    "עברית",
    "\u200f",  # RLM
    "\u200d",  # lone ZWJ
    "\t",
    "\t\t",
    "\r\n",
    "\n",
    "\n\n",
    "    ",
    "  ",
    " ",
    "Hello",
    " the",
    " world.",
    "Café",
    "x",
    "1234",
    "<s>",
    "</s>",
    "<|endoftext|>",
    "\x00",
    "\u00a0",
    "ﬁ",
    "\U0001f600",
    "\u2581",  # a literal SentencePiece space: read per occurrence (ByteView.reads_as)
    "a\u2581\u2581b",
]


ASCIIISH = st.text(alphabet=st.sampled_from(list("abcxyz ABC\t\n\r.,!?'0123456789")), max_size=8)


ANY_CHARS = st.text(alphabet=st.characters(codec="utf-8"), max_size=6)


GENERAL_TEXT = st.lists(st.one_of(st.sampled_from(FRAGMENTS), ASCIIISH, ANY_CHARS), max_size=12).map("".join)


# The "char" tokenizer has no byte fallback: only characters of its training text (plus printable ASCII) are
# encodable; draw mostly from those so few examples are skipped.
CHAR_VOCAB = sorted({c for line in corpus_lines(1) for c in line} | {chr(c) for c in range(32, 127)})


CHAR_FRAGMENTS = [f for f in FRAGMENTS if all(c in CHAR_VOCAB for c in f)]


_CHAR_KNOWN = st.lists(
    st.one_of(st.sampled_from(CHAR_FRAGMENTS), st.text(alphabet=st.sampled_from(CHAR_VOCAB), max_size=8)),
    max_size=12,
).map("".join)


# now and then a character outside the char vocabulary: such examples are skipped (rejected)
CHAR_TEXT = st.tuples(
    _CHAR_KNOWN, st.sampled_from([""] * 8 + ["\u2603", "\U0001f600"]), st.integers(0, 64)
).map(lambda t: t[0][: t[2]] + t[1] + t[0][t[2] :])


MAX_LENGTH = st.one_of(st.none(), st.integers(min_value=1, max_value=48))


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
