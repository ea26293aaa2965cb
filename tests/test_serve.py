"""`kvfold serve` without HTTP: forks under the prefix cache, the radix tree and its budget, the KV bound used for
admission, sampling and stop strings, configuration and rate limits. (HTTP: tests/test_serve_http.py.)"""

from __future__ import annotations

import pytest
import torch

from kvfold.api import prefill, use_kvfold_attention
from kvfold.cache import KVFoldCache
from kvfold.compressor import Compressor
from kvfold.errors import KVFoldError
from kvfold.serve import PrefixCache, ServeConfig, held_nbytes, kv_upper_bound, load_api_keys, parse_bytes
from kvfold.serve.prefix_cache import release
from kvfold.serve.protocol import APIError
from kvfold.sampling import TextStream
from kvfold.serve.security import RateLimiter

from .serve_helpers import byte_tokenizer

NS = ("tiny", "none")


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def _state(cache: KVFoldCache) -> list:
    """Everything a cache reads: per layer its length, kept positions and the valid slots of its decoded chunks
    (slots past a row's length read whatever page 0 holds, which forks may rewrite)."""
    state = []
    for layer in cache.layers:
        chunks = [(c.keys[c.valid].clone(), c.values[c.valid].clone(), c.positions[c.valid].clone(), c.valid.clone())
                  for c in layer.chunks()]
        state.append((layer.seen, [p.clone() for row in layer.kept_positions() for p in row], chunks))
    return state


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _blocks(model, cache: KVFoldCache, ids: torch.Tensor, start: int, block: int) -> torch.Tensor:
    logits = None
    for lo in range(0, ids.shape[1], block):
        logits = prefill(model, cache, ids[:, lo:lo + block], start=start + lo)
    return logits


def _decode(model, cache: KVFoldCache, logits: torch.Tensor, seen: int, steps: int) -> list[int]:
    tokens = []
    for _ in range(steps):
        tokens.append(int(logits[0, -1].argmax()))
        logits = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True,
                       position_ids=torch.tensor([[seen]])).logits
        seen += 1
    return tokens


@pytest.mark.parametrize("spec", ["none", "snapkv:0.5", "kivi:4", "kivi:4,group=32,residual=32",
                                  "snapkv:0.75+kivi:2,group=32,residual=32", "streaming:0.5", "snapkv:0.5,every=16"])
def test_fork_then_prefill_leaves_the_parent_snapshot_untouched(tiny_llama, spec):
    ids = _ids(200)
    with torch.inference_mode(), use_kvfold_attention(tiny_llama):
        cache = KVFoldCache(tiny_llama.config, Compressor.parse(spec), compress_appends=True)
        _blocks(tiny_llama, cache, ids[:, :128], 0, 64)
        snapshot = cache.fork()
        before, before_bytes = _state(snapshot), snapshot.referenced_nbytes()
        child = snapshot.fork()  # what a warm request does: prefill the rest and decode on a fork
        _decode(tiny_llama, child, _blocks(tiny_llama, child, ids[:, 128:], 128, 64), 200, 20)
        _decode(tiny_llama, cache, _blocks(tiny_llama, cache, ids[:, 128:192], 128, 64), 192, 10)  # the parent
        release(child)
        assert _same(_state(snapshot), before)
        assert snapshot.referenced_nbytes() == before_bytes
        # ... and a fork of it still computes exactly what a cold prefill in the same blocks computes
        warm = _blocks(tiny_llama, snapshot.fork(), ids[:, 128:], 128, 64)
        cold = _blocks(tiny_llama, KVFoldCache(tiny_llama.config, Compressor.parse(spec), compress_appends=True),
                       ids, 0, 64)
    assert torch.equal(warm, cold)


def _chain(model, ids: torch.Tensor, block: int, spec: str = "none") -> list[KVFoldCache]:
    """Snapshots after each full block of `ids`, as the engine stores them (the working cache released)."""
    with torch.inference_mode(), use_kvfold_attention(model):
        cache = KVFoldCache(model.config, Compressor.parse(spec), compress_appends=True)
        snaps = []
        for lo in range(0, ids.shape[1], block):
            prefill(model, cache, ids[:, lo:lo + block], start=lo)
            snaps.append(cache.fork())
        release(cache)
    return snaps


