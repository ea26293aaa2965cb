"""`KVFoldCache`: a transformers `Cache` whose layers (`layer.KVFoldLayer`) hold only what a compression method
keeps. See `layer.py` for the per-layer store and `reading.py` for attention over it.
"""

from __future__ import annotations

from transformers.cache_utils import Cache

from .compressor import Compressor
from .errors import KVFoldError
from .layer import KVFoldLayer, StagedKV, compact, gather_tokens  # noqa: F401  (re-exported)
from .models import rope_frequencies
from .pages import PoolSet


def layer_windows(config) -> list[int | None]:
    """The sliding window of each layer (None for full attention), from `layer_types` or `sliding_window`."""
    text = config.get_text_config()
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None) or (
        ["sliding_attention" if window else "full_attention"] * text.num_hidden_layers)
    windows = []
    for layer_type in layer_types:
        if layer_type not in ("full_attention", "sliding_attention"):
            raise KVFoldError(f"kvfold cannot hook layers of type '{layer_type}' (supported: full_attention, "
                              "sliding_attention)")
        windows.append(window if layer_type == "sliding_attention" else None)
    return windows


class KVFoldCache(Cache):
    """A transformers `Cache` holding compressed K/V. Use through `kvfold.compress(model, spec)` or pass as
    `past_key_values` to a model whose attention implementation is "kvfold".
    """

    def __init__(self, config, compressor: Compressor | str = "none", page_size: int = 64,
                 compress_appends: bool = False, pools: PoolSet | None = None) -> None:
        compressor = compressor if isinstance(compressor, Compressor) else Compressor.parse(compressor)
        compressor.budget.check_model(config)
        for method in (compressor.rotation, compressor.lowrank):
            if method is not None:
                method.check_model(config)
        layers, windows = [], layer_windows(config)
        frequencies = {kind: rope_frequencies(config, kind) if compressor.scorer.needs_rope else None
                       for kind in ("full_attention", "sliding_attention")}
        for index, window in enumerate(windows):
            layers.append(KVFoldLayer(compressor, window, page_size, index, len(windows)))
            layers[-1].compress_appends = compress_appends
            layers[-1].pool_set = pools
            layers[-1].inv_freq = frequencies["sliding_attention" if window else "full_attention"]
        if compressor.lowrank is not None:
            self._group_layers(compressor.lowrank, layers, windows)
        super().__init__(layers=layers)
        self.compressor = compressor
        self.config = config

    @staticmethod
    def _group_layers(method, layers: list[KVFoldLayer], windows: list[int | None]) -> None:
        """xkv: give runs of `method.layers` adjacent layers one `LayerGroup` (the last run may be shorter)."""
        from .methods.xkv import LayerGroup

        if any(window is not None for window in windows):
            raise KVFoldError(f"{method.name} needs every layer to attend to the whole context; this model has "
                              "sliding-window layers")
        for start in range(0, len(layers), method.layers):
            members = list(range(start, min(start + method.layers, len(layers))))
            group = LayerGroup(method, members)
            for index in members:
                layers[index].lowrank_group = group

    def nbytes(self) -> int:
        """Bytes this cache really holds: every page of its pools (shared with forks), its tables and buffers."""
        pools = {id(pool): pool for layer in self.layers if layer.is_initialized for pool in layer.pools()}
        return sum(pool.nbytes() for pool in pools.values()) + self.table_nbytes() + self.lowrank_nbytes()

    def lowrank_nbytes(self) -> int:
        """xkv: each group's shared latents and its layers' bases, counted once (forks share them)."""
        groups = {id(layer.lowrank): layer.lowrank for layer in self.layers if layer.lowrank is not None}
        return sum(group.nbytes() for group in groups.values())

    def table_nbytes(self) -> int:
        return sum(layer.table_nbytes() for layer in self.layers if layer.is_initialized)

    def referenced_nbytes(self) -> int:
        """Bytes of the pages this cache reads (shared pages counted in full), its tables and buffers: what it
        would hold alone, without the pages its forks or parent added."""
        return sum(layer.referenced_nbytes() for layer in self.layers if layer.is_initialized) + self.lowrank_nbytes()

    def peak_nbytes(self) -> int:
        """The most bytes this cache's pools have held at once (capacity high-water mark), plus tables now."""
        pools = {id(pool): pool for layer in self.layers if layer.is_initialized for pool in layer.pools()}
        return sum(pool.peak_nbytes() for pool in pools.values()) + self.table_nbytes()

    def peak_row_tokens(self) -> int:
        """The most tokens any (batch, KV head) row of any layer has held at once."""
        return max((layer.peak_row_tokens for layer in self.layers), default=0)

    def begin_chunks(self) -> None:
        """Start a chunked prefill (see `kvfold.api.prefill`): each chunk is stored, then evicted to the budget."""
        for layer in self.layers:
            layer.chunking = True

    def set_probe(self, tokens: int) -> None:
        """The next forward's last `tokens` tokens only score (the question repeated as the window)."""
        for layer in self.layers:
            layer.probe_tokens = tokens

    def finish_chunks(self) -> None:
        for layer in self.layers:
            layer.finish_chunks()

    def stored_tokens(self) -> int:
        """Tokens held over all layers and rows."""
        return sum(layer.stored_tokens for layer in self.layers if layer.is_initialized)

    def fork(self) -> "KVFoldCache":
        """A copy-on-write child: shares every page; what either side appends later is its own."""
        child = KVFoldCache.__new__(KVFoldCache)
        Cache.__init__(child, layers=[layer.fork() if layer.is_initialized else layer.fresh_copy()
                                      for layer in self.layers])
        child.compressor, child.config = self.compressor, self.config
        if self.compressor.lowrank is not None and any(layer.lowrank is None for layer in child.layers):
            self._group_layers(self.compressor.lowrank, child.layers, [layer.sliding_window for layer in child.layers])
        return child
