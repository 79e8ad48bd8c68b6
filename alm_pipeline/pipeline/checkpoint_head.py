"""An LM head read from a causal LM checkpoint's weight files alone, without loading the model: what the
``vllm`` teacher engine applies to the final hidden states vLLM returns (vLLM does not build its own LM head in
pooling mode).

:func:`load_lm_head` finds the head's tensor name on the transformers model built on the meta device (its output
embeddings, or, for tied models, its input embeddings), reads only that tensor (and its bias) from the
safetensors or PyTorch ``.bin`` files, and the logit rules from the config (:class:`~alm_pipeline.modeling.LogitRules`).
With no model to compare against (:func:`~alm_pipeline.modeling.sliced_head_error`), a config field that may
change the logits in a way those rules do not cover is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from alm_pipeline.modeling import LogitRules, unknown_logit_field

__all__ = ["LMHead", "load_lm_head", "model_files"]


@dataclass
class LMHead:
    """An LM head as stored in a checkpoint (all rows, no scale folded in) and the model's logit rules."""

    weight: torch.Tensor  # [rows, hidden]
    bias: torch.Tensor | None
    rules: LogitRules
    source: str  # checkpoint tensor name


def model_files(model: str) -> Path:
    """The local folder of a model: ``model`` itself, or the files of a hub name (the ones vLLM downloaded)."""
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download  # the files vLLM itself downloaded for a hub name

    return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.bin"]))


def _checkpoint_index(root: Path) -> dict[str, Path]:
    """Tensor name → file, for safetensors (sharded or not) or, failing that, PyTorch .bin checkpoints."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = root / index_name
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: root / file for name, file in weight_map.items()}
    files = sorted(root.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        out = {}
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                out.update(dict.fromkeys(fh.keys(), f))
        return out
    out = {}
    for f in sorted(root.glob("*.bin")):
        out.update(dict.fromkeys(torch.load(f, map_location="meta", weights_only=True, mmap=True), f))
    return out


def _read_tensor(file: Path, name: str) -> torch.Tensor:
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as fh:
            return fh.get_tensor(name)
    return torch.load(file, map_location="cpu", weights_only=True, mmap=True)[name].clone()


def _logit_rules(config) -> LogitRules:
    """The config's logit rules; a logit-changing field they do not cover is refused."""
    unknown = unknown_logit_field(config)
    if unknown is not None:
        key, value = unknown
        raise ValueError(
            f"model config field {key}={value!r} may change the logits, and the vllm engine does "
            "not know how to apply it to its own LM head; use --engine hf for this model"
        )
    return LogitRules.of(config)


def load_lm_head(model: str, trust_remote_code: bool = False) -> LMHead:
    """The LM head of a causal LM checkpoint, read from the weight files alone (no full model load).

    The parameter names come from the transformers model built on the meta device (no memory): its output
    embeddings, or — tied models — its input embeddings.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    root = model_files(model)
    config = AutoConfig.from_pretrained(str(root), trust_remote_code=trust_remote_code)
    rules = _logit_rules(config)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    out_emb, in_emb = meta.get_output_embeddings(), meta.get_input_embeddings()
    if out_emb is None:
        raise ValueError(f"{model}: the model has no output embeddings (LM head)")
    names = {id(m): n for n, m in meta.named_modules()}
    tied = in_emb is not None and out_emb.weight is in_emb.weight
    candidates = [f"{names[id(out_emb)]}.weight"]
    if in_emb is not None:
        candidates.append(f"{names[id(in_emb)]}.weight")
    if not tied:
        candidates = candidates[:1]
    index = _checkpoint_index(root)
    if not index:
        raise ValueError(f"{root}: no safetensors or .bin weight files found")
    found = next((c for c in candidates if c in index), None)
    if found is None:  # checkpoints saved with another prefix (e.g. GPT-2's "wte.weight")
        tails = {".".join(c.split(".")[-2:]) for c in candidates}
        matches = [k for k in index if ".".join(k.split(".")[-2:]) in tails]
        if len(matches) != 1:
            raise ValueError(
                f"{model}: cannot find the LM head among the checkpoint tensors (looked for {candidates})"
            )
        found = matches[0]
    weight = _read_tensor(index[found], found)
    bias = None
    if getattr(out_emb, "bias", None) is not None:
        bias_name = found.rsplit(".", 1)[0] + ".bias"
        if bias_name in index:
            bias = _read_tensor(index[bias_name], bias_name)
    del meta
    return LMHead(weight=weight, bias=bias, rules=rules, source=found)
