"""Tokenizer-independent bits per byte: of any causal LM on any text (:func:`model_bits_per_byte`), and of the
teacher read from a teacher cache (:func:`cache_bits_per_byte`).

The convention (one for every model, so that every model scores the same bytes)::

    bits per byte = Σ_{predicted tokens u} −log2 p(t_u | t_<u)  /  Σ_{predicted tokens u} UTF-8 bytes of t_u

pooled over the whole corpus (not averaged per document). **Every byte of every document is predicted**: each
document is encoded with the model's own tokenizer and special tokens (:meth:`ByteView.encode`), and its first
token is predicted from a context token (:func:`first_token_context`):

1. the tokenizer's own prefix when it adds one (a BOS: SentencePiece models, the ``bytes`` tokenizer);
2. else its BOS token, prepended, when it has one (GPT-2's ``<|endoftext|>``, which it does not add);
3. else its EOS token, prepended (the document separator such models saw before a document in pretraining);
4. else nothing: the first token of each document is left out and its bytes are counted in
   ``excluded_bytes``, never silently.

Special tokens cover no bytes, but their log-probabilities count (an appended EOS is predicted like any token).
Byte counts are exact (byte views, never decoded strings), on the text as the tokenizer sees it (after its
unicode normalization, if it has one). Documents longer than ``max_length`` tokens (the context token and
special tokens included) are truncated to their first ``max_length`` tokens; the bytes cut off are counted
in ``truncated_bytes`` (part of ``excluded_bytes``). So ``bytes + excluded_bytes == document_bytes`` always.
Log-probabilities are log-softmaxes in fp32 over the tokenizer's ids (padded LM-head rows excluded), computed
from the final hidden states and the LM head in slices of positions so that no ``[batch, length, vocabulary]``
tensor is materialised.

A teacher cache stores the teacher's per-token log-probabilities on its own encoding (NaN at position 0) and
byte end offsets, so :func:`cache_bits_per_byte` reads the teacher's number straight from it. It follows the
convention only when the teacher tokenizer adds a BOS: without one, position 0 of every document has no
log-probability in the cache, and the bytes of each document's first token are reported as
``excluded_bytes``. The comparable teacher number then comes from evaluating the teacher as a model
(``evaluate --model TEACHER``) on the same texts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow.compute as pc
import torch

from alm_pipeline.cache.arrow import list_parts
from alm_pipeline.evaluation.models import EvalError, EvalModel
from alm_pipeline.modeling import length_batches, pad_batch
from alm_pipeline.pipeline.byteview import ByteView, TokenizerMismatchError

__all__ = [
    "BITS_PER_BYTE_CONVENTION",
    "HELDOUT",
    "BitsPerByte",
    "FirstTokenContext",
    "cache_bits_per_byte",
    "first_token_context",
    "iter_cache_texts",
    "iter_data_texts",
    "model_bits_per_byte",
]

BITS_PER_BYTE_CONVENTION = (
    "bits per byte = sum over every predicted token of -log2 p(token | previous tokens) / sum of the UTF-8 "
    "bytes those tokens cover, pooled over the corpus; every byte of a document is predicted: its first token "
    "from the tokenizer's own BOS prefix, else its BOS token, else its EOS token (prepended), else (no such "
    "token) the first token is left out and its bytes are counted in excluded_bytes; the tokenizer's own special "
    "tokens; documents longer than max_length tokens are truncated and the bytes cut off are counted in "
    "truncated_bytes (part of excluded_bytes); bytes + excluded_bytes = document_bytes"
)
HELDOUT = "heldout"  # --data short name: the bundled held-out documents
_LN2 = math.log(2.0)


@dataclass(frozen=True)
class FirstTokenContext:
    """What a model predicts a document's first token from (:func:`first_token_context`)."""

    ids: tuple[int, ...]  # token ids put before the encoded document (empty: the prefix, or no context)
    predicted: bool  # whether the first text token is predicted (False: its bytes are excluded)
    description: str