def test_radix_tree_finds_the_longest_cached_prefix(tiny_llama):
    block, ids = 8, _ids(24)
    tree = PrefixCache(budget=1 << 30, block=block)
    assert tree.match(NS, ids[0, :16].tolist()) == (0, None) and tree.misses == 1
    snaps = _chain(tiny_llama, ids, block)
    for k, snap in enumerate(snaps, start=1):
        assert tree.insert(NS, ids[0, :k * block].tolist(), snap)
    assert tree.snapshots == 3
    depth, snap = tree.match(NS, ids[0, :24].tolist())
    assert depth == 24 and snap is snaps[2] and tree.hits == 1
    other = ids[0].tolist()
    other[12] = (other[12] + 1) % 256  # diverges inside the second block
    assert tree.match(NS, other[:16]) == (8, snaps[0])
    assert tree.match(("tiny", "snapkv:0.5"), ids[0, :24].tolist()) == (0, None)  # never across methods
    assert tree.match(("other-model", "none"), ids[0, :24].tolist()) == (0, None)  # nor models
    assert tree.match(NS, []) == (0, None)
    assert (tree.hits, tree.misses) == (2, 3)  # the empty prefix is no lookup
    duplicate = _chain(tiny_llama, ids[:, :8], block)[0]
    assert not tree.insert(NS, ids[0, :8].tolist(), duplicate)  # already there: the new fork is released
    assert duplicate.referenced_nbytes() == duplicate.table_nbytes() and tree.snapshots == 3
    with pytest.raises(ValueError):
        tree.match(NS, ids[0, :12].tolist())
    assert tree.cacheable_blocks(16) == 1 and tree.cacheable_blocks(17) == 2 and tree.cacheable_blocks(1) == 0


def test_held_bytes_count_shared_pools_once(tiny_llama):
    snaps = _chain(tiny_llama, _ids(32), 8)
    tree = PrefixCache(budget=1 << 30, block=8)
    for k, snap in enumerate(snaps, start=1):
        tree.insert(NS, _ids(32)[0, :k * 8].tolist(), snap)
    pools = {id(p): p for layer in snaps[-1].layers for p in layer.pools()}
    expected = sum(p.nbytes() for p in pools.values()) + sum(s.table_nbytes() for s in snaps)
    assert tree.held == held_nbytes(snaps) == expected
    assert tree.held < sum(s.nbytes() for s in snaps)  # summing nbytes() would count the shared pool 4 times
    assert tree.held >= max(s.referenced_nbytes() for s in snaps)


def test_held_bytes_of_a_pool_set_count_used_pages_so_eviction_makes_room(tiny_llama):
    """The server's caches share one `PoolSet`: a request's freed pages stay in the pools as room for the next, so
    they no longer count as held, and evicting snapshots lets `make_room` admit a reserve it could not before."""
    from kvfold.pages import PoolSet

    pools = PoolSet()
    with torch.inference_mode(), use_kvfold_attention(tiny_llama):
        caches = [KVFoldCache(tiny_llama.config, "none", compress_appends=True, pools=pools) for _ in range(2)]
        for seed, cache in enumerate(caches):
            prefill(tiny_llama, cache, _ids(40, seed=seed))
    capacity = pools.nbytes()
    both = held_nbytes(caches)
    used = sum(p.used_nbytes() for p in pools.pools())
    assert both == used + sum(c.table_nbytes() for c in caches) and used <= capacity
    release(caches[0])
    assert pools.nbytes() == capacity and held_nbytes(caches[1:]) < both
    tree = PrefixCache(budget=both, block=8)
    tree.insert(NS, _ids(40, seed=1)[0, :40].tolist(), caches[1])
    reserve = both - held_nbytes(caches[1:]) + 1
    assert tree.make_room(reserve) and tree.snapshots == 0  # the snapshot's pages went back to the shared pools


def test_lru_eviction_keeps_the_tree_under_budget(tiny_llama):
    block = 8
    roots = [_ids(16, seed=s) for s in (10, 11, 12)]
    chains = [_chain(tiny_llama, ids, block) for ids in roots]
    one_root = held_nbytes(chains[0])
    tree = PrefixCache(budget=int(2.5 * one_root), block=block)
    for ids, chain in zip(roots[:2], chains[:2]):
        for k, snap in enumerate(chain, start=1):
            tree.insert(NS, ids[0, :k * block].tolist(), snap)
    assert tree.make_room() and tree.snapshots == 4
    tree.match(NS, roots[0][0].tolist())  # root 0 used again: root 1 is now the least recent
    for k, snap in enumerate(chains[2], start=1):
        tree.insert(NS, roots[2][0, :k * block].tolist(), snap)
    assert tree.make_room()
    assert tree.held <= tree.budget and tree.evictions >= 1
    assert tree.match(NS, roots[1][0].tolist())[0] < 16  # only the least recently used root lost snapshots
    assert tree.match(NS, roots[0][0].tolist())[0] == 16 and tree.match(NS, roots[2][0].tolist())[0] == 16
    # Room for a request: the deepest snapshots go first, and a reserve no tree can make room for fails.
    assert tree.make_room(reserve=tree.budget - one_root) and tree.snapshots <= 2
    assert not tree.make_room(reserve=tree.budget + 1) and tree.snapshots == 0 and tree.held == 0


