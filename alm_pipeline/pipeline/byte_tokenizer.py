"""GPT-2's byte alphabet and the built-in ``bytes`` tokenizer: 256 byte tokens plus BOS/EOS/PAD, nothing else.

Token id ``b`` (0..255) is the byte ``b``; ``<pad>`` = 256, ``<bos>`` = 257, ``<eos>`` = 258. It is an ordinary
Hugging Face fast tokenizer (byte-level alphabet, no merges), so ``save_pretrained`` / ``AutoTokenizer``
round-trip it and vLLM can serve a model trained with it. It prepends ``<bos>`` so that the first byte of
every document is predicted.
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: stand-in character -> byte value."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(byte_values, code_points, strict=True)}


def build_byte_backend() -> Tokenizer:
    byte_chars = {b: c for c, b in unicode_to_bytes().items()}
    vocab = {byte_chars[b]: b for b in range(256)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    # Specials live only as added tokens (ids 256..258), never in the BPE vocabulary: a document whose text
    # is literally "<eos>" must still be 5 byte tokens.
    backend.add_special_tokens([PAD, BOS, EOS])
    assert [backend.token_to_id(t) for t in (PAD, BOS, EOS)] == [256, 257, 258]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 257)]
    )
    return backend


def build_byte_tokenizer():
    """The ``bytes`` tokenizer as a transformers ``PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=build_byte_backend(),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=1 << 30,
    )
