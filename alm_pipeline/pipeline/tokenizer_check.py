"""Whether a tokenizer can be used, before any GPU work (``alm-pipeline inspect --tokenizer T``).

The pipeline needs every token's exact bytes (:mod:`alm_pipeline.pipeline.byteview`). :func:`check_tokenizer`
loads a tokenizer the way ``teacher-cache`` and ``align`` do, says how it was classified (family, model,
normalisation, dummy prefix, byte fallback, special and added tokens, ids whose bytes are read per occurrence),
whether it is accepted as a teacher and as a student (and why not), and which sample texts it cannot reproduce
byte for byte: a built-in set of hard cases (whitespace runs, control characters, emoji sequences, combining
marks, CJK, right-to-left scripts, special-token strings, a literal ``▁``) plus the user's own texts.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from alm_pipeline.pipeline.byteview import ByteView, TokenizerMismatchError, load_byte_view

SAMPLE_TEXTS: list[tuple[str, str]] = [
    ("plain", "An ordinary sentence with words."),
    ("spaces", "two  spaces,   three, and    four"),
    ("tabs and CRLF", "\tindented\tline\r\nwindows\r\nline endings\n\n"),
    ("leading space", " starts with a space"),
    ("control characters", "NUL \x00 bell \x07 escape \x1b"),
    ("emoji sequences", "family 👨‍👩‍👧 coder 👩‍💻 flag 🇺🇳 thumbs 👍🏽"),
    ("combining marks", "e\u0301 a\u0308 o\u0302 and precomposed é"),
    ("CJK", "中文文本测试。日本語のテキスト。한국어"),
    ("right-to-left", "العربية نص עברית"),
    ("special-token strings", "text with <|endoftext|> <s> </s> <unk> <pad> <bos> inside"),
    ("literal ▁", "a\u2581b \u2581\u2581c"),
    ("no-break space and ligature", "non\u00a0breaking \ufb01ne"),
    ("markup and code", "<table><tr><td>1</td></tr></table>\ndef f(x):\n    return x * 2\n"),
    ("digits", "3.14159 and 1,000,000 and 2026-12-01"),
]


@dataclass
class SampleResult:
    name: str
    ok: bool
    tokens: int = 0
    error: str | None = None


@dataclass
class TokenizerReport:
    """What :func:`check_tokenizer` found. ``refused`` is why the tokenizer cannot be used at all (None when it
    loads); ``as_teacher`` / ``as_student`` say how each role takes it."""

    name: str
    refused: str | None = None
    family: str = ""
    details: dict = field(default_factory=dict)
    as_teacher: str = ""
    as_student: str = ""
    samples: list[SampleResult] = field(default_factory=list)

    @property
    def failed_samples(self) -> list[SampleResult]:
        return [s for s in self.samples if not s.ok]

    @property
    def exit_code(self) -> int:
        """2: refused; 1: usable with limits (not as a teacher, or a sample text it cannot reproduce); 0: fine."""
        if self.refused:
            return 2
        return 1 if self.failed_samples or not self.as_teacher.startswith("yes") else 0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["exit_code"] = self.exit_code
        return out

    def lines(self) -> list[str]:
        if self.refused:
            return [f"tokenizer  {self.name}", "supported  no", f"reason     {self.refused}"]
        out = [f"tokenizer  {self.name}", f"family     {self.family}"]
        out += [f"  {key}: {_show(value)}" for key, value in self.details.items()]
        out += [f"teacher    {self.as_teacher}", f"student    {self.as_student}"]
        good = sum(s.ok for s in self.samples)
        out.append(f"samples    {good}/{len(self.samples)} reproduced byte for byte")
        out += [f"  cannot reproduce {s.name!r}: {s.error}" for s in self.failed_samples]
        return out


def check_tokenizer(name_or_path: str, texts: list[str] | None = None) -> TokenizerReport:
    """Load ``name_or_path`` (a tokenizer or model folder, an installed asset name, or ``bytes``) as the stages
    do, classify it and try it on :data:`SAMPLE_TEXTS` plus ``texts``."""
    from alm_pipeline.assets import resolve_model

    report = TokenizerReport(name=str(name_or_path))
    text = os.path.expanduser(str(name_or_path))
    if text.startswith(("/", ".", "~")) and not os.path.exists(text):
        report.refused = f"{name_or_path}: no such file or folder"
        return report
    try:
        view = load_byte_view(name_or_path if str(name_or_path) == "bytes" else resolve_model(name_or_path))
    except TokenizerMismatchError as err:
        report.refused = str(err)
        return report
    except (OSError, ValueError) as err:
        report.refused = f"cannot load a tokenizer from {name_or_path!r} ({str(err).strip().splitlines()[0]})"
        return report
    spec = json.loads(view.tokenizer.to_str())
    report.family = _family(view, spec)
    report.details = _details(view, spec)
    if view.emits_unknown:
        report.as_teacher = (
            f"no: characters outside its vocabulary become {view.unknown_token!r} (no byte fallback); "
            "teacher-cache refuses it"
        )
        report.as_student = (
            "yes, with losses: documents with characters outside its vocabulary are dropped by align "
            "(counted in the coverage report)"
        )
    else:
        report.as_teacher = report.as_student = "yes"
    samples = list(SAMPLE_TEXTS) + [(f"--text {i + 1}", t) for i, t in enumerate(texts or [])]
    for name, text in samples:
        try:
            enc = view.encode(view.normalize_text(text), add_special_tokens=False)
            report.samples.append(SampleResult(name, True, tokens=len(enc.token_ids)))
        except TokenizerMismatchError as err:
            report.samples.append(SampleResult(name, False, error=str(err)[:300]))
    return report


def _family(view: ByteView, spec: dict) -> str:
    model = (spec.get("model") or {}).get("type", "?")
    if view.name == "bytes":
        return "bytes (the built-in tokenizer: one token per UTF-8 byte)"
    pre = json.dumps(spec.get("pre_tokenizer"))
    norm = json.dumps(spec.get("normalizer"))
    if view.kind == "byte_level":
        split = " with a regex pre-split (Llama-3 / Qwen / DeepSeek style)" if '"Regex"' in pre else ""
        return f"byte-level {model}{split} (GPT-2 byte alphabet)"
    if view.kind == "sentencepiece":
        if "Metaspace" in pre:
            style = "SentencePiece via a Metaspace pre-tokenizer (Llama-2 / Mistral non-legacy style)"
        elif '"Prepend"' in norm:
            style = "SentencePiece, legacy (a Prepend + Replace normalizer adds the dummy prefix)"
        else:
            style = "SentencePiece, spaces normalised to ▁ without a dummy prefix (Gemma style)"
        return f"{style}, {model} model"
    return f"plain {model} (vocabulary strings are the text itself)"


def _details(view: ByteView, spec: dict) -> dict:
    model = spec.get("model") or {}
    added = spec.get("added_tokens") or []
    plain_added = [t for t in added if not t.get("special")]
    vocab = view.tokenizer.get_vocab(with_added_tokens=False)
    shared = [t["content"] for t in plain_added if vocab.get(t["content"]) == t["id"]]
    return {
        "vocabulary": view.vocab_size,
        "model": model.get("type"),
        "byte fallback": bool(model.get("byte_fallback")),
        "unknown token": view.unknown_token,
        "unicode normalization": view.text_normalization,
        "dummy-prefix space": _has_dummy_prefix(view),
        "prefix tokens": [view.tokenizer.id_to_token(i) for i in view.prefix_ids],
        "suffix tokens": [view.tokenizer.id_to_token(i) for i in view.suffix_ids],
        "special tokens": int(view.is_special.sum()),
        "non-special added tokens": len(plain_added),
        "added tokens sharing an id with a model piece": len(shared),
        "ids whose bytes are read per occurrence (▁ as space or U+2581)": len(view.flex_pieces),
    }


def _has_dummy_prefix(view: ByteView) -> bool:
    ids = view.tokenizer.encode("a", add_special_tokens=False).ids
    return sum(len(view.token_bytes[i]) for i in ids) == 2


def _show(value) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value)) if value else "none"
    return "none" if value is None else str(value)