def first_token_context(view: ByteView) -> FirstTokenContext:
    """The context a document's first token is predicted from under the convention (module docstring): the
    tokenizer's own prefix, else its BOS, else its EOS token (prepended), else none."""

    def token(i: int) -> str:
        return view.tokenizer.id_to_token(i) or str(i)

    if view.prefix_ids:
        names = " ".join(repr(token(i)) for i in view.prefix_ids)
        return FirstTokenContext((), True, f"the tokenizer's own prefix {names} (BOS)")
    for what, i in (("BOS", view.bos_id), ("EOS", view.eos_id)):
        if i is not None and 0 <= i < view.vocab_size:
            return FirstTokenContext(
                (int(i),), True, f"{what} {token(i)!r}, prepended (the tokenizer does not add it)"
            )
    return FirstTokenContext(
        (),
        False,
        "none (the tokenizer has no BOS and no EOS token): each document's first token is not predicted and "
        "its bytes are counted in excluded_bytes",
    )


@dataclass(frozen=True)
class BitsPerByte:
    """Bits per byte over a corpus, with the sums it is made of (``bytes + excluded_bytes == document_bytes``)."""

    bits_per_byte: float
    bits: float  # Σ −log2 p over the predicted tokens
    bytes: int  # Σ UTF-8 bytes covered by the predicted tokens
    predicted_tokens: int
    docs: int
    truncated_docs: int
    tokens_per_byte: float  # predicted tokens / bytes (the tokenizer's compression)
    nats_per_token: float  # mean −ln p per predicted token
    document_bytes: int  # Σ UTF-8 bytes of the documents (as the tokenizer sees them)
    excluded_bytes: int  # document bytes not scored: first tokens without a context + truncated bytes
    truncated_bytes: int  # the part of excluded_bytes cut off by max_length truncation
    context: str  # what each document's first token is predicted from

    @classmethod
    def from_sums(
        cls,
        nats: float,
        nbytes: int,
        tokens: int,
        docs: int,
        truncated: int,
        what: str,
        *,
        document_bytes: int,
        truncated_bytes: int,
        context: str,
    ) -> BitsPerByte:
        if nbytes <= 0:
            raise EvalError(
                f"{what}: no predicted byte in {docs} document(s) (every document is a single token without a "
                "context token before it, or the source is empty); bits per byte is undefined"
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
            document_bytes=int(document_bytes),
            excluded_bytes=int(document_bytes - nbytes),
            truncated_bytes=int(truncated_bytes),
            context=context,
        )

    def to_json(self) -> dict:
        return asdict(self)


def _windows(items: Iterable, size: int) -> Iterator[list]:
    window: list = []
    for item in items:
        window.append(item)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


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
            if doc.messages is not None:
                raise CorpusError(
                    f"{doc.source}: a conversation (messages); bits per byte is measured on plain text documents"
                )
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
    context = first_token_context(view)
    before = np.asarray(context.ids, dtype=np.int32)
    pad_id = view.pad_id if view.pad_id is not None and 0 <= view.pad_id < view.vocab_size else 0
    nats, nbytes, tokens, docs, truncated = 0.0, 0, 0, 0, 0
    document_bytes, truncated_bytes = 0, 0
    t0 = time.time()
    for window in _windows(texts, window_docs):
        seqs: list[np.ndarray] = []
        for i, item in enumerate(window):
            ref, text = item if isinstance(item, tuple) else (f"#{docs + i}", item)
            if not isinstance(text, str):
                raise EvalError(f"document {ref}: text is {type(text).__name__}, expected a string")
            text = view.normalize_text(text)
            try:
                enc = view.encode(text, max_length=max_length - len(before), doc_ref=ref)
            except (TokenizerMismatchError, UnicodeEncodeError) as err:
                raise EvalError(
                    f"{err}; the model's tokenizer cannot represent this document exactly"
                ) from None
            if len(enc.token_ids) == 0:
                raise EvalError(f"document {ref}: encodes to no token (empty text?)")
            ids = np.concatenate([before, enc.token_ids]) if len(before) else enc.token_ids
            seqs.append(ids)
            # offsets[0] is 0 after a prefix; without any context it is the unpredicted first token's end
            first = 0 if context.predicted else int(enc.offsets[0])
            nbytes += int(enc.offsets[-1]) - first
            text_bytes = len(text.encode("utf-8"))
            document_bytes += text_bytes
            truncated_bytes += text_bytes - int(enc.offsets[-1])
            tokens += len(ids) - 1
            truncated += int(enc.truncated)
        docs += len(window)
        for batch in length_batches([len(s) for s in seqs], batch_tokens):
            ids, mask = pad_batch([seqs[i] for i in batch], pad_id)
            stats = model.token_stats(ids, mask)
            nats -= float(stats.token_logprob.double().sum())
        if progress:
            progress(f"bits per byte: {docs} documents, {tokens} tokens ({time.time() - t0:.1f}s)")
    return BitsPerByte.from_sums(
        nats,
        nbytes,
        tokens,
        docs,
        truncated,
        what=f"model {model.path}",
        document_bytes=document_bytes,
        truncated_bytes=truncated_bytes,
        context=context.description,
    )


