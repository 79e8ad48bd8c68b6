"""The student model of a distillation run: loading, tokenizer transfer (FVT), LoRA, truncation, saving.

Two ways to get a student (:class:`StudentConfig`):

* ``model=PATH``: an existing Hugging Face causal LM whose own tokenizer is the student tokenizer (also a
  folder written by :func:`save_student`; one holding a LoRA adapter is restored as a trainable LoRA model, so
  a run can resume from it).
* ``init_from=PATH, tokenizer=PATH_OR_"bytes"``: *tokenizer transfer* (reference §11). The source model keeps
  its transformer blocks; its input (and output) embedding matrices are rebuilt for the new vocabulary with
  FVT (Fast Vocabulary Transfer, Gee et al. 2022): the row of a new token is the mean of the source model's
  rows of the source tokenizer's tokenization of the new token's exact bytes. Everything goes through byte
  views (:mod:`alm_pipeline.pipeline.byteview`), never through decoded strings:

  - a new token whose bytes equal one source token's bytes gets exactly that row (a SentencePiece normal
    piece wins over its ``<0xNN>`` byte-fallback twin);
  - otherwise the bytes are tokenized by the source tokenizer as plain text (no special tokens, unicode
    normalizers removed). A SentencePiece *dummy prefix* (the tokenizer adds a space that is not in the
    bytes: ``"the"`` -> ``▁the``) is taken off the first piece again, so the pieces cover exactly the token's
    bytes; byte strings that are not valid UTF-8 on their own (a lone ``0xC3`` of the ``bytes`` tokenizer, a
    byte-fallback piece, half a character of a byte-level BPE token) and texts the tokenizer cannot
    reproduce are segmented greedily (longest match first) over the source vocabulary's byte strings;
  - only bytes that no source token covers fall back to the mean of the source's (non-special) rows;
  - special tokens map by role: BOS -> BOS, EOS -> EOS, PAD -> PAD (else EOS); then a source special token with
    the same content (``<|im_start|>`` to ``<|im_start|>``); else the mean row.

  The output embedding matrix (and an LM-head bias) is built the same way from the source's output matrix.
  With ``untie_embeddings`` (default: on for a ``bytes`` student, as in the paper's byte setup, else keep the
  source's tying) input and output matrices become separate parameters.

Then optionally ``num_layers`` keeps only the first N transformer blocks and ``lora_rank`` wraps the model with
``peft`` LoRA (r = α = 64 in the paper), with the embeddings trainable through ``modules_to_save`` for a
tokenizer transfer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alm_pipeline.cache.store import apply_umask
from alm_pipeline.modeling import DTYPES
from alm_pipeline.pipeline.byteview import ByteView, byte_view_from_hf
from alm_pipeline.trainer.fvt import FvtPlan
from alm_pipeline.trainer.model_surgery import (
    embeddings_tied,
    find_layers,
    is_peft_model,
    last_layer_parameters,
    set_special_ids,
    transfer_embeddings,
    transformer_layers,
    truncate_layers,
)

logger = logging.getLogger(__name__)

__all__ = [
    "StudentBundle",
    "StudentConfig",
    "StudentInfo",
    "last_layer_parameters",
    "load_student",
    "save_student",
    "transformer_layers",
    "truncate_layers",
]

BYTES_TOKENIZER = "bytes"
_ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_FILES = (_ADAPTER_CONFIG, "adapter_model.safetensors", "adapter_model.bin")


# ----------------------------------------------------------------------------------------------------------
# Configuration and results


@dataclass(frozen=True)
class StudentConfig:
    """What student to build.

    Attributes:
        model: an existing causal LM folder (or asset name, see :func:`alm_pipeline.assets.resolve_model`) that
            is used with its own tokenizer. Exclusive with ``init_from``.
        init_from: tokenizer transfer: the source (usually the teacher) model folder whose transformer blocks
            the student starts from. Needs ``tokenizer``.
        tokenizer: tokenizer transfer: the student tokenizer, a folder / asset name, or ``"bytes"`` (the
            built-in 256-byte tokenizer). Only together with ``init_from``.
        untie_embeddings: give the student separate input and output embedding matrices. ``None``: on for a
            ``bytes`` student (paper, Appendix C), otherwise the source's tying is kept. ``False`` keeps the
            source's tying (an untied source is never tied).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``; ``None`` keeps the checkpoint's dtype.
        num_layers: keep only the first N transformer blocks (small-machine experiments).
        lora_rank: wrap the model with LoRA adapters of this rank (needs ``peft``); ``None``: full fine-tuning.
        lora_alpha: LoRA α; ``None``: equal to the rank (the paper's r = α = 64).
        lora_dropout: dropout on the LoRA inputs.
        lora_target_modules: module names for ``peft`` (suffixes, as in ``LoraConfig``); ``None``: every
            linear (``nn.Linear`` / GPT-2 ``Conv1D``) layer inside the transformer blocks, i.e. attention + MLP.
        lora_train_embeddings: keep the input/output embeddings trainable under LoRA (``modules_to_save``).
            ``None``: on for a tokenizer transfer (the new embeddings must be learned), off otherwise.
    """

    model: str | None = None
    init_from: str | None = None
    tokenizer: str | None = None
    untie_embeddings: bool | None = None
    dtype: str | None = None
    num_layers: int | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] | None = None
    lora_train_embeddings: bool | None = None

    def __post_init__(self) -> None:
        if (self.model is None) == (self.init_from is None):
            raise ValueError(
                "StudentConfig needs exactly one of `model` (an existing student) or `init_from` (tokenizer "
                f"transfer from a source model); got model={self.model!r}, init_from={self.init_from!r}"
            )
        if self.init_from is not None and not self.tokenizer:
            raise ValueError(
                "tokenizer transfer (`init_from`) needs the student `tokenizer` (a folder or 'bytes')"
            )
        if self.model is not None and self.tokenizer is not None:
            raise ValueError(
                f"`tokenizer` is only for tokenizer transfer with `init_from`; the student model {self.model!r} "
                "uses its own tokenizer (to transfer it to another tokenizer, pass it as `init_from`)"
            )
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {sorted(DTYPES)} or None")
        if self.num_layers is not None and (
            not isinstance(self.num_layers, int) or isinstance(self.num_layers, bool) or self.num_layers < 1
        ):
            raise ValueError(f"num_layers must be an integer >= 1, got {self.num_layers!r}")
        if self.lora_rank is not None and (
            not isinstance(self.lora_rank, int) or isinstance(self.lora_rank, bool) or self.lora_rank < 1
        ):
            raise ValueError(f"lora_rank must be an integer >= 1, got {self.lora_rank!r}")
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError(f"lora_alpha must be a finite number > 0, got {self.lora_alpha!r}")
        if not (0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.lora_target_modules is not None:
            if isinstance(self.lora_target_modules, str) or not self.lora_target_modules:
                raise ValueError("lora_target_modules must be a non-empty tuple of module names")
            object.__setattr__(self, "lora_target_modules", tuple(self.lora_target_modules))

    @property
    def is_transfer(self) -> bool:
        return self.init_from is not None


@dataclass
class StudentInfo:
    """How the student was built (for logs and run metadata: ``dataclasses.asdict`` is JSON-ready)."""

    mode: str  # "model" | "transfer"
    source: str  # the model folder (mode "model") or the source model (mode "transfer")
    tokenizer: str
    vocab_size: int
    dtype: str
    tied_embeddings: bool
    num_layers: int
    truncated_from: int | None = None
    # tokenizer transfer only: FVT_KINDS -> count, and a few token ids that fell back to the mean row
    fvt: dict[str, int] = field(default_factory=dict)
    fvt_fallback_examples: list[int] = field(default_factory=list)
    lora: dict[str, Any] | None = None
    trainable_parameters: int = 0
    total_parameters: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class StudentBundle:
    """A loaded student: the model (a ``peft`` model under LoRA), its HF tokenizer, its byte view, and how it
    was built."""

    model: nn.Module
    tokenizer: Any  # transformers PreTrainedTokenizerFast / TokenizersBackend
    view: ByteView
    info: StudentInfo

    @property
    def is_lora(self) -> bool:
        return is_peft_model(self.model)


# ----------------------------------------------------------------------------------------------------------
# LoRA


def _import_peft():
    from alm_pipeline.optional import require

    peft = require("peft", "LoRA students (--lora-rank; train without it for full fine-tuning)")
    if "ensure_weight_tying" not in {f.name for f in dataclasses.fields(peft.LoraConfig)}:
        raise ImportError(
            f"peft {peft.__version__} is too old for LoRA students (no `ensure_weight_tying`): "
            "`pip install -U 'peft>=0.21'`"
        )
    return peft


def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def _default_lora_targets(model: nn.Module) -> str:
    """A regex (peft ``fullmatch``) naming every linear layer inside the transformer blocks."""
    _, _, layers = find_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    linear = _linear_types()
    suffixes: set[str] = set()
    for block in layers:
        suffixes |= {name for name, m in block.named_modules() if name and isinstance(m, linear)}
    if not suffixes:
        raise ValueError(f"no linear layers found in the transformer blocks of {type(model).__name__}")
    alternatives = "|".join(re.escape(s) for s in sorted(suffixes))
    return rf"{re.escape(prefix)}\.\d+\.(?:{alternatives})"


def _module_name(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def _apply_lora(model: nn.Module, config: StudentConfig, train_embeddings: bool) -> nn.Module:
    peft = _import_peft()
    targets: Any = (
        list(config.lora_target_modules) if config.lora_target_modules else _default_lora_targets(model)
    )
    modules_to_save = None
    tied = embeddings_tied(model)
    if train_embeddings:
        names = [_module_name(model, model.get_input_embeddings())]
        head = model.get_output_embeddings()
        if head is not None:
            names.append(_module_name(model, head))
        if tied and not any(n.rsplit(".", 1)[-1] in ("embed_tokens", "lm_head") for n in names):
            raise ValueError(
                f"cannot keep the tied embeddings {names} of {type(model).__name__} trainable under LoRA "
                "(peft only ties modules named embed_tokens / lm_head): set untie_embeddings=True"
            )
        modules_to_save = list(dict.fromkeys(names))
    lora_config = peft.LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha if config.lora_alpha is not None else config.lora_rank,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        modules_to_save=modules_to_save,
        ensure_weight_tying=bool(tied and train_embeddings),
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # GPT-2's Conv1D layers: peft switches fan_in_fan_out on by itself and says so
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        return peft.get_peft_model(model, lora_config)


# ----------------------------------------------------------------------------------------------------------
# Loading


def _resolve(name_or_path: str) -> str:
    from alm_pipeline.assets import resolve_model

    return resolve_model(name_or_path)


def _load_tokenizer(spec: str):
    if spec == BYTES_TOKENIZER:
        from alm_pipeline.pipeline.byte_tokenizer import build_byte_tokenizer

        return build_byte_tokenizer(), BYTES_TOKENIZER
    from transformers import AutoTokenizer

    path = _resolve(spec)
    return AutoTokenizer.from_pretrained(path), path


def _has_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(path, _ADAPTER_CONFIG))


@contextlib.contextmanager
def _without_adapter_files(path: str) -> Iterator[str]:
    """A folder showing ``path``'s files except the adapter, so ``from_pretrained`` loads the bare base model
    (transformers applies an adapter found next to a model by itself)."""
    with tempfile.TemporaryDirectory(prefix="alm-student-base-") as tmp:
        for entry in os.listdir(path):
            if entry not in _ADAPTER_FILES:
                os.symlink(os.path.abspath(os.path.join(path, entry)), os.path.join(tmp, entry))
        yield tmp


def _load_causal_lm(path: str, dtype: str | None):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": DTYPES[dtype] if dtype else "auto"}
    if _has_adapter(path):
        with _without_adapter_files(path) as base_dir:
            model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
        model.config._name_or_path = path
        return model
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def _dtype_name(model: nn.Module) -> str:
    return str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")


def load_student(config: StudentConfig) -> StudentBundle:
    """Build the student described by ``config`` (see :class:`StudentConfig` and the module docstring).

    Order: load -> (tokenizer transfer) -> untie -> truncate -> special ids -> LoRA. A ``model`` folder that
    holds a LoRA adapter (written by :func:`save_student` without merging) comes back as a trainable ``peft``
    model with that adapter.
    """
    truncated_from = None
    plan: FvtPlan | None = None
    if config.is_transfer:
        source_path = _resolve(config.init_from)
        if _has_adapter(source_path):
            raise ValueError(
                f"the source model {source_path} holds a LoRA adapter: save it with merge_lora=True first"
            )
        from transformers import AutoTokenizer

        model = _load_causal_lm(source_path, config.dtype)
        source_view = byte_view_from_hf(AutoTokenizer.from_pretrained(source_path), name=source_path)
        tokenizer, tok_name = _load_tokenizer(config.tokenizer)
        view = byte_view_from_hf(tokenizer, name=tok_name)
        untie = config.untie_embeddings
        if untie is None:
            untie = tok_name == BYTES_TOKENIZER
        plan = transfer_embeddings(model, source_view, view, untie=untie)
        train_embeddings = True if config.lora_train_embeddings is None else config.lora_train_embeddings
        mode = "transfer"
    else:
        source_path = _resolve(config.model)
        from transformers import AutoTokenizer

        model = _load_causal_lm(source_path, config.dtype)
        tokenizer, tok_name = AutoTokenizer.from_pretrained(source_path), source_path
        view = byte_view_from_hf(tokenizer, name=tok_name)
        rows = model.get_input_embeddings().weight.shape[0]
        if view.vocab_size > rows:
            raise ValueError(
                f"the tokenizer of {source_path} has {view.vocab_size} tokens but the model only {rows} "
                "embedding rows"
            )
        if config.untie_embeddings:
            untie(model)
        train_embeddings = bool(config.lora_train_embeddings)
        mode = "model"

    if config.num_layers is not None:
        before = truncate_layers(model, config.num_layers)
        truncated_from = before if before != config.num_layers else None
    set_special_ids(model, view)
    tied = embeddings_tied(model)
    num_layers = len(find_layers(model)[2])
    dtype = _dtype_name(model)

    lora_info = None
    if mode == "model" and _has_adapter(source_path):
        if config.lora_rank is not None:
            raise ValueError(
                f"{source_path} already holds a LoRA adapter; leave lora_rank unset to continue training it"
            )
        peft = _import_peft()
        model = peft.PeftModel.from_pretrained(model, source_path, is_trainable=True)
    elif config.lora_rank is not None:
        model = _apply_lora(model, config, train_embeddings)
    if is_peft_model(model):
        lcfg = model.peft_config["default"]
        lora_info = {
            "rank": int(lcfg.r),
            "alpha": float(lcfg.lora_alpha),
            "dropout": float(lcfg.lora_dropout),
            "target_modules": lcfg.target_modules
            if isinstance(lcfg.target_modules, str)
            else sorted(lcfg.target_modules),
            "modules_to_save": sorted(lcfg.modules_to_save or []),
        }

    params = {id(p): p for p in model.parameters()}.values()
    info = StudentInfo(
        mode=mode,
        source=source_path,
        tokenizer=tok_name,
        vocab_size=view.vocab_size,
        dtype=dtype,
        tied_embeddings=tied,
        num_layers=num_layers,
        truncated_from=truncated_from,
        fvt=plan.counts() if plan is not None else {},
        fvt_fallback_examples=[j for j, k in enumerate(plan.kinds) if k == "fallback"][:20] if plan else [],
        lora=lora_info,
        trainable_parameters=sum(p.numel() for p in params if p.requires_grad),
        total_parameters=sum(p.numel() for p in params),
    )
    if plan is not None:
        counts = plan.counts()
        logger.info(
            "tokenizer transfer %s -> %s: %s",
            source_path,
            tok_name,
            ", ".join(f"{k} {v}" for k, v in counts.items()),
        )
        if counts["fallback"]:
            logger.warning(
                "%d student tokens are covered by no source token and start from the mean embedding (e.g. ids %s)",
                counts["fallback"],
                info.fvt_fallback_examples[:5],
            )
    return StudentBundle(model=model, tokenizer=tokenizer, view=view, info=info)


# ----------------------------------------------------------------------------------------------------------
# Saving


def _lora_state_dict(peft_model: nn.Module, merge: bool) -> dict[str, torch.Tensor]:
    """The base model's state dict with plain transformers names: LoRA deltas added out of place (``merge``)
    or left out, ``modules_to_save`` copies (``merge``) or their original modules."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    base = peft_model.get_base_model()
    adapter = peft_model.active_adapter
    if not isinstance(adapter, str):
        raise ValueError(f"expected one active LoRA adapter, got {adapter!r}")
    prefixes: list[str] = []
    state: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            chosen = module.modules_to_save[adapter] if merge else module.original_module
            for key, value in chosen.state_dict().items():
                state[f"{name}.{key}"] = value
            prefixes.append(name)
        elif isinstance(module, LoraLayer):
            base_layer = module.get_base_layer()
            for key, value in base_layer.state_dict().items():
                if merge and key == "weight" and adapter in module.lora_A:
                    delta = module.get_delta_weight(adapter)
                    value = (value.float() + delta.float()).to(value.dtype)
                state[f"{name}.{key}"] = value
            prefixes.append(name)
    for key, value in base.state_dict().items():
        if not any(key.startswith(p + ".") for p in prefixes):
            state[key] = value
    return state


def _modules_to_save_for_reload(base: nn.Module, lcfg: Any) -> list[str] | None:
    """``modules_to_save`` as written to ``adapter_config.json``.

    Under ``ensure_weight_tying`` peft keeps only the input embedding in ``modules_to_save`` (the tied LM head
    follows it), but when loading it recognises the tying only if one of the listed names ends in
    ``embed_tokens`` or ``lm_head``: GPT-2's ``transformer.wte`` alone would load with an untrained, untied
    head. Listing the head as well lets peft re-derive the tie."""
    names = list(lcfg.modules_to_save) if lcfg.modules_to_save else None
    if names and getattr(lcfg, "ensure_weight_tying", False):
        head = base.get_output_embeddings()
        head_name = _module_name(base, head) if head is not None else None
        if head_name is not None and head_name not in names:
            names.append(head_name)
    return names


def save_student(bundle: StudentBundle, path: str | os.PathLike[str], merge_lora: bool = False) -> Path:
    """Write the student as a Hugging Face folder (model, generation config, tokenizer) to ``path``.

    Without LoRA: a plain ``save_pretrained`` folder. With LoRA and ``merge_lora=True``: the merged model as a
    plain folder (adapters and trained embeddings folded in, out of place: ``bundle.model`` keeps its
    adapters), loadable anywhere (vLLM included). With LoRA and ``merge_lora=False``: the base model (new
    embeddings, truncated blocks) plus the adapter (``adapter_config.json``, ``adapter_model.safetensors``,
    trained embeddings included) in the same folder: ``AutoModelForCausalLM.from_pretrained`` applies the
    adapter when ``peft`` is installed, and :func:`load_student` restores a trainable LoRA model from it.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for stale in _ADAPTER_FILES:  # an earlier unmerged save into the same folder
        (out / stale).unlink(missing_ok=True)
    model = bundle.model
    if is_peft_model(model):
        base = model.get_base_model()
        base.save_pretrained(out, state_dict=_lora_state_dict(model, merge=merge_lora))
        if not merge_lora:
            lcfg = model.peft_config[model.active_adapter]
            previous = (lcfg.base_model_name_or_path, lcfg.modules_to_save)
            lcfg.base_model_name_or_path = str(out.resolve())
            lcfg.modules_to_save = _modules_to_save_for_reload(base, lcfg)
            try:
                model.save_pretrained(out, save_embedding_layers=False)
            finally:
                lcfg.base_model_name_or_path, lcfg.modules_to_save = previous
            # save_pretrained may place files in a per-adapter subfolder for non-default names; flatten
            sub = out / model.active_adapter
            if model.active_adapter != "default" and (sub / _ADAPTER_CONFIG).is_file():
                for f in sub.iterdir():
                    shutil.move(str(f), out / f.name)
                sub.rmdir()
        # peft wrappers write their own model card; drop it unless it predates this save
        card = out / "README.md"
        if card.is_file() and "peft" in card.read_text(encoding="utf-8", errors="ignore").lower():
            card.unlink()
    else:
        model.save_pretrained(out)
    bundle.tokenizer.save_pretrained(out)
    (out / "student_info.json").write_text(
        json.dumps(bundle.info.to_dict(), indent=2) + "\n", encoding="utf-8"
    )
    apply_umask(out)  # safetensors writes its files 0600; outputs get the user's umask
    return out
