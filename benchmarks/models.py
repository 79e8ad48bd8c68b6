"""Models the benchmarks build: seeded random-weight Llamas with a real tokenizer (cheap forward, real vocabulary)."""

from __future__ import annotations

from pathlib import Path

# name: (hidden size, MLP size, layers, attention heads)
LLAMA_SIZES = {
    "tiny": (64, 128, 1, 2),  # bench_align: the log-prob values do not change the alignment's cost
    "small": (256, 768, 4, 4),  # bench_teacher_cache: a cheap forward
}


def random_llama(tokenizer_dir: str, out: Path, size: str | tuple[int, int, int, int]) -> str:
    """Save a random ``LlamaForCausalLM`` (seed 0) of ``size`` — a name in :data:`LLAMA_SIZES` or a shape
    (hidden size, MLP size, layers, attention heads) — with the tokenizer of ``tokenizer_dir`` (its BOS/EOS ids
    in the config) into ``out``; returns its path."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    hidden, mlp, layers, heads = LLAMA_SIZES[size] if isinstance(size, str) else size
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,  # (the default) forward_params counts the LM head on its own
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return str(out)
