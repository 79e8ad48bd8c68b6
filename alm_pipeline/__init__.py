"""alm-pipeline: cross-tokenizer distillation (Approximate Likelihood Matching) around a teacher cache."""

__version__ = "0.1.0"
