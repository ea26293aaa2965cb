"""`kvfold serve`: an OpenAI-compatible HTTP server over kvfold's compressed caches, with a compressed prefix
cache (a radix tree of `KVFoldCache` snapshots) and one engine thread (no continuous batching in v1).

    from kvfold.serve import ServeConfig, create_app
    app = create_app(model, tokenizer, ServeConfig(method="snapkv:0.5"))
"""

from .app import create_app
from .server import BackgroundServer, run_server
from .config import ServeConfig, load_api_keys, parse_bytes
from .engine import Engine
from .jobs import GenerationRequest
from .prefix_cache import PrefixCache, held_nbytes, kv_upper_bound

__all__ = ["BackgroundServer", "Engine", "GenerationRequest", "PrefixCache", "ServeConfig", "create_app",
           "held_nbytes", "kv_upper_bound", "load_api_keys", "parse_bytes", "run_server"]
