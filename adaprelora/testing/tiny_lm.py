"""Tiny random language models (Llama, GPT-2) and a byte-level tokenizer, all built in code.

Nothing is downloaded: the tokenizer maps every byte to one token (plus pad/bos/eos), and the
models are a few thousand parameters with random weights. `save_tiny_lm(kind, folder)` writes a
folder that `AutoModelForCausalLM`, `AutoModelForSequenceClassification` and `AutoTokenizer` load
offline, so the CLI can be tested on it exactly as on a real checkpoint.
"""
from __future__ import annotations

import os

import torch

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def build_byte_tokenizer():
    """A fast tokenizer with one token per byte (ids 4..259) after the four special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: (len(c), c))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for char in byte_chars:
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    tokenizer.padding_side = "right"
    return tokenizer


def tiny_llama(vocab_size: int = 260, seed: int = 0, **overrides):
    """A 2-layer Llama causal LM with hidden size 32 and random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **overrides,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def tiny_gpt2(vocab_size: int = 260, seed: int = 0, **overrides):
    """A 2-layer GPT-2 causal LM with hidden size 32 and random weights (Conv1D projections)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **overrides,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


_BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def save_tiny_lm(kind: str, folder: str, seed: int = 0) -> str:
    """Write a tiny `kind` ("llama" or "gpt2") model and its tokenizer to `folder`; return it."""
    if kind not in _BUILDERS:
        raise ValueError(f"unknown tiny model {kind!r}; choose from {sorted(_BUILDERS)}")
    tokenizer = build_byte_tokenizer()
    model = _BUILDERS[kind](vocab_size=len(tokenizer), seed=seed)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
