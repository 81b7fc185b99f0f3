"""The shared test bed model: a demo-size Hugging Face Llama built from a config (no download).

4 layers, hidden 256, 4 heads, SwiGLU MLP 688, vocab 256 (bytes), sequence 128, random init.
Every quality and speed figure in lowprec uses it, so figures compare across issues.
"""

from __future__ import annotations

from typing import Any

import torch

DEMO_LLAMA = dict(
    vocab_size=256,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
DEMO_SEQ_LEN = 128


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover
        raise ImportError("the demo models need Hugging Face transformers: pip install 'lowprec[hf]'") from e
    return transformers


def demo_llama(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` of the demo size (override any config field)."""
    tf = _transformers()
    attn = overrides.pop("attn_implementation", "sdpa")
    cfg = tf.LlamaConfig(**{**DEMO_LLAMA, **overrides})
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(cfg)


def small_gpt2(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A small ``GPT2LMHeadModel`` (2 layers, hidden 128, vocab 256)."""
    tf = _transformers()
    cfg = tf.GPT2Config(**{**dict(vocab_size=256, n_embd=128, n_layer=2, n_head=4, n_positions=128), **overrides})
    torch.manual_seed(seed)
    return tf.GPT2LMHeadModel(cfg)


def small_bert(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A small ``BertForMaskedLM`` (2 layers, hidden 128, vocab 256)."""
    tf = _transformers()
    cfg = tf.BertConfig(**{**dict(vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=512, max_position_embeddings=128), **overrides})
    torch.manual_seed(seed)
    return tf.BertForMaskedLM(cfg)


def mlp(sizes: tuple[int, ...] = (64, 256, 256, 10), seed: int = 0) -> torch.nn.Sequential:
    """A plain ``nn.Sequential`` MLP with GELU between Linear layers."""
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.GELU())
    return torch.nn.Sequential(*layers)
