"""The model side of evaluation: ``--model`` resolution (:func:`resolve_model_dir`), loading
(:func:`load_eval_model`) and :class:`EvalModel`, a causal LM ready for memory-bounded scoring; plus the
length-sorted batching that every evaluation uses.

``--model`` may be a model folder, a short asset name, or a training run directory.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from alm_pipeline.modeling import (
    DTYPES,
    SlicedHead,
    head_rows,
    linear_head,
    model_body,
    self_check_tolerance,
    sliced_head_error,
)
from alm_pipeline.pipeline.byteview import ByteView, TokenizerMismatchError, byte_view_from_hf
from alm_pipeline.trainer.checkpoint import CHECKPOINTS_DIR, FINAL_DIR, list_checkpoints
from alm_pipeline.trainer.token_stats import StudentTokenStats, student_token_stats

__all__ = [
    "EvalError",
    "EvalModel",
    "load_eval_model",
    "resolve_model_dir",
]


class EvalError(ValueError):
    """Evaluation cannot proceed; the message names the model, file or document."""


# ----------------------------------------------------------------------------------------------------------
# resolving and loading the model
# ----------------------------------------------------------------------------------------------------------


def resolve_model_dir(spec: str | os.PathLike[str]) -> tuple[str, str]:
    """``--model`` → ``(model folder, how it was chosen)``.

    1. a short asset name (``smollm2-135m``) → its installed folder (:func:`alm_pipeline.assets.resolve_model`);
    2. a folder with a ``config.json`` → that folder;
    3. a training run directory (no ``config.json``): its ``final/`` folder if that holds a ``config.json``;
       else its latest complete checkpoint (:func:`alm_pipeline.trainer.checkpoint.list_checkpoints`) that holds
       a ``config.json`` (the run's ``checkpoints/`` folder itself may be given too); else the only subfolder
       (up to two levels down) with a ``config.json``. Several candidates without a rule to choose between them
       are an error that lists them;
    4. anything else that does not exist is returned unchanged (a hub name; loading it needs the network).
    """
    from alm_pipeline.assets import resolve_model
    from alm_pipeline.storage import is_uri, location

    if is_uri(spec) and not location(spec).is_local:
        return _remote_model_dir(str(spec))
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
    if (path / FINAL_DIR / "config.json").is_file():
        return str(path / FINAL_DIR), f"{FINAL_DIR}/ of the run directory"
    run = path.parent if path.name == CHECKPOINTS_DIR else path
    checkpoints = [(step, ckpt) for step, ckpt in list_checkpoints(run) if (ckpt / "config.json").is_file()]
    if checkpoints:
        step, latest = checkpoints[-1]
        return str(latest), f"latest checkpoint of the run directory (step {step})"
    found = sorted(
        {p.parent for p in path.glob("*/config.json")} | {p.parent for p in path.glob("*/*/config.json")}
    )
    if len(found) == 1:
        return str(found[0]), "the only model folder inside the directory"
    if not found:
        raise EvalError(
            f"{path}: no model here — no config.json in the folder, no final/ and no complete checkpoint with one"
        )
    listing = ", ".join(str(p.relative_to(path)) for p in found[:10])
    raise EvalError(f"{path}: several model folders inside ({listing}); pass the one to evaluate")


def _remote_model_dir(uri: str) -> tuple[str, str]:
    """A model folder on object storage (``s3://``, ``gs://``) by the rules of :func:`resolve_model_dir` (the folder,
    its ``final/``, its newest checkpoint with a ``config.json``), downloaded to a local copy that Hugging Face
    can load (:func:`alm_pipeline.storage.local_copy`, reused while unchanged)."""
    from alm_pipeline.storage import StorageError, local_copy, location

    loc = location(uri)
    try:
        if (loc / "config.json").is_file():
            return str(local_copy(loc)), "model folder (downloaded)"
        if (loc / FINAL_DIR / "config.json").is_file():
            return str(local_copy(loc / FINAL_DIR)), f"{FINAL_DIR}/ of the run directory (downloaded)"
        run = loc.parent if loc.name == CHECKPOINTS_DIR else loc
        steps = []
        for info in (run / CHECKPOINTS_DIR).list():
            match = re.fullmatch(r"checkpoint-(\d+)", info.base_name)
            if match and (run / CHECKPOINTS_DIR / info.base_name / "config.json").is_file():
                steps.append((int(match.group(1)), info.base_name))
    except StorageError as err:
        raise EvalError(str(err)) from None
    if not steps:
        raise EvalError(f"{uri}: no model here — no config.json, no final/ and no checkpoint with one")
    step, name = max(steps)
    return (
        str(local_copy(run / CHECKPOINTS_DIR / name)),
        f"latest checkpoint of the run directory (step {step}, downloaded)",
    )


class EvalModel:
    """A causal LM ready for scoring: its tokenizer's byte view and a memory-bounded :meth:`token_stats`.

    Wraps an in-memory model (e.g. the student during training: pass the unwrapped module) or one loaded by
    :func:`load_eval_model`. Scoring runs under ``torch.inference_mode`` with the model temporarily in eval
    mode; parameters are read live (nothing is copied), so a model that keeps training stays in sync.

    The LM head is applied to the final hidden states in slices of positions (``lm_head == "sliced"``, with the
    LM-head rules of :mod:`alm_pipeline.modeling`) when that reproduces the model's own log-softmax
    (:func:`~alm_pipeline.modeling.sliced_head_error`, checked once, here); otherwise (logit post-processing
    those rules do not know, an adapter on the head) the model's full logits are used (``"full_logits"``:
    correct, but ``[batch, length, vocabulary]`` is materialised).
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
        self.max_positions = _max_positions(getattr(config, "get_text_config", lambda: config)())
        self.vocab = view.vocab_size
        self.boundary_mask = torch.as_tensor(view.boundary_mask, device=self.device)
        rows = getattr(model.get_output_embeddings(), "weight", None)
        if rows is not None:
            try:
                head_rows(rows, None, self.vocab)
            except ValueError as err:
                raise EvalError(f"{self.path}: {err}") from None
        self.body = model_body(model)
        self.lm_head = "full_logits"
        if self.body is not None and linear_head(model) is not None:
            with self._scoring():
                if self._sliced_path_matches():
                    self.lm_head = "sliced"
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
            if self.lm_head == "sliced":
                head = SlicedHead.of_model(self.model, self.vocab)
                hidden = self.body(input_ids=ids, attention_mask=mask).last_hidden_state
                return student_token_stats(
                    ids,
                    self.boundary_mask,
                    hidden_states=hidden,
                    lm_head_weight=head.weight,
                    lm_head_bias=head.bias,
                    logit_softcap=head.softcap,
                    **common,
                )
            # the model's own logits already include any soft-capping / scaling
            logits = self.model(input_ids=ids, attention_mask=mask).logits
            return student_token_stats(ids, self.boundary_mask, logits=logits, **common)

    def continuation_logprobs(
        self, prefix: Sequence[int], continuations: Sequence[Sequence[int]], pad_id: int = 0
    ) -> list[torch.Tensor] | None:
        """``log p`` (fp32) of every token of each continuation after a shared ``prefix`` of token ids: the
        prefix runs through the body once and its KV cache serves all continuations (one batch). Returns one
        ``[len(continuation)]`` tensor per continuation, or None where this path is not available (no sliced LM
        head, or a model body that returns no cache it can repeat). Same numbers as :meth:`token_stats` of
        ``prefix + continuation`` up to float rounding; callers check that once per model."""
        if self.lm_head != "sliced" or not prefix or not continuations or min(map(len, continuations)) < 1:
            return None
        from alm_pipeline.modeling import pad_batch

        with self._scoring():
            context = torch.as_tensor(list(prefix), dtype=torch.long, device=self.device)[None]
            first = self.body(input_ids=context, use_cache=True)
            cache = getattr(first, "past_key_values", None)
            if cache is None or not hasattr(cache, "batch_repeat_interleave"):
                return None
            k = len(continuations)
            cache.batch_repeat_interleave(k)
            ids, mask = pad_batch([list(c) for c in continuations], pad_id)
            ids, mask = ids.to(self.device), mask.to(self.device)
            ones = torch.ones(k, 1, dtype=mask.dtype, device=self.device)
            full_mask = torch.cat([ones.expand(k, len(prefix)), mask], dim=1)
            hidden = self.body(
                input_ids=ids, attention_mask=full_mask, past_key_values=cache, use_cache=False
            ).last_hidden_state
            # row i: the prefix's last position (it predicts the first continuation token), then the continuation
            rows_ids = torch.cat([context[:, -1:].expand(k, 1), ids], dim=1)
            rows_hidden = torch.cat([first.last_hidden_state[:, -1:].expand(k, 1, -1), hidden], dim=1)
            head = SlicedHead.of_model(self.model, self.vocab)
            stats = student_token_stats(
                rows_ids,
                self.boundary_mask,
                hidden_states=rows_hidden,
                lm_head_weight=head.weight,
                lm_head_bias=head.bias,
                logit_softcap=head.softcap,
                attention_mask=torch.cat([ones, mask], dim=1),
                slice_size=self.slice_size,
                checkpoint_slices=False,
            )
            return [stats.token_logprob[i, 1 : 1 + len(c)] for i, c in enumerate(continuations)]

    def _sliced_path_matches(self) -> bool:
        """Whether the sliced LM-head path reproduces the model's own log-softmax."""
        try:
            diff = sliced_head_error(self.model, self.body, SlicedHead.of_model(self.model, self.vocab))
        except Exception:
            return False
        return diff <= self_check_tolerance(self.dtype)


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

    if dtype not in DTYPES:
        raise EvalError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
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
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
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
