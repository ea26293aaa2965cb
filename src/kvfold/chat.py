"""A multi-turn chat over one compressed cache: each turn appends only its new tokens, and with
`compress_appends` every multi-token turn is compressed by the method as it arrives."""

from __future__ import annotations

import torch

from .api import decode_greedy, forward_tokens, stop_token_ids, use_kvfold_attention
from .cache import KVFoldCache
from .compressor import Compressor
from .errors import KVFoldError
from .models import context_limit


class ChatSession:
    """Keeps the conversation, the compressed cache and the text the cache has consumed."""

    def __init__(self, model, tokenizer, method: str | Compressor = "snapkv:0.5") -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise KVFoldError("this tokenizer has no chat template: use `kvfold generate` for plain prompts")
        self.model, self.tokenizer = model, tokenizer
        self.compressor = method if isinstance(method, Compressor) else Compressor.parse(method)
        self.cache = KVFoldCache(model.config, self.compressor, compress_appends=True)
        self.messages: list[dict[str, str]] = []
        self.fed_text = ""
        self.tokens_seen = 0
        self.limit = context_limit(model.config)

    def _render(self, messages: list[dict[str, str]], prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)

    def uncompressed_bytes(self) -> int:
        """What the same tokens would take in a plain cache of the model's dtype."""
        config = self.model.config.get_text_config()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        element = next(self.model.parameters()).element_size()
        return 2 * self.tokens_seen * config.num_hidden_layers * config.num_key_value_heads * head_dim * element

    @torch.inference_mode()
    def send(self, message: str, max_new_tokens: int = 128) -> str:
        """Append the user's turn, generate greedily, and return the reply."""
        messages = self.messages + [{"role": "user", "content": message}]
        full = self._render(messages, prompt=True)
        if not full.startswith(self.fed_text):  # the template rewrote earlier turns: send only the new one
            full = self.fed_text + full[len(self._render(self.messages, prompt=False)) if self.messages else 0:]
        delta = self.tokenizer(full[len(self.fed_text):], add_special_tokens=not self.fed_text)["input_ids"]
        if self.tokens_seen + len(delta) + max_new_tokens > self.limit:
            raise KVFoldError(f"the conversation would pass the model's context of {self.limit} tokens: start a new chat")
        with use_kvfold_attention(self.model):
            logits = forward_tokens(self.model, self.cache, delta, self.tokens_seen)
            self.tokens_seen += len(delta)
            tokens = decode_greedy(self.model, self.cache, logits, self.tokens_seen, max_new_tokens,
                                   stop_token_ids(self.model, self.tokenizer))
        fed = self.cache.get_seq_length() - self.tokens_seen  # a reply cut by max_new_tokens leaves its last token out
        self.tokens_seen += fed
        reply = self.tokenizer.decode(tokens, skip_special_tokens=True)
        self.messages = messages + [{"role": "assistant", "content": reply}]
        self.fed_text = full + self.tokenizer.decode(tokens[:fed], skip_special_tokens=False)
        return reply
