"""FVT (Fast Vocabulary Transfer, Gee et al. 2022) for a tokenizer transfer: the embedding row of a new token
is the mean of the source model's rows of the source tokenizer's tokenization of the new token's exact bytes
(:func:`fvt_plan` says which rows, :func:`apply_fvt` builds the matrix). The rules are in
:mod:`alm_pipeline.trainer.student`'s docstring.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from alm_pipeline.pipeline.byteview import ByteView

__all__ = ["FVT_KINDS", "FvtPlan", "apply_fvt", "fvt_plan"]

_BYTE_FALLBACK_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass(frozen=True)
class FvtPlan:
    """Per new token id: the source ids whose rows are averaged, and how they were found.

    ``sources[j]`` is a tuple of source token ids (repeats count: the pieces of ``aa`` may be ``a, a``); an
    empty tuple means the mean of the source's non-special rows. ``kinds[j]`` is one of :data:`FVT_KINDS`:
    ``exact`` (same bytes as one source token: the row is copied), ``special`` (special token matched by role
    or content: copied), ``multi_token`` (mean of >= 2 pieces covering exactly the token's bytes),
    ``special_mean`` (special token without counterpart: mean row) and ``fallback`` (bytes no source token
    covers, or a token without bytes: mean row).
    """

    sources: list[tuple[int, ...]]
    kinds: list[str]

    def __post_init__(self) -> None:
        if len(self.sources) != len(self.kinds):
            raise ValueError("sources and kinds must have one entry per new token")

    def __len__(self) -> int:
        return len(self.sources)

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(FVT_KINDS, 0)
        for k in self.kinds:
            out[k] += 1
        return out


FVT_KINDS = ("exact", "special", "multi_token", "special_mean", "fallback")


def _source_lookup(source: ByteView) -> dict[bytes, int]:
    """Byte string -> source token id, over non-special tokens; a normal piece wins over a byte-fallback piece
    with the same bytes, otherwise the lowest id wins."""
    lookup: dict[bytes, int] = {}
    fallback_ids: set[int] = set()
    for i, b in enumerate(source.token_bytes):
        if not b or source.is_special[i]:
            continue
        is_fallback = False
        if source.kind == "sentencepiece":
            piece = source.tokenizer.id_to_token(i)
            is_fallback = piece is not None and bool(_BYTE_FALLBACK_PIECE.match(piece))
        if is_fallback:
            fallback_ids.add(i)
        current = lookup.get(b)
        if current is None or (current in fallback_ids and not is_fallback):
            lookup[b] = i
    return lookup


def _greedy_segment(data: bytes, lookup: dict[bytes, int], max_len: int) -> list[int] | None:
    """Longest-match-first segmentation of ``data`` into source tokens; ``None`` if some byte is not covered."""
    ids: list[int] = []
    pos = 0
    while pos < len(data):
        for n in range(min(max_len, len(data) - pos), 0, -1):
            tid = lookup.get(data[pos : pos + n])
            if tid is not None:
                ids.append(tid)
                pos += n
                break
        else:
            return None
    return ids


def _special_roles(view: ByteView) -> dict[str, int]:
    return {
        role: tid
        for role, tid in (("bos", view.bos_id), ("eos", view.eos_id), ("pad", view.pad_id))
        if tid is not None
    }


def _special_source(
    new_id: int, target: ByteView, source: ByteView, src_specials: dict[str, int]
) -> int | None:
    """The source token a special target token maps to, or ``None``."""
    src_roles = _special_roles(source)
    # a token may hold several roles (GPT-2's <|endoftext|> is BOS and EOS): take the first that maps
    for role, tid in (("bos", target.bos_id), ("eos", target.eos_id), ("pad", target.pad_id)):
        if tid != new_id:
            continue
        if role in src_roles:
            return src_roles[role]
        if role == "pad" and "eos" in src_roles:
            return src_roles["eos"]
    content = target.tokenizer.id_to_token(new_id)
    if content is not None and content in src_specials:
        return src_specials[content]
    return None


def fvt_plan(source: ByteView, target: ByteView) -> FvtPlan:
    """Map every token of ``target`` to source tokens covering exactly its bytes (see the module docstring).

    The invariant (checked by the tests): for ``exact`` and ``multi_token`` entries, the concatenated
    ``source.token_bytes`` of ``sources[j]`` equal ``target.token_bytes[j]``.
    """
    lookup = _source_lookup(source)
    max_len = max((len(b) for b in lookup), default=1)
    src_specials = {}
    for i in np.flatnonzero(source.is_special).tolist():
        content = source.tokenizer.id_to_token(i)
        if content is not None:
            src_specials.setdefault(content, i)

    n = target.vocab_size
    sources: list[tuple[int, ...]] = [()] * n
    kinds: list[str] = [""] * n
    to_tokenize: list[tuple[int, str]] = []
    for j in range(n):
        b = target.token_bytes[j]
        if target.is_special[j] or not b:
            if not target.is_special[j]:  # a hole in the vocabulary: covers no bytes
                kinds[j] = "fallback"
                continue
            src = _special_source(j, target, source, src_specials)
            sources[j], kinds[j] = ((src,), "special") if src is not None else ((), "special_mean")
            continue
        if b in lookup:
            sources[j], kinds[j] = (lookup[b],), "exact"
            continue
        try:
            to_tokenize.append((j, b.decode("utf-8")))
        except UnicodeDecodeError:
            pieces = _greedy_segment(b, lookup, max_len)
            sources[j], kinds[j] = _pieces_kind(pieces)

    if to_tokenize:
        encodings = source.tokenizer.encode_batch([text for _, text in to_tokenize], add_special_tokens=False)
        for (j, _text), enc in zip(to_tokenize, encodings, strict=True):
            pieces = _exact_pieces(target.token_bytes[j], list(enc.ids), source, lookup, max_len)
            sources[j], kinds[j] = _pieces_kind(pieces)
    return FvtPlan(sources=sources, kinds=kinds)


def _pieces_kind(pieces: list[int] | None) -> tuple[tuple[int, ...], str]:
    if not pieces:
        return (), "fallback"
    return tuple(pieces), ("exact" if len(pieces) == 1 else "multi_token")


def _exact_pieces(
    data: bytes, ids: list[int], source: ByteView, lookup: dict[bytes, int], max_len: int
) -> list[int] | None:
    """Source pieces covering exactly ``data``, from the source tokenizer's ``ids`` for its text."""
    tb = source.token_bytes
    joined = b"".join(tb[i] for i in ids)
    if joined == data and all(not source.is_special[i] for i in ids):
        return ids
    if ids and joined == b" " + data and tb[ids[0]][:1] == b" " and not source.is_special[ids[0]]:
        # SentencePiece dummy prefix: the first piece carries a space that is not in the bytes
        rest = tb[ids[0]][1:]
        if not rest:
            return ids[1:]
        head = [lookup[rest]] if rest in lookup else _greedy_segment(rest, lookup, max_len)
        if head is not None:
            return head + ids[1:]
    # the tokenizer cannot reproduce the bytes (unknown characters, text-rewriting pre-tokenizers): go by bytes
    return _greedy_segment(data, lookup, max_len)


def _mean_row(matrix: torch.Tensor, ids: np.ndarray, chunk: int = 16384) -> torch.Tensor:
    """float32 mean of ``matrix[ids]`` (in chunks: no float32 copy of a whole large matrix)."""
    if len(ids) == 0:
        ids = np.arange(matrix.shape[0])
    total = torch.zeros(matrix.shape[1:], dtype=torch.float32, device=matrix.device)
    index = torch.as_tensor(ids, dtype=torch.long, device=matrix.device)
    for start in range(0, len(index), chunk):
        total += matrix[index[start : start + chunk]].float().sum(0)
    return total / len(index)


def apply_fvt(plan: FvtPlan, matrix: torch.Tensor, mean_ids: Sequence[int] | np.ndarray) -> torch.Tensor:
    """The new matrix (``len(plan)`` rows, same dtype/device as ``matrix``): single-source rows copied exactly,
    multi-piece rows averaged in float32, empty ones set to the float32 mean of ``matrix[mean_ids]``.

    ``matrix`` may be 1-D (an LM-head bias)."""
    squeeze = matrix.dim() == 1
    mat = matrix.detach().unsqueeze(1) if squeeze else matrix.detach()
    out = torch.empty((len(plan), *mat.shape[1:]), dtype=mat.dtype, device=mat.device)
    single = [(j, s[0]) for j, s in enumerate(plan.sources) if len(s) == 1]
    multi = [j for j, s in enumerate(plan.sources) if len(s) > 1]
    empty = [j for j, s in enumerate(plan.sources) if not s]
    dev = mat.device
    if single:
        dst = torch.tensor([j for j, _ in single], dtype=torch.long, device=dev)
        src = torch.tensor([i for _, i in single], dtype=torch.long, device=dev)
        out[dst] = mat[src]
    if empty:
        out[torch.tensor(empty, dtype=torch.long, device=dev)] = _mean_row(mat, np.asarray(mean_ids)).to(
            mat.dtype
        )
    chunk = 8192
    for start in range(0, len(multi), chunk):
        rows = multi[start : start + chunk]
        flat = [i for j in rows for i in plan.sources[j]]
        seg = [k for k, j in enumerate(rows) for _ in plan.sources[j]]
        counts = torch.tensor([len(plan.sources[j]) for j in rows], dtype=torch.float32, device=dev)
        gathered = mat[torch.tensor(flat, dtype=torch.long, device=dev)].float()
        sums = torch.zeros((len(rows), *mat.shape[1:]), dtype=torch.float32, device=dev)
        sums.index_add_(0, torch.tensor(seg, dtype=torch.long, device=dev), gathered)
        means = sums / counts.view(-1, *([1] * (mat.dim() - 1)))
        out[torch.tensor(rows, dtype=torch.long, device=dev)] = means.to(mat.dtype)
    return out.squeeze(1) if squeeze else out
