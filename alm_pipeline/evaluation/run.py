"""``alm-pipeline evaluate`` as a function: :class:`EvalConfig` says what to compute, :func:`run_evaluation`
computes it (bits per byte of a model and of a teacher cache, chunk agreement) as one JSON-ready dict, and
writes it to ``RUN_DIR/eval.json`` when asked (:data:`EVAL_FILE`, read back by :mod:`.plots`)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alm_pipeline.configs import option
from alm_pipeline.evaluation.agreement import chunk_agreement
from alm_pipeline.evaluation.bits_per_byte import (
    BITS_PER_BYTE_CONVENTION,
    HELDOUT,
    cache_bits_per_byte,
    iter_cache_texts,
    iter_data_texts,
    model_bits_per_byte,
)
from alm_pipeline.evaluation.models import EvalError, load_eval_model
from alm_pipeline.modeling import DTYPES

__all__ = ["EVAL_FILE", "EvalConfig", "run_evaluation", "write_json"]

EVAL_FILE = "eval.json"


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

    model: str | None = option(
        None,
        "Model to evaluate: a model folder, a short name (smollm2-135m), or a training run directory "
        "(then its final/ folder, else its latest complete checkpoint, else the only subfolder holding a "
        "config.json)",
    )
    data: str | None = option(
        None,
        "Texts for bits per byte: .jsonl/.json/.parquet file or folder, or `heldout` (the bundled "
        "held-out documents; the default when only --model is given)",
    )
    text_field: str = option("text", "Field holding the document text")
    id_field: str | None = option(None, "Field holding a unique document id (default: hash of the text)")
    max_docs: int | None = option(
        None, "Use only the first N documents of each source (data, cache, aligned set)"
    )
    cache: str | None = option(
        None, "Teacher cache: report the teacher's bits per byte read from it (no model needed)"
    )
    cache_texts: bool = option(
        False,
        "Also evaluate --model on the cached texts (the bytes the teacher saw) and report the gap "
        "to the teacher",
    )
    aligned: str | None = option(
        None,
        "Aligned set (from `alm-pipeline align`) whose student tokenizer is the model's: report "
        "chunk agreement, mean |C_S - C_T| and debiased mean |(C_S+σ_S) - (C_T+σ_T)|",
    )
    max_length: int = option(
        1024, "Model tokens per document, special tokens included (longer ones are truncated)"
    )
    batch_tokens: int = option(8192, "Padded tokens per forward pass")
    max_logit_elements: int = option(
        1 << 25, "fp32 logits alive at once (positions per LM-head slice = this / vocabulary size)"
    )
    dtype: str = option(
        "float32", "Model weights dtype: float32, bfloat16, float16 (log-softmax is always fp32)"
    )
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    run_dir: str | None = option(None, "Also write the JSON result to RUN_DIR/eval.json")

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise EvalError(f"max_length must be >= 2, got {self.max_length}")
        if self.batch_tokens < 1:
            raise EvalError(f"batch_tokens must be >= 1, got {self.batch_tokens}")
        if self.max_logit_elements < 1:
            raise EvalError(f"max_logit_elements must be >= 1, got {self.max_logit_elements}")
        if self.max_docs is not None and self.max_docs < 1:
            raise EvalError(f"max_docs must be >= 1, got {self.max_docs}")
        if self.dtype not in DTYPES:
            raise EvalError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.cache_texts and not self.cache:
            raise EvalError("cache_texts (--cache-texts) needs a teacher cache (--cache)")
        if (self.cache_texts or self.aligned or self.data) and not self.model:
            what = "data" if self.data else ("aligned" if self.aligned else "cache_texts")
            raise EvalError(f"{what} needs a model to evaluate (--model)")
        if not (self.model or self.cache):
            raise EvalError("nothing to evaluate: give a model (--model) and/or a teacher cache (--cache)")


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

    With ``run_dir`` the dict is also written to ``run_dir/eval.json``, under a lock on ``run_dir`` held for the
    whole evaluation (:mod:`alm_pipeline.locking`: one writer per folder).
    """
    if config.run_dir:
        from alm_pipeline.locking import output_lock

        with output_lock(config.run_dir, "evaluate"):
            result = run_evaluation(dataclasses.replace(config, run_dir=None), progress)
            out = write_json(Path(config.run_dir) / EVAL_FILE, result)
        (progress or (lambda msg: None))(f"wrote {out}")
        return result
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
    return result
