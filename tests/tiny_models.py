"""Tiny randomly initialised causal LMs of every supported family (no download, CPU, each well under 1 s).

All share one shape: hidden 64, 4 query heads and 2 KV heads (GQA) of head_dim 16, intermediate 128,
4 layers, vocab 256, 512 positions, float32, eval mode, SDPA attention. Mistral and Gemma3 use a sliding
window of 64 (Gemma3 alternates sliding and full layers); Qwen3 has q/k RMSNorm by construction.
"""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma3")

SLIDING_WINDOW = 64
GEMMA3_LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]

# A wide init (as in conftest.make_tiny_llama) so greedy tokens are not near-ties.
_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, initializer_range=0.2,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _build(config_cls, model_cls, **extra) -> PreTrainedModel:
    config = config_cls(**_SHAPE, **extra, attn_implementation="sdpa")
    return model_cls(config).to(torch.float32).eval()


def tiny_model(family: str, seed: int = 0) -> PreTrainedModel:
    """A deterministic (per seed) tiny random CausalLM of ``family`` (one of FAMILIES)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: pick one of {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    if family == "llama":
        return _build(LlamaConfig, LlamaForCausalLM, head_dim=16)
    if family == "mistral":
        return _build(MistralConfig, MistralForCausalLM, head_dim=16, sliding_window=SLIDING_WINDOW)
    if family == "qwen2":
        return _build(Qwen2Config, Qwen2ForCausalLM, head_dim=16, use_sliding_window=False)
    if family == "qwen3":
        return _build(Qwen3Config, Qwen3ForCausalLM, head_dim=16, use_sliding_window=False)
    return _build(Gemma3TextConfig, Gemma3ForCausalLM, head_dim=16, query_pre_attn_scalar=16,
                  sliding_window=SLIDING_WINDOW, layer_types=list(GEMMA3_LAYER_TYPES))


def tiny_unsupported_model(seed: int = 0) -> PreTrainedModel:
    """A tiny random GPT-2 (an architecture kvfold does not support)."""
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, vocab_size=256, bos_token_id=1,
                        eos_token_id=2, attn_implementation="sdpa")
    return GPT2LMHeadModel(config).eval()