def test_eviction_inside_one_chain_trims_the_shared_pool(tiny_llama):
    ids, block = _ids(256), 64  # one 64-token page per row and layer per block: snapshot k holds k pages
    snaps = _chain(tiny_llama, ids, block)
    tree = PrefixCache(budget=1 << 30, block=block)
    with torch.inference_mode():
        for k, snap in enumerate(snaps, start=1):
            tree.insert(NS, ids[0, :k * block].tolist(), snap)
        full = tree.held
        page = sum(p.page_nbytes() for layer in snaps[0].layers for p in layer.pools()) * 2  # 2 KV-head rows
        del snaps
        tree.budget = full - page // 2  # more than the evicted snapshot's tables: only trimming gets there
        assert tree.make_room()
    assert tree.snapshots == 3 and tree.evictions == 1
    assert tree.match(NS, ids[0].tolist())[0] == 3 * block  # equally recent: the deepest went first
    assert tree.held <= full - page  # its pages went back to the allocator (the pools' tails were trimmed)


@pytest.mark.parametrize("spec", ["none", "snapkv:0.5", "kivi:2", "kivi:4,group=32,residual=32", "streaming:0.5",
                                  "snapkv:0.5+kivi:4"])
def test_kv_upper_bound_covers_what_a_request_holds(tiny_llama, spec):
    compressor = Compressor.parse(spec)
    with torch.inference_mode(), use_kvfold_attention(tiny_llama):
        cache = KVFoldCache(tiny_llama.config, compressor, compress_appends=True)
        logits = _blocks(tiny_llama, cache, _ids(300), 0, 64)
        _decode(tiny_llama, cache, logits, 300, 40)
    bound = kv_upper_bound(tiny_llama.config, compressor, 340, 4)
    assert held_nbytes([cache]) <= bound
    assert bound < 3 * kv_upper_bound(tiny_llama.config, Compressor.parse("none"), 340, 4)  # and not absurd


def test_text_stream_holds_back_what_could_start_a_stop_string():
    tokenizer = byte_tokenizer()
    stream = TextStream(tokenizer, ("lo w",))
    sent, stopped = [], False
    for token in tokenizer("hello world")["input_ids"]:
        delta, stopped = stream.add(token)
        sent.append(delta)
        if stopped:
            break
    assert stopped and "".join(sent) == "hel" == stream.text
    assert sent == ["h", "e", "", "l", "", "", ""]  # a trailing "l", "lo", "lo " could still become "lo w"
    plain = TextStream(tokenizer, ())
    word = "héllo"  # é is two bytes: nothing half-written is sent
    deltas = [plain.add(t)[0] for t in tokenizer(word)["input_ids"]]
    assert "\ufffd" not in "".join(deltas) and "".join(deltas) + plain.flush() == word
    tokens = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0)).tolist()  # broken UTF-8 too
    windowed = TextStream(tokenizer, ())
    text = "".join(windowed.add(t)[0] for t in tokens) + windowed.flush()
    assert text == tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_parse_bytes_and_config_validation(tmp_path):
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("500MB") == 500 * 10**6
    assert parse_bytes("1.5k") == 1536 and parse_bytes(4096) == 4096 and parse_bytes("1e3") == 1000
    for bad in ("", "2XB", "-1", "0", "GiB"):
        with pytest.raises(KVFoldError):
            parse_bytes(bad)
    config = ServeConfig(method="snapkv:0.75 + kivi:4")
    assert config.method == "snapkv:0.75+kivi:4" == config.compressor.spec  # canonical: one cache namespace
    for bad in (dict(method="snapk:0.5"), dict(block=0), dict(queue=0), dict(rate_limit=0), dict(kv_budget=-1),
                dict(api_keys=("short",)), dict(max_prompt_tokens=True), dict(model_id=" "), dict(fast="yes"),
                dict(cuda_graphs=1)):
        with pytest.raises(KVFoldError):
            ServeConfig(**bad)
    with pytest.raises(KVFoldError, match="prefills in blocks"):
        ServeConfig(method="xkv")
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nkey-one-123456\n\n  key-two-123456  \n")
    assert load_api_keys(keys) == ("key-one-123456", "key-two-123456")
    keys.write_text("# nothing\n")
    with pytest.raises(KVFoldError, match="holds no key"):
        load_api_keys(keys)
    with pytest.raises(KVFoldError, match="does not exist"):
        load_api_keys(tmp_path / "missing")


def test_rate_limiter_is_a_token_bucket_per_caller():
    now = [0.0]
    limiter = RateLimiter(2, clock=lambda: now[0])
    limiter.check("a")
    limiter.check("a")
    with pytest.raises(APIError) as err:
        limiter.check("a")
    assert err.value.status == 429 and err.value.headers["Retry-After"] == "30"
    limiter.check("b")  # another key has its own bucket
    now[0] = 30.0
    limiter.check("a")  # one token back after 30 s at 2 a minute
    with pytest.raises(APIError):
        limiter.check("a")
    RateLimiter(None).check("a")  # no limit