def _open_cache(path: str):
    from alm_pipeline.cache import open_cache
    from alm_pipeline.cache.store import CacheIntegrityError

    try:
        return open_cache(path, verify=True)
    except (CacheIntegrityError, ValueError, OSError) as err:
        raise EvalError(str(err)) from None


def cache_bits_per_byte(cache_path: str, max_docs: int | None = None) -> tuple[BitsPerByte, dict]:
    """The teacher's bits per byte read from a teacher cache: ``logprob`` at positions ``≥ 1`` over the bytes
    covered by tokens ``≥ 1`` (``offsets[-1] − offsets[0]`` per document), float64 sums. With a BOS-adding
    teacher tokenizer that is the module's convention; without one, each document's first token has no
    log-probability in the cache and its bytes are reported in ``excluded_bytes`` (evaluate the teacher as a
    model for the comparable number). ``document_bytes`` counts the stored texts (already truncated to what the
    teacher saw; ``truncated_bytes`` is 0). Returns it with a short description of the cache."""
    cache = _open_cache(cache_path)
    nats, nbytes, tokens, docs, truncated, document_bytes = 0.0, 0, 0, 0, 0, 0
    for k, table in enumerate(
        cache.iter_tables(columns=["doc_id", "text", "logprob", "offsets", "truncated"])
    ):
        if max_docs is not None:
            if docs >= max_docs:
                break
            table = table.slice(0, max_docs - docs)
        lp, lp_starts = list_parts(table["logprob"], np.float64)
        off, off_starts = list_parts(table["offsets"], np.int64)
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
        document_bytes += int(pc.sum(pc.binary_length(table["text"])).as_py() or 0)
        tokens += int(predicted.sum())
        docs += table.num_rows
        truncated += int(pc.sum(table["truncated"]).as_py() or 0)
    prefix = cache.manifest["tokenizer"].get("prefix_ids") or []
    if prefix:
        context = f"the teacher tokenizer's own prefix {prefix} (BOS), as cached"
    else:
        context = (
            "none: the teacher tokenizer adds no BOS, so the cache has no log-probability for a document's first "
            "token and its bytes are excluded; evaluate the teacher with --model for the number under the common "
            "convention (its first token predicted from its BOS/EOS token)"
        )
    info = {
        "path": str(cache.root),
        "teacher": cache.manifest["teacher"]["name"],
        "teacher_path": cache.manifest["teacher"]["path"],
        "tokenizer_fingerprint": cache.tokenizer_fingerprint,
        "max_length": cache.manifest["settings"]["max_length"],
    }
    bpb = BitsPerByte.from_sums(
        nats,
        nbytes,
        tokens,
        docs,
        truncated,
        what=f"cache {cache.root}",
        document_bytes=document_bytes,
        truncated_bytes=0,
        context=context,
    )
    return bpb, info
