"""A tokenizer zoo: tiny trained tokenizers whose ``tokenizer.json`` structure mirrors each major family.

Each builder trains a small vocabulary with the `tokenizers` library on the tests' mixed-script text and wires
the normalizer, pre-tokenizer, decoder, model options, added tokens and post-processor the way the family's
published ``tokenizer.json`` does (structure, not size). :data:`ZOO` maps a family name to what the pipeline
must do with it: accept it in both roles, accept it as a student only (an unknown token and no byte fallback:
documents with characters outside its vocabulary are dropped), or refuse it up front with a message naming the
reason. The real tokenizers that ship offline (``scripts/setup.sh``) are added by :func:`real_tokenizers`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from alm_pipeline.assets import asset_path, is_installed
from tests.factories import corpus_lines, save_hf_tokenizer, train_byte_level_bpe

SPACE = "\u2581"  # ▁

# the published split regexes (Llama-3 and Qwen2 differ in how many digits a pretoken holds)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
DEEPSEEK_V3_SPLITS = [
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+"
    r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
]


@dataclass(frozen=True)
class Family:
    """A zoo entry: how to build it and what the pipeline must do with it."""

    name: str
    build: Callable[[Path], Path]  # writes a transformers tokenizer folder, returns it
    kind: str | None  # the ByteView kind it must be classified as (None when refused)
    roles: str  # "both" | "student" (emits an unknown token) | "refused"
    refusal: str = ""  # a regex the refusal message must match


# ----------------------------------------------------------------------------------------------------------
# builders


# SentencePiece learns pieces that hold ▁ only at their start; training the tiny BPE models on pretokens cut
# before each ▁ gives them that shape (the published tokenizer.json then has no such pre-tokenizer)
_WORD_START = pre_tokenizers.Split(SPACE, behavior="merged_with_next")


def _train_bpe(tok: Tokenizer, vocab_size: int, specials: list[str], **options) -> Tokenizer:
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False, **options
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    return tok


def _with_byte_fallback(tok: Tokenizer) -> dict:
    """The tokenizer's spec with ``<0x00>``..``<0xFF>`` pieces and byte fallback on (SentencePiece style)."""
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    return spec


