"""Tiny real tokenizers and models for tests, built offline.

Tokenizers are trained with the `tokenizers` library on a fixed mixed-script text; models are random-weight
transformers models built from a config (head_dim 32 so that vLLM's CPU attention accepts them too).
Everything is written with ``save_pretrained`` to a directory and loaded back through the same code paths
users hit (``AutoTokenizer`` / ``AutoModelForCausalLM``).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "Numbers 12345 and 67890; punctuation!? (brackets) [square] {curly} <angle> #hash @at\n",
    "\tIndented line with tabs\tand  double  spaces.\r\nWindows line ending.\n",
    "Café naïve façade résumé coöperate — “quotes” ‘single’ … ellipsis\n",
    "中文文本测试。日本語のテキスト。한국어 텍스트.\n",
    "Emoji 👩‍💻 🇺🇳 👍🏽 and combining e\u0301 a\u0308 o\u0302\n",
    "العربية نص من اليمين إلى اليسار עברית\n",
    "def f(x):\n    return x * 2  # code\n",
]


def corpus_lines(repeat: int = 20) -> list[str]:
    return TRAINING_TEXT * repeat


def train_byte_level_bpe(vocab_size: int = 400) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    return tok


def train_sentencepiece_bpe(vocab_size: int = 300, bos: bool = True) -> Tokenizer:
    """Llama-2/Mistral style: ▁ for spaces, dummy prefix, <0xNN> byte fallback, <s> BOS."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        piece = f"<0x{b:02X}>"
        if piece not in vocab:
            vocab[piece] = len(vocab)
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    tok = Tokenizer.from_str(json.dumps(spec))
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return tok


def train_char_level() -> Tokenizer:
    """Plain (non-byte-level) tokenizer whose vocabulary strings are characters of the text."""
    chars = sorted({c for line in corpus_lines(1) for c in line} | {chr(c) for c in range(32, 127)})
    vocab = {"<unk>": 0, "</s>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.add_special_tokens(["<unk>", "</s>"])
    return tok


def save_hf_tokenizer(tok: Tokenizer, path: Path, **special) -> Path:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    fast.save_pretrained(str(path))
    return path


def make_tokenizer(kind: str, path: Path) -> Path:
    if kind == "byte_level":
        return save_hf_tokenizer(
            train_byte_level_bpe(), path, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
        )
    if kind == "byte_level_small":
        return save_hf_tokenizer(
            train_byte_level_bpe(vocab_size=290), path, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
        )
    if kind == "sentencepiece":
        return save_hf_tokenizer(
            train_sentencepiece_bpe(), path, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
        )
    if kind == "char":
        return save_hf_tokenizer(train_char_level(), path, eos_token="</s>", unk_token="<unk>")
    raise ValueError(kind)


def make_model(arch: str, tokenizer_dir: Path, path: Path, seed: int = 0) -> Path:
    """A random tiny causal LM for the tokenizer in ``tokenizer_dir``, saved with it to ``path``."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        model = LlamaForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(tok),
            n_embd=64,
            n_layer=2,
            n_head=2,
            n_positions=2048,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(arch)
    with torch.no_grad():  # sharper-than-random output distributions make numeric checks meaningful
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    """A JSON-lines corpus file, one record per line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
