"""Model surgery on a Hugging Face causal LM (plain or ``peft``-wrapped): finding and truncating its transformer
blocks, (un)tying and rebuilding its embeddings for a new vocabulary (FVT), and the parameters GradMag uses."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from alm_pipeline.pipeline.byteview import ByteView
from alm_pipeline.trainer.fvt import FvtPlan, apply_fvt, fvt_plan

logger = logging.getLogger(__name__)

__all__ = [
    "embeddings_tied",
    "find_layers",
    "is_peft_model",
    "last_layer_parameters",
    "set_special_ids",
    "transfer_embeddings",
    "transformer_layers",
    "truncate_layers",
    "untie",
]

# Where decoder-only models keep their list of transformer blocks (tried in order before a generic search).
_LAYER_PATHS = (
    "model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.blocks",
    "model.language_model.layers",
    "language_model.model.layers",
)


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``peft`` model (with the LoRA layers injected), else ``model``."""
    return model.get_base_model() if is_peft_model(model) else model


def _num_layers_from_config(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "num_hidden_layers", None)
    return int(value) if isinstance(value, int) else None


def find_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent module, attribute name, ModuleList) of the transformer blocks."""
    for dotted in _LAYER_PATHS:
        parent_path, _, attr = dotted.rpartition(".")
        try:
            parent = model.get_submodule(parent_path)
        except AttributeError:
            continue
        layers = getattr(parent, attr, None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return parent, attr, layers
    # generic: the ModuleList of config.num_hidden_layers entries holding the most parameters
    expected = _num_layers_from_config(model)
    best: tuple[int, str] | None = None
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > 0
            and (expected is None or len(module) == expected)
        ):
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name)
    if best is None:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")
    parent_path, _, attr = best[1].rpartition(".")
    parent = model.get_submodule(parent_path)
    return parent, attr, getattr(parent, attr)


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks (``model.model.layers`` for Llama-like models, ``transformer.h`` for
    GPT-2, ...), looking through a ``peft`` wrapper."""
    return find_layers(_unwrap(model))[2]


def truncate_layers(model: nn.Module, num_layers: int) -> int:
    """Keep only the first ``num_layers`` transformer blocks (in place); returns the former number of blocks.

    Updates ``num_hidden_layers`` (``n_layer`` for GPT-2, through its attribute map) and per-layer config lists
    such as ``layer_types`` so that caches and saved configs agree with the blocks."""
    if is_peft_model(model):
        raise ValueError("truncate the model before wrapping it with LoRA")
    parent, attr, layers = find_layers(model)
    before = len(layers)
    if not 1 <= num_layers <= before:
        raise ValueError(f"num_layers={num_layers} is not in [1, {before}] (the model has {before} blocks)")
    if num_layers == before:
        return before
    setattr(parent, attr, nn.ModuleList(list(layers)[:num_layers]))
    configs = [model.config]
    if hasattr(model.config, "get_text_config") and model.config.get_text_config() is not model.config:
        configs.append(model.config.get_text_config())
    for config in configs:
        if hasattr(config, "num_hidden_layers"):
            config.num_hidden_layers = num_layers
        for key in ("layer_types", "block_types"):
            value = getattr(config, key, None)
            if isinstance(value, list | tuple) and len(value) == before:
                setattr(config, key, list(value)[:num_layers])
    return before


def embeddings_tied(model: nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def _set_tying_config(model: nn.Module, tied: bool) -> None:
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = tied
    # what save_pretrained / tie_weights consult: recompute after the config change
    model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)


def untie(model: nn.Module) -> None:
    if embeddings_tied(model):
        head = model.get_output_embeddings()
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    _set_tying_config(model, False)


def _output_linear(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight") or head.weight.dim() != 2:
        raise ValueError(f"{type(model).__name__} has no output embedding matrix (LM head) to transfer")
    return head


def _set_vocab_size(model: nn.Module, vocab_size: int) -> None:
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.vocab_size = vocab_size
    for module in (model, getattr(model, "base_model", None)):
        if module is not None and hasattr(module, "vocab_size"):
            module.vocab_size = vocab_size


def set_special_ids(model: nn.Module, view: ByteView) -> None:
    ids = {"bos_token_id": view.bos_id, "eos_token_id": view.eos_id, "pad_token_id": view.pad_id}
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        for key, value in ids.items():
            setattr(config, key, value)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.bos_token_id = view.bos_id
        gen.eos_token_id = view.eos_id
        gen.pad_token_id = view.pad_id if view.pad_id is not None else view.eos_id


def transfer_embeddings(
    model: nn.Module, source_view: ByteView, target_view: ByteView, untie: bool
) -> FvtPlan:
    """Rebuild the input/output embeddings of ``model`` (in place) for ``target_view``'s vocabulary."""
    emb = model.get_input_embeddings()
    if not isinstance(emb, nn.Embedding):
        raise ValueError(
            f"{type(model).__name__}'s input embeddings are {type(emb).__name__}, not nn.Embedding"
        )
    head = _output_linear(model)
    src_tied = embeddings_tied(model)
    rows = emb.weight.shape[0]
    if source_view.vocab_size > rows:
        raise ValueError(
            f"the source tokenizer has {source_view.vocab_size} tokens but the source model only "
            f"{rows} embedding rows: they do not belong together"
        )
    mean_ids = np.flatnonzero(~source_view.is_special[:rows])
    plan = fvt_plan(source_view, target_view)
    tied = src_tied and not untie
    with torch.no_grad():
        new_in = apply_fvt(plan, emb.weight, mean_ids)
        new_out = None if tied else apply_fvt(plan, head.weight, mean_ids)
        bias = getattr(head, "bias", None)
        new_bias = apply_fvt(plan, bias, mean_ids) if isinstance(bias, torch.Tensor) else None
    vocab = target_view.vocab_size
    emb.weight = nn.Parameter(new_in, requires_grad=emb.weight.requires_grad)
    emb.num_embeddings = vocab
    if emb.padding_idx is not None:
        emb.padding_idx = target_view.pad_id
    if tied:
        head.weight = emb.weight
    else:
        head.weight = nn.Parameter(new_out, requires_grad=head.weight.requires_grad)
    if new_bias is not None:
        head.bias = nn.Parameter(new_bias, requires_grad=head.bias.requires_grad)
    if hasattr(head, "out_features"):
        head.out_features = vocab
    _set_vocab_size(model, vocab)
    _set_tying_config(model, tied)
    if tied:
        model.tie_weights()
    return plan


# ----------------------------------------------------------------------------------------------------------
# GradMag support


def last_layer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters of the last transformer block (its LoRA adapters under LoRA), for GradMag.

    Raises ``ValueError`` if that block has none (e.g. LoRA targets that skip it)."""
    layers = transformer_layers(model)
    params = [p for p in layers[-1].parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "the last transformer block has no trainable parameters (GradMag needs some): check the LoRA "
            "target modules"
        )
    return params
