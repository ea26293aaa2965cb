"""Fixtures for the `kvfold serve` tests: a byte-level tokenizer with a chat template (built in memory, < 1 s)
and a tiny random Llama sized for it whose EOS logit is pinned to 0, so greedy decoding runs to max_tokens."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens + <|bos|>, <|im_end|> (EOS), <|pad|>, <|im_start|>: 260 ids, any text encodes."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|bos|>", eos_token="<|im_end|>",
                                        pad_token="<|pad|>", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_serving_model(tokenizer, seed: int = 0, layers: int = 2, positions: int = 4096) -> LlamaForCausalLM:
    """A random Llama (hidden 64, 4 query / 2 KV heads of 16) over the tokenizer's vocab. Its lm_head row of
    EOS is zero, so EOS's logit is 0 while the best of ~260 random logits is positive: greedy never stops early."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=len(tokenizer),
                         max_position_embeddings=positions, initializer_range=0.2, attn_implementation="sdpa",
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = 0
    return model
