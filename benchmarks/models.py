"""Models the benchmarks build: random-weight Llamas with a real tokenizer (cheap forward, real vocabulary)."""

from __future__ import annotations

from pathlib import Path


def random_llama(
    tokenizer_dir: str,
    out: Path,
    *,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
) -> str:
    """Save a seeded random ``LlamaForCausalLM`` with the tokenizer of ``tokenizer_dir`` into ``out``; returns
    its path."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=2048,
    )
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return str(out)