def _sentencepiece_decoder(strip_dummy: bool) -> dict:
    steps = [
        {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if strip_dummy:
        steps.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {"type": "Sequence", "decoders": steps}


def _bos(tok: Tokenizer, bos: str) -> Tokenizer:
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return tok


def build_gpt2(path: Path) -> Path:
    return save_hf_tokenizer(
        train_byte_level_bpe(), path, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def _regex_byte_level(splits: list[str], specials: list[str], vocab_size: int = 420) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False) for pattern in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return _train_bpe(tok, vocab_size, specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())


def build_llama3(path: Path) -> Path:
    tok = _regex_byte_level([LLAMA3_SPLIT], ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))],
            ),
        ]
    )
    return save_hf_tokenizer(tok, path, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")


def build_qwen2(path: Path) -> Path:
    tok = _regex_byte_level([QWEN2_SPLIT], ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.normalizer = normalizers.NFC()  # Qwen2/3 normalise to NFC
    return save_hf_tokenizer(tok, path, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def build_deepseek_v3(path: Path) -> Path:
    bos, eos = "<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>"
    tok = _regex_byte_level(DEEPSEEK_V3_SPLITS, [bos, eos])
    return save_hf_tokenizer(_bos(tok, bos), path, bos_token=bos, eos_token=eos)


def _llama2_legacy_tokenizer(specials: list[str]) -> Tokenizer:
    """Llama-2 as converted with ``legacy=True``: a Prepend(▁) + Replace(' ', ▁) normalizer, no pre-tokenizer."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tok.pre_tokenizer = _WORD_START  # training only
    tok = _train_bpe(tok, 300, specials, max_token_length=16)
    spec = _with_byte_fallback(tok)
    spec["pre_tokenizer"] = None
    spec["decoder"] = _sentencepiece_decoder(strip_dummy=True)
    return _bos(Tokenizer.from_str(json.dumps(spec)), "<s>")


def build_llama2_legacy(path: Path) -> Path:
    tok = _llama2_legacy_tokenizer(["<unk>", "<s>", "</s>"])
    return save_hf_tokenizer(tok, path, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_mistral_metaspace(path: Path) -> Path:
    """Mistral / Llama-2 converted with ``legacy=False``: no normalizer, a Metaspace pre-tokenizer that adds the
    dummy prefix only at the start (``prepend_scheme="first"``) and does not split."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=True)
    tok = _train_bpe(tok, 300, ["<unk>", "<s>", "</s>"], max_token_length=16)
    spec = _with_byte_fallback(tok)
    spec["pre_tokenizer"] = {
        "type": "Metaspace",
        "replacement": SPACE,
        "prepend_scheme": "first",
        "split": False,
    }
    spec["decoder"] = {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": "first", "split": False}
    tok = _bos(Tokenizer.from_str(json.dumps(spec)), "<s>")
    return save_hf_tokenizer(tok, path, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


# Gemma's added tokens that are NOT special: whitespace runs and markup, matched in the raw text
GEMMA_PLAIN_ADDED = [SPACE * 2, SPACE * 3, SPACE * 4, "\n\n", "<table>", "</td>", "<h1>"]


def build_gemma(path: Path) -> Path:
    """Gemma: a Replace(' ', ▁) normalizer and no dummy prefix, a Split(' ', merged_with_previous) pre-tokenizer
    (a no-op after the normalizer), BPE with byte fallback, a Replace + ByteFallback + Fuse decoder, and
    non-special added tokens (``normalized: false``) that share ids with model pieces."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.pre_tokenizer = _WORD_START  # training only
    tok = _train_bpe(tok, 320, ["<pad>", "<eos>", "<bos>", "<unk>"], max_token_length=16)
    spec = _with_byte_fallback(tok)
    spec["pre_tokenizer"] = {
        "type": "Split",
        "pattern": {"String": " "},
        "behavior": "MergedWithPrevious",
        "invert": False,
    }
    vocab = spec["model"]["vocab"]
    for content in GEMMA_PLAIN_ADDED:
        vocab.setdefault(content, len(vocab))  # a model piece too: the added token takes the piece's id
    # as in Gemma, the model itself merges runs of normalised spaces into those pieces (first, by priority)
    runs = [[SPACE, SPACE], [SPACE * 2, SPACE], [SPACE * 2, SPACE * 2]]
    merges = spec["model"]["merges"]
    as_pairs = [m if isinstance(m, list) else m.split(" ") for m in merges]
    spec["model"]["merges"] = runs + [m for m in as_pairs if m not in runs]
    spec["decoder"] = _sentencepiece_decoder(strip_dummy=False)
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_tokens([AddedToken(c, normalized=False, special=False) for c in GEMMA_PLAIN_ADDED])
    tok = _bos(tok, "<bos>")
    return save_hf_tokenizer(
        tok, path, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    )


def build_phi3(path: Path) -> Path:
    """Phi-3: Llama-2 legacy structure plus chat tokens that strip the whitespace after them (``rstrip``)."""
    tok = _llama2_legacy_tokenizer(["<unk>", "<s>", "</s>"])
    chat = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"]
    tok.add_special_tokens([AddedToken(c, rstrip=True, normalized=False, special=True) for c in chat])
    return save_hf_tokenizer(
        tok, path, bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>", pad_token="<|endoftext|>"
    )


def _unigram(specials: list[str]) -> Tokenizer:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    trainer = trainers.UnigramTrainer(
        vocab_size=300,
        special_tokens=specials,
        unk_token="<unk>",
        initial_alphabet=[
            chr(c) for c in range(33, 127)
        ],  # printable ASCII; tabs, emoji and CJK stay unknown
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return tok


def build_t5_unigram(path: Path) -> Path:
    """T5-like: Unigram without byte fallback, Metaspace with a prefix space everywhere, EOS appended;
    characters outside the vocabulary become ``<unk>``."""
    tok = _unigram(["<pad>", "</s>", "<unk>"])
    return save_hf_tokenizer(tok, path, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def build_t5_real_structure(path: Path) -> Path:
    """T5 as published: whitespace runs collapsed by a Replace(Regex(' {2,}'), ▁) normalizer, words split on
    whitespace (which drops it): refused."""
    tok = _unigram(["<pad>", "</s>", "<unk>"])
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(" {2,}"), SPACE)])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always"),
        ]
    )
    return save_hf_tokenizer(tok, path, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def build_whitespace_split(path: Path) -> Path:
    """A Unigram tokenizer whose pre-tokenizer drops whitespace (WhitespaceSplit): refused by the probe."""
    tok = _unigram(["<pad>", "</s>", "<unk>"])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always"),
        ]
    )
    return save_hf_tokenizer(tok, path, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def build_wordpiece(path: Path) -> Path:
    """BERT: a lower-casing normalizer, whitespace+punctuation pre-split and ``##`` continuations: refused."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"], show_progress=False
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    return save_hf_tokenizer(tok, path, unk_token="[UNK]", pad_token="[PAD]")


def build_bytes(path: Path) -> Path:
    from alm_pipeline.pipeline.byte_tokenizer import build_byte_tokenizer

    build_byte_tokenizer().save_pretrained(str(path))
    return path


ZOO: list[Family] = [
    Family("gpt2", build_gpt2, "byte_level", "both"),
    Family("llama3", build_llama3, "byte_level", "both"),
    Family("qwen2", build_qwen2, "byte_level", "both"),
    Family("deepseek_v3", build_deepseek_v3, "byte_level", "both"),
    Family("llama2_legacy", build_llama2_legacy, "sentencepiece", "both"),
    Family("mistral_metaspace", build_mistral_metaspace, "sentencepiece", "both"),
    Family("gemma", build_gemma, "sentencepiece", "both"),
    Family("phi3", build_phi3, "sentencepiece", "both"),
    Family("bytes", build_bytes, "byte_level", "both"),
    Family("t5_unigram", build_t5_unigram, "sentencepiece", "student"),
    Family("t5_real_structure", build_t5_real_structure, None, "refused", r"'Replace' normalizer .*\{2,\}"),
    Family(
        "whitespace_split", build_whitespace_split, None, "refused", r"cannot reproduce plain text exactly"
    ),
    Family("wordpiece", build_wordpiece, None, "refused", r"WordPiece"),
]

# the real tokenizers scripts/setup.sh installs offline (asset name -> ByteView kind)
REAL_TOKENIZERS = {
    "gpt2-tokenizer": "byte_level",
    "smollm2-135m": "byte_level",
    "qwen3-tokenizer": "byte_level",
    "mistral-tokenizer": "sentencepiece",
}


def real_tokenizers() -> dict[str, Path]:
    """The real tokenizers installed here (none where setup.sh ran with --skip-assets)."""
    return {name: asset_path(name) for name in REAL_TOKENIZERS if is_installed(name)}


def build_zoo(root: Path) -> dict[str, Path]:
    """Every zoo family's tokenizer folder under ``root`` (built in well under a second each)."""
    return {family.name: family.build(root / family.name) for family in ZOO}


def family(name: str) -> Family:
    return next(f for f in ZOO if f.name == name)
