"""Evaluation: tokenizer-independent bits per byte, the teacher's bits per byte from a cache, and chunk-level
agreement between a student and a teacher cache (through an aligned set).

Bits per byte (the convention used everywhere in alm-pipeline, for models and for caches alike)::

    bits per byte = Σ_{predicted tokens u} −log2 p(t_u | t_<u)  /  Σ_{predicted tokens u} UTF-8 bytes of t_u

pooled over the whole corpus (not averaged per document). Each document is encoded with the model's own
tokenizer and its own special tokens (:meth:`ByteView.encode`: BOS if the tokenizer adds one, EOS if it appends
one). Every token after the first is predicted. A document's first token is therefore predicted only when a
BOS precedes it: with a BOS every byte of the text counts; without one (GPT-2 style) the first token and the
bytes it covers are left out of both sums. Special tokens cover no bytes, but their log-probabilities count
(an appended EOS is predicted like any token). Byte counts are exact (byte views, never decoded strings), on
the text as the tokenizer sees it (after its unicode normalization, if it has one). Documents longer than
``max_length`` tokens (special tokens included) are truncated to their first ``max_length`` tokens and only the
bytes those tokens cover are counted. Log-probabilities are log-softmaxes in fp32 over the tokenizer's ids
(padded LM-head rows excluded), computed from the final hidden states and the LM head in slices of positions
so that no ``[batch, length, vocabulary]`` tensor is materialised.

A teacher cache stores exactly these per-token log-probabilities (NaN at position 0) and byte end offsets, so
:func:`cache_bits_per_byte` reads the teacher's number straight from it: ``Σ_{u≥1} logprob`` over
``offsets[-1] − offsets[0]`` per document. It equals :func:`model_bits_per_byte` of the teacher on the cached
texts (up to fp32 rounding).

Chunk agreement (:func:`chunk_agreement`): for every aligned chunk (group) of an aligned set, the student's
chunk log-likelihood ``C_S = Σ_{v ∈ chunk, v≥1} log p_S`` (:func:`student_token_stats` +
:func:`student_chunk_stats`) against the teacher's ``C_T``; reported as the mean ``|C_S − C_T|`` (nats per
chunk) and, debiased (reference §5), the mean ``|(C_S + σ_S) − (C_T + σ_T)|``. A student that is the teacher,
with the teacher's tokenizer, scores 0.

``--model`` (:func:`resolve_model_dir`) may be a model folder, a short asset name, or a training run directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from alm_pipeline.pipeline.byteview import ByteView, TokenizerMismatchError, byte_view_from_hf
from alm_pipeline.trainer.loss import ALMGroups, StudentTokenStats, student_chunk_stats, student_token_stats

__all__ = [
    "BITS_PER_BYTE_CONVENTION",
    "HELDOUT",
    "BitsPerByte",
    "ChunkAgreement",
    "EvalConfig",
    "EvalError",
    "EvalModel",
    "cache_bits_per_byte",
    "chunk_agreement",
    "iter_cache_texts",
    "iter_data_texts",
    "load_eval_model",
    "model_bits_per_byte",
    "resolve_model_dir",
    "run_evaluation",
    "write_json",
]

BITS_PER_BYTE_CONVENTION = (
    "bits per byte = sum over every predicted token of -log2 p(token | previous tokens) / sum of the UTF-8 "
    "bytes those tokens cover, pooled over the corpus; the tokenizer's own special tokens; a document's first "
    "token is predicted only when a BOS precedes it (without a BOS the first token and its bytes are left out "
    "of both sums); documents truncated to max_length tokens count only the bytes of the kept tokens"
)
HELDOUT = "heldout"  # --data short name: the bundled held-out documents
EVAL_FILE = "eval.json"
_LN2 = math.log(2.0)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


class EvalError(ValueError):
    """Evaluation cannot proceed; the message names the model, file or document."""


# ----------------------------------------------------------------------------------------------------------
# configuration and results
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalConfig:
    """What :func:`run_evaluation` computes; every part is optional but at least one must be asked for.

    * ``model`` + ``data``: the model's bits per byte on a corpus (``data`` = a .jsonl/.json/.parquet file or
      folder, or ``"heldout"`` for the bundled held-out documents). With ``model`` alone (no ``data``,
      ``cache`` or ``aligned``) the bundled held-out documents are used.
    * ``cache``: the teacher's bits per byte read from the cache (no model needed); with ``model`` and
      ``cache_texts`` also the model's bits per byte on the cached texts (the exact bytes the teacher saw), and
      the gap to the teacher.
    * ``model`` + ``aligned``: chunk agreement between the model (the student) and the teacher of the aligned
      set.
    * ``run_dir``: also write the result to ``run_dir/eval.json``.
    """

    model: str | None = None
    data: str | None = None
    text_field: str = "text"
    id_field: str | None = None
    max_docs: int | None = None  # first N usable documents of each source (data, cache, aligned set)
    cache: str | None = None
    cache_texts: bool = False
    aligned: str | None = None
    max_length: int = 1024  # model tokens per document, special tokens included
    batch_tokens: int = 8192  # padded tokens per forward pass
    max_logit_elements: int = 1 << 25  # fp32 logits alive at once (positions per LM-head slice = this / V)
    dtype: str = "float32"  # model weights; log-softmax is always fp32
    device: str = "auto"
    run_dir: str | None = None

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise EvalError(f"max_length must be >= 2, got {self.max_length}")
        if self.batch_tokens < 1:
            raise EvalError(f"batch_tokens must be >= 1, got {self.batch_tokens}")
        if self.max_logit_elements < 1:
            raise EvalError(f"max_logit_elements must be >= 1, got {self.max_logit_elements}")
        if self.max_docs is not None and self.max_docs < 1:
            raise EvalError(f"max_docs must be >= 1, got {self.max_docs}")
        if self.dtype not in _DTYPES:
            raise EvalError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.cache_texts and not self.cache:
            raise EvalError("cache_texts (--cache-texts) needs a teacher cache (--cache)")
        if (self.cache_texts or self.aligned or self.data) and not self.model:
            what = "data" if self.data else ("aligned" if self.aligned else "cache_texts")
            raise EvalError(f"{what} needs a model to evaluate (--model)")
        if not (self.model or self.cache):
            raise EvalError("nothing to evaluate: give a model (--model) and/or a teacher cache (--cache)")


@dataclass(frozen=True)
class BitsPerByte:
    """Bits per byte over a corpus, with the sums it is made of."""

    bits_per_byte: float
    bits: float  # Σ −log2 p over the predicted tokens
    bytes: int  # Σ UTF-8 bytes covered by the predicted tokens
    predicted_tokens: int
    docs: int
    truncated_docs: int
    tokens_per_byte: float  # predicted tokens / bytes (the tokenizer's compression)
    nats_per_token: float  # mean −ln p per predicted token

    @classmethod
    def from_sums(
        cls, nats: float, nbytes: int, tokens: int, docs: int, truncated: int, what: str
    ) -> BitsPerByte:
        if nbytes <= 0:
            raise EvalError(
                f"{what}: no predicted byte in {docs} document(s) (every document is a single token without a "
                "BOS before it, or the source is empty); bits per byte is undefined"
            )
        bits = nats / _LN2
        return cls(
            bits_per_byte=bits / nbytes,
            bits=bits,
            bytes=int(nbytes),
            predicted_tokens=int(tokens),
            docs=int(docs),
            truncated_docs=int(truncated),
            tokens_per_byte=tokens / nbytes,
            nats_per_token=nats / max(tokens, 1),
        )

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ChunkAgreement:
    """Agreement of student and teacher chunk log-likelihoods over the groups of an aligned set (nats)."""

    mean_abs_logprob_diff: float  # mean |C_S − C_T|
    mean_abs_debiased_logprob_diff: float  # mean |(C_S + σ_S) − (C_T + σ_T)|
    mean_logprob_diff: float  # mean (C_S − C_T): < 0 when the student finds the chunks less likely
    teacher_mean_chunk_logprob: float
    student_mean_chunk_logprob: float
    groups: int
    docs: int

    def to_json(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------
# resolving and loading the model
# ----------------------------------------------------------------------------------------------------------


def resolve_model_dir(spec: str | os.PathLike[str]) -> tuple[str, str]:
    """``--model`` → ``(model folder, how it was chosen)``.

    1. a short asset name (``smollm2-135m``) → its installed folder (:func:`alm_pipeline.assets.resolve_model`);
    2. a folder with a ``config.json`` → that folder;
    3. a training run directory (no ``config.json``): its ``final/`` folder if that holds a ``config.json``;
       else the latest checkpoint — the ``checkpoint-N`` folder with the largest N, directly inside it or in
       its ``checkpoints/`` folder, that holds a ``config.json`` (complete ones, i.e. with a
       ``trainer_state.json``, are preferred); else the only subfolder (up to two levels down) with a
       ``config.json``. Several candidates without a rule to choose between them are an error that lists them;
    4. anything else that does not exist is returned unchanged (a hub name; loading it needs the network).
    """
    from alm_pipeline.assets import resolve_model

    try:
        path_str = resolve_model(spec)
    except FileNotFoundError as err:
        raise EvalError(str(err)) from None
    path = Path(path_str)
    if not path.exists():
        return path_str, "as given (not a local folder)"
    if not path.is_dir():
        raise EvalError(f"{path}: expected a model folder or a training run directory, got a file")
    if (path / "config.json").is_file():
        return str(path), "model folder"
    if (path / "final" / "config.json").is_file():
        return str(path / "final"), "final/ of the run directory"
    checkpoints = []
    for parent in (path, path / "checkpoints"):
        if not parent.is_dir():
            continue
        for entry in parent.iterdir():
            m = _CHECKPOINT_NAME.match(entry.name)
            if m and entry.is_dir() and (entry / "config.json").is_file():
                complete = (entry / "trainer_state.json").is_file()
                checkpoints.append((complete, int(m.group(1)), entry))
    if checkpoints:
        complete, step, best = max(checkpoints, key=lambda c: (c[0], c[1]))
        note = "latest checkpoint" if complete else "latest checkpoint (incomplete: no trainer_state.json)"
        return str(best), f"{note} of the run directory (step {step})"
    found = sorted(
        {p.parent for p in path.glob("*/config.json")} | {p.parent for p in path.glob("*/*/config.json")}
    )
    if len(found) == 1:
        return str(found[0]), "the only model folder inside the directory"
    if not found:
        raise EvalError(
            f"{path}: no model here — no config.json in the folder, no final/ and no checkpoint folder with one"
        )
    listing = ", ".join(str(p.relative_to(path)) for p in found[:10])
    raise EvalError(f"{path}: several model folders inside ({listing}); pass the one to evaluate")


class EvalModel:
    """A causal LM ready for scoring: its tokenizer's byte view and a memory-bounded :meth:`token_stats`.

    Wraps an in-memory model (e.g. the student during training: pass the unwrapped module) or one loaded by
    :func:`load_eval_model`. Scoring runs under ``torch.inference_mode`` with the model temporarily in eval
    mode; parameters are read live (nothing is copied), so a model that keeps training stays in sync.

    The LM head is applied to the final hidden states in slices of positions (``lm_head == "sliced"``) when
    that reproduces the model's own log-softmax on a probe sequence (checked once, here); otherwise (logit
    post-processing this class does not know, an adapter on the head) the model's full logits are used
    (``"full_logits"``: correct, but ``[batch, length, vocabulary]`` is materialised).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        view: ByteView,
        *,
        path: str = "",
        source: str = "",
        max_logit_elements: int = 1 << 25,
    ):
        self.model = model
        self.view = view
        self.path = path or str(getattr(getattr(model, "config", None), "_name_or_path", "") or "model")
        self.source = source
        first = next(model.parameters())
        self.device = first.device
        self.dtype = str(first.dtype).removeprefix("torch.")
        config = model.config
        text_config = getattr(config, "get_text_config", lambda: config)()
        self.max_positions = _max_positions(text_config)
        self.softcap = getattr(text_config, "final_logit_softcapping", None) or None
        self.logit_scale = getattr(text_config, "logit_scale", None) or None
        self.vocab = view.vocab_size
        self.boundary_mask = torch.as_tensor(view.boundary_mask, device=self.device)
        head = model.get_output_embeddings()
        rows = None if head is None else getattr(head, "weight", None)
        if rows is not None and self.vocab > rows.shape[0]:
            raise EvalError(
                f"{self.path}: the tokenizer has {self.vocab} tokens but the LM head only {rows.shape[0]} rows"
            )
        body = getattr(model, getattr(model, "base_model_prefix", ""), None)
        self.body: torch.nn.Module | None = None
        self.head: torch.nn.Linear | None = None
        self.lm_head = "full_logits"
        if isinstance(body, torch.nn.Module) and type(head) is torch.nn.Linear:
            self.body, self.head, self.lm_head = body, head, "sliced"
            with self._scoring():
                if not self._sliced_path_matches():
                    self.body, self.head, self.lm_head = None, None, "full_logits"
        self.slice_size = max(1, max_logit_elements // max(self.vocab, 1))

    @contextlib.contextmanager
    def _scoring(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.model.train(was_training)

    def _head_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert self.head is not None
        weight, bias = self.head.weight, self.head.bias
        if self.logit_scale:
            weight = weight * self.logit_scale
            bias = bias * self.logit_scale if bias is not None else None
        return weight, bias

    def describe(self) -> dict:
        return {
            "path": self.path,
            "chosen_as": self.source,
            "tokenizer": {
                "kind": self.view.kind,
                "vocab_size": self.vocab,
                "prefix_ids": list(self.view.prefix_ids),
                "suffix_ids": list(self.view.suffix_ids),
                "fingerprint": self.view.fingerprint,
            },
            "dtype": self.dtype,
            "device": str(self.device),
            "lm_head": self.lm_head,
            "max_positions": self.max_positions,
        }

    def token_stats(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> StudentTokenStats:
        """:func:`student_token_stats` (ℓ and σ per token, fp32) of right-padded ``[B, T]`` ids."""
        with self._scoring():
            ids = input_ids.to(self.device)
            mask = attention_mask.to(self.device)
            common = {
                "attention_mask": mask,
                "slice_size": self.slice_size,
                "checkpoint_slices": False,
            }
            if self.body is not None:
                weight, bias = self._head_params()
                hidden = self.body(input_ids=ids, attention_mask=mask).last_hidden_state
                return student_token_stats(
                    ids,
                    self.boundary_mask,
                    hidden_states=hidden,
                    lm_head_weight=weight,
                    lm_head_bias=bias,
                    logit_softcap=self.softcap,
                    **common,
                )
            # the model's own logits already include any soft-capping / scaling
            logits = self.model(input_ids=ids, attention_mask=mask).logits
            return student_token_stats(ids, self.boundary_mask, logits=logits, **common)

    def _sliced_path_matches(self) -> bool:
        """Whether ``head(body(x))`` (+ scale and soft-capping) reproduces the model's own log-softmax."""
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.vocab, (1, 12), generator=gen).to(self.device)
        mask = torch.ones_like(ids)
        try:
            full = self.model(input_ids=ids, attention_mask=mask).logits[0, :, : self.vocab].float()
            hidden = self.body(input_ids=ids, attention_mask=mask).last_hidden_state[0]
        except Exception:
            return False
        weight, bias = self._head_params()
        ours = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias)[:, : self.vocab].float()
        if self.softcap:
            ours = torch.tanh(ours / self.softcap) * self.softcap
        diff = (full.log_softmax(-1) - ours.log_softmax(-1)).abs().max().item()
        return diff <= (1e-3 if self.dtype == "float32" else 5e-2)


def load_eval_model(
    spec: str,
    *,
    dtype: str = "float32",
    device: str = "auto",
    max_logit_elements: int = 1 << 25,
    view: ByteView | None = None,
) -> EvalModel:
    """Resolve ``spec`` (:func:`resolve_model_dir`), load the model and its tokenizer (``view`` overrides the
    tokenizer), and wrap them for scoring. A folder holding a LoRA adapter is loaded with the adapter applied
    (transformers does so when ``peft`` is installed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in _DTYPES:
        raise EvalError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    path, source = resolve_model_dir(spec)
    if view is None:
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception as err:
            raise EvalError(f"{path}: cannot load the model's tokenizer ({err})") from None
        try:
            view = byte_view_from_hf(tok, name=path)
        except TokenizerMismatchError as err:
            raise EvalError(str(err)) from None
    target = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype])
    except Exception as err:
        raise EvalError(f"{path}: cannot load the model ({type(err).__name__}: {err})") from None
    model = model.eval().to(target)
    model.requires_grad_(False)
    return EvalModel(model, view, path=path, source=source, max_logit_elements=max_logit_elements)


def _max_positions(config: Any) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# ----------------------------------------------------------------------------------------------------------
# batching
# ----------------------------------------------------------------------------------------------------------


def _length_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches, longest first, with ``rows × longest ≤ batch_tokens`` (≥ 1 row)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * width > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _pad(seqs: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.as_tensor(np.asarray(seq, dtype=np.int64))
        mask[row, : len(seq)] = 1
    return ids, mask


def _windows(items: Iterable, size: int) -> Iterator[list]:
    window: list = []
    for item in items:
        window.append(item)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


# ----------------------------------------------------------------------------------------------------------
# bits per byte
# ----------------------------------------------------------------------------------------------------------


def iter_data_texts(
    data: str, text_field: str = "text", id_field: str | None = None, max_docs: int | None = None
) -> Iterator[tuple[str, str]]:
    """``(document reference, text)`` of a corpus (validated by :func:`iter_documents`: empty and
    whitespace-only texts and repeated texts are skipped). ``"heldout"`` is the bundled held-out set."""
    from alm_pipeline.pipeline.corpus import CorpusConfig, CorpusError, iter_documents

    path = data
    if data == HELDOUT:
        from alm_pipeline.assets import bundled_heldout_path

        path = bundled_heldout_path()
    config = CorpusConfig(path=path, text_field=text_field, id_field=id_field, limit=max_docs)
    try:
        for doc in iter_documents(config):
            yield f"{doc.doc_id} at {doc.source}", doc.text
    except CorpusError as err:
        raise EvalError(str(err)) from None


def iter_cache_texts(cache_path: str, max_docs: int | None = None) -> Iterator[tuple[str, str]]:
    """``(document reference, text)`` of a teacher cache: the exact texts the teacher scored."""
    cache = _open_cache(cache_path)
    n = 0
    for k, table in enumerate(cache.iter_tables(columns=["doc_id", "text"])):
        for doc_id, text in zip(table["doc_id"].to_pylist(), table["text"].to_pylist(), strict=True):
            if max_docs is not None and n >= max_docs:
                return
            n += 1
            yield f"{doc_id} in cache shard {k}", text


@torch.inference_mode()
def model_bits_per_byte(
    model: EvalModel,
    texts: Iterable[tuple[str, str]] | Iterable[str],
    *,
    max_length: int = 1024,
    batch_tokens: int = 8192,
    window_docs: int = 2048,
    progress: Callable[[str], None] | None = None,
) -> BitsPerByte:
    """Bits per byte of ``model`` on ``texts`` (strings, or ``(reference, text)`` pairs whose reference
    appears in error messages), under the module's convention. Documents are read ``window_docs`` at a time,
    sorted by length and packed into batches of at most ``batch_tokens`` padded tokens; sums are float64.
    ``max_length`` is lowered to the model's position limit when that is smaller."""
    if max_length < 2:
        raise EvalError(f"max_length must be >= 2, got {max_length}")
    if model.max_positions is not None:
        max_length = min(max_length, model.max_positions)
    view = model.view
    pad_id = view.pad_id if view.pad_id is not None and 0 <= view.pad_id < view.vocab_size else 0
    nats, nbytes, tokens, docs, truncated = 0.0, 0, 0, 0, 0
    t0 = time.time()
    for window in _windows(texts, window_docs):
        seqs: list[np.ndarray] = []
        for i, item in enumerate(window):
            ref, text = item if isinstance(item, tuple) else (f"#{docs + i}", item)
            if not isinstance(text, str):
                raise EvalError(f"document {ref}: text is {type(text).__name__}, expected a string")
            try:
                enc = view.encode(view.normalize_text(text), max_length=max_length, doc_ref=ref)
            except (TokenizerMismatchError, UnicodeEncodeError) as err:
                raise EvalError(
                    f"{err}; the model's tokenizer cannot represent this document exactly"
                ) from None
            if len(enc.token_ids) == 0:
                raise EvalError(f"document {ref}: encodes to no token (empty text?)")
            seqs.append(enc.token_ids)
            nbytes += int(enc.offsets[-1]) - int(enc.offsets[0])
            tokens += len(enc.token_ids) - 1
            truncated += int(enc.truncated)
        docs += len(window)
        for batch in _length_batches([len(s) for s in seqs], batch_tokens):
            ids, mask = _pad([seqs[i] for i in batch], pad_id)
            stats = model.token_stats(ids, mask)
            nats -= float(stats.token_logprob.double().sum())
        if progress:
            progress(f"bits per byte: {docs} documents, {tokens} tokens ({time.time() - t0:.1f}s)")
    return BitsPerByte.from_sums(nats, nbytes, tokens, docs, truncated, what=f"model {model.path}")


def _open_cache(path: str):
    from alm_pipeline.cache.reader import open_cache
    from alm_pipeline.cache.store import CacheIntegrityError

    try:
        return open_cache(path, verify=True)
    except (CacheIntegrityError, ValueError, OSError) as err:
        raise EvalError(str(err)) from None


def _list_values(column: pa.ChunkedArray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Flat values and per-row start offsets (length rows + 1) of a list column (slices handled)."""
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(dtype)
    return values, starts


def cache_bits_per_byte(cache_path: str, max_docs: int | None = None) -> tuple[BitsPerByte, dict]:
    """The teacher's bits per byte read from a teacher cache (module convention: ``logprob`` at positions
    ``≥ 1`` over the bytes covered by tokens ``≥ 1``, i.e. ``offsets[-1] − offsets[0]``), float64 sums.
    Returns it with a short description of the cache (path, teacher, tokenizer)."""
    cache = _open_cache(cache_path)
    nats, nbytes, tokens, docs, truncated = 0.0, 0, 0, 0, 0
    for k, table in enumerate(cache.iter_tables(columns=["doc_id", "logprob", "offsets", "truncated"])):
        if max_docs is not None:
            if docs >= max_docs:
                break
            table = table.slice(0, max_docs - docs)
        lp, lp_starts = _list_values(table["logprob"], np.float64)
        off, off_starts = _list_values(table["offsets"], np.int64)
        lengths = np.diff(lp_starts)
        if (np.diff(off_starts) != lengths).any() or (lengths < 1).any():
            raise EvalError(f"{cache.shard_files()[k]}: logprob/offsets lengths disagree or a row is empty")
        predicted = np.ones(len(lp), dtype=bool)
        predicted[lp_starts[:-1]] = False  # position 0 of every document: nothing predicts it
        values = lp[predicted]
        if not np.isfinite(values).all():
            bad = int(
                np.searchsorted(lp_starts, np.flatnonzero(predicted)[~np.isfinite(values)][0], "right") - 1
            )
            raise EvalError(
                f"{cache.shard_files()[k]}: document {table['doc_id'][bad].as_py()!r} has a non-finite logprob "
                "at a position >= 1"
            )
        nats -= float(values.sum())
        nbytes += int((off[off_starts[1:] - 1] - off[off_starts[:-1]]).sum())
        tokens += int(predicted.sum())
        docs += table.num_rows
        truncated += int(pc.sum(table["truncated"]).as_py() or 0)
    info = {
        "path": str(cache.root),
        "teacher": cache.manifest["teacher"]["name"],
        "teacher_path": cache.manifest["teacher"]["path"],
        "tokenizer_fingerprint": cache.tokenizer_fingerprint,
        "max_length": cache.manifest["settings"]["max_length"],
    }
    return BitsPerByte.from_sums(nats, nbytes, tokens, docs, truncated, what=f"cache {cache.root}"), info


# ----------------------------------------------------------------------------------------------------------
# chunk agreement
# ----------------------------------------------------------------------------------------------------------


def _same_tokenizer(a: ByteView, b: ByteView) -> str | None:
    """``None`` if the two byte views tokenize identically as far as alignment cares, else a reason."""
    if a.fingerprint == b.fingerprint:
        return None
    if a.vocab_size != b.vocab_size:
        return f"vocabulary sizes differ ({a.vocab_size} vs {b.vocab_size})"
    if list(a.prefix_ids) != list(b.prefix_ids) or list(a.suffix_ids) != list(b.suffix_ids):
        return "special-token templates differ"
    if a.token_bytes != b.token_bytes or not np.array_equal(a.is_special, b.is_special):
        return "token byte strings differ"
    return None


@torch.inference_mode()
def chunk_agreement(
    model: EvalModel,
    aligned_path: str,
    *,
    batch_tokens: int = 8192,
    max_docs: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[ChunkAgreement, dict]:
    """Mean |C_S − C_T| (and debiased, with σ on both sides) of ``model`` over the groups of an aligned set.

    The model's tokenizer must be the aligned set's student tokenizer (same byte strings, specials and
    template). Returns the agreement and a short description of the aligned set."""
    from alm_pipeline.cache.aligned import TRAINER_COLUMNS, open_aligned_set
    from alm_pipeline.cache.store import CacheIntegrityError
    from alm_pipeline.pipeline.byteview import load_byte_view

    try:
        aligned = open_aligned_set(aligned_path, verify=True)
    except (CacheIntegrityError, ValueError, OSError) as err:
        raise EvalError(str(err)) from None
    try:
        set_view = load_byte_view(aligned.tokenizer_dir)
    except (OSError, ValueError) as err:
        raise EvalError(f"{aligned.root}: cannot load the aligned set's student tokenizer ({err})") from None
    reason = _same_tokenizer(model.view, set_view)
    if reason:
        raise EvalError(
            f"model {model.path} does not use the student tokenizer of aligned set {aligned.root} "
            f"({aligned.manifest['student_tokenizer']['name']}): {reason}"
        )
    pad_id = 0
    sums = np.zeros(5, dtype=np.float64)  # |ΔC|, |Δ(C+σ)|, ΔC, C_T, C_S
    groups_total, docs = 0, 0
    t0 = time.time()
    for table in aligned.iter_tables(columns=TRAINER_COLUMNS):
        if max_docs is not None:
            if docs >= max_docs:
                break
            table = table.slice(0, max_docs - docs)
        rows = table.to_pylist()
        seqs = [np.asarray(r["input_ids"], dtype=np.int64) for r in rows]
        for i, seq in enumerate(seqs):
            if len(seq) == 0:
                raise EvalError(f"{aligned.root}: document {rows[i]['doc_id']!r} has no student token")
            if model.max_positions is not None and len(seq) > model.max_positions:
                raise EvalError(
                    f"{aligned.root}: document {rows[i]['doc_id']!r} has {len(seq)} student tokens, more than the "
                    f"model's {model.max_positions} positions; align with a smaller --max-student-length"
                )
        for batch in _length_batches([len(s) for s in seqs], batch_tokens):
            batch_rows = [rows[i] for i in batch]
            groups = ALMGroups.from_documents(batch_rows, seq_lens=[len(seqs[i]) for i in batch])
            if groups.num_groups == 0:
                continue
            ids, mask = _pad([seqs[i] for i in batch], pad_id)
            stats = model.token_stats(ids, mask)
            student = student_chunk_stats(stats, groups.to(stats.token_logprob.device), dtype=torch.float64)
            c_s = student.logprob.cpu()
            s_s = student.boundary_logprob.cpu()
            c_t = groups.teacher_logprob.double()
            s_t = groups.teacher_boundary_logprob.double()
            sums += np.array(
                [
                    float((c_s - c_t).abs().sum()),
                    float(((c_s + s_s) - (c_t + s_t)).abs().sum()),
                    float((c_s - c_t).sum()),
                    float(c_t.sum()),
                    float(c_s.sum()),
                ]
            )
            groups_total += groups.num_groups
        docs += table.num_rows
        if progress:
            progress(f"chunk agreement: {docs} documents, {groups_total} chunks ({time.time() - t0:.1f}s)")
    if groups_total == 0:
        raise EvalError(f"{aligned.root}: no aligned chunk in {docs} document(s); nothing to compare")
    mean = sums / groups_total
    result = ChunkAgreement(
        mean_abs_logprob_diff=float(mean[0]),
        mean_abs_debiased_logprob_diff=float(mean[1]),
        mean_logprob_diff=float(mean[2]),
        teacher_mean_chunk_logprob=float(mean[3]),
        student_mean_chunk_logprob=float(mean[4]),
        groups=groups_total,
        docs=docs,
    )
    info = {
        "path": str(aligned.root),
        "student_tokenizer": aligned.manifest["student_tokenizer"]["name"],
        "teacher": aligned.manifest["cache"]["teacher"],
        "gamma": aligned.gamma,
        "debias": aligned.debias,
    }
    return result, info


# ----------------------------------------------------------------------------------------------------------
# the whole command
# ----------------------------------------------------------------------------------------------------------


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically (temporary file + rename)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out


def run_evaluation(config: EvalConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Everything ``config`` asks for, as one JSON-ready dict (see :class:`EvalConfig`)::

        {"convention": ..., "model": {...}, "data": {"path", "max_length", <BitsPerByte>},
         "cache": {"path", "teacher", ..., <BitsPerByte>},
         "cache_texts": {<BitsPerByte of the model on the cached texts>, "gap_to_teacher"},
         "chunk_agreement": {"aligned", ..., <ChunkAgreement>}, "seconds": ...}

    With ``run_dir`` the dict is also written to ``run_dir/eval.json``.
    """
    say = progress or (lambda msg: None)
    t0 = time.time()
    result: dict[str, Any] = {"convention": BITS_PER_BYTE_CONVENTION}
    model = None
    if config.model:
        say(f"loading {config.model}")
        model = load_eval_model(
            config.model,
            dtype=config.dtype,
            device=config.device,
            max_logit_elements=config.max_logit_elements,
        )
        result["model"] = model.describe()
    max_length = config.max_length
    if model is not None and model.max_positions is not None and max_length > model.max_positions:
        say(
            f"max_length {max_length} is above the model's {model.max_positions} positions: using {model.max_positions}"
        )
        max_length = model.max_positions
    scoring = {"max_length": max_length, "batch_tokens": config.batch_tokens, "progress": say}

    data = config.data
    if model is not None and not (data or config.cache or config.aligned):
        data = HELDOUT
    if model is not None and data:
        say(f"bits per byte of the model on {data}")
        texts = iter_data_texts(data, config.text_field, config.id_field, config.max_docs)
        bpb = model_bits_per_byte(model, texts, **scoring)
        where = data if data != HELDOUT else f"{HELDOUT} (bundled held-out documents)"
        result["data"] = {"path": where, "max_length": max_length, **bpb.to_json()}

    if config.cache:
        say(f"teacher bits per byte from {config.cache}")
        teacher_bpb, info = cache_bits_per_byte(config.cache, config.max_docs)
        result["cache"] = {**info, **teacher_bpb.to_json()}
        if config.cache_texts and model is not None:
            say("bits per byte of the model on the cached texts")
            bpb = model_bits_per_byte(model, iter_cache_texts(config.cache, config.max_docs), **scoring)
            result["cache_texts"] = {
                "max_length": max_length,
                **bpb.to_json(),
                "gap_to_teacher": bpb.bits_per_byte - teacher_bpb.bits_per_byte,
            }

    if config.aligned and model is not None:
        say(f"chunk agreement with {config.aligned}")
        agreement, info = chunk_agreement(
            model, config.aligned, batch_tokens=config.batch_tokens, max_docs=config.max_docs, progress=say
        )
        result["chunk_agreement"] = {"aligned": info, **agreement.to_json()}

    result["seconds"] = round(time.time() - t0, 3)
    if config.run_dir:
        out = write_json(Path(config.run_dir) / EVAL_FILE, result)
        say(f"wrote {out}")
    return result
