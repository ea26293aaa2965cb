"""Paged, per-row storage: the physical layer under every compressed cache.

A row is one (batch, KV-head) pair. Each row owns a list of fixed-size pages (a page table), so rows can hold
different numbers of tokens and evicting a token frees memory once its page empties. Pages live in one pool per
layer and format; pages are reference-counted so a forked cache shares them copy-on-write.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Field:
    """One tensor stored per page: its per-page shape and dtype (e.g. keys: (page_size, head_dim), bfloat16)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * torch.empty((), dtype=self.dtype).element_size()


class PagePool:
    """Pages of one format on one device. Capacity grows to exactly what is asked for; freed pages are reused.

    `nbytes()` is the memory really held: every page of capacity, used or free, plus the reference counts.
    """

    def __init__(self, fields: dict[str, Field], page_size: int, device: torch.device, shared: bool = False) -> None:
        self.fields = fields
        self.shared = shared  # a `PoolSet`'s: its free pages are room for every cache, not held by one
        self.page_size = page_size
        self.device = device
        self.tensors = {name: torch.empty((0, *f.shape), dtype=f.dtype, device=device) for name, f in fields.items()}
        self.refcount = torch.zeros(0, dtype=torch.int32)
        self.free: list[int] = []
        self.peak_capacity = 0

    @property
    def capacity(self) -> int:
        return int(self.refcount.numel())

    def page_nbytes(self) -> int:
        return sum(f.nbytes for f in self.fields.values())

    def nbytes(self) -> int:
        return self.capacity * self.page_nbytes() + self.refcount.numel() * self.refcount.element_size()

    def used_nbytes(self) -> int:
        """Bytes of the pages some table references (capacity less the free list), plus the reference counts."""
        return (self.capacity - len(self.free)) * self.page_nbytes() + self.refcount.numel() * self.refcount.element_size()

    def peak_nbytes(self) -> int:
        """Bytes at the largest capacity this pool has had."""
        return self.peak_capacity * (self.page_nbytes() + self.refcount.element_size())

    def alloc(self, count: int) -> torch.Tensor:
        """Ids of `count` pages, each with reference count 1."""
        if count > len(self.free):
            self._grow(count - len(self.free))
        taken, self.free = self.free[:count], self.free[count:]
        ids = torch.tensor(taken, dtype=torch.long)
        with torch.inference_mode():  # see `release`
            self.refcount[ids] = 1
        return ids

    def reserve(self, count: int) -> None:
        """Grow the capacity now so that `count` pages are free: the fast decode loop allocates its pool once, so
        the tensors a captured CUDA graph reads never move."""
        if count > len(self.free):
            self._grow(count - len(self.free))

    def _grow(self, extra: int) -> None:
        start = self.capacity
        for name, f in self.fields.items():
            grown = torch.zeros((start + extra, *f.shape), dtype=f.dtype, device=self.device)
            grown[:start] = self.tensors[name]
            self.tensors[name] = grown
        self.refcount = torch.cat([self.refcount, torch.zeros(extra, dtype=torch.int32)])
        self.free.extend(range(start, start + extra))
        self.peak_capacity = max(self.peak_capacity, self.capacity)

    def trim(self) -> None:
        """Give back the free pages at the end of the pool (after a peak, e.g. the chunks of a chunked prefill)."""
        used = torch.nonzero(self.refcount > 0)
        keep = int(used.max()) + 1 if used.numel() else 0
        if keep == self.capacity:
            return
        self.tensors = {name: t[:keep].clone() for name, t in self.tensors.items()}
        self.refcount = self.refcount[:keep].clone()
        self.free = [i for i in self.free if i < keep]

    @torch.inference_mode()
    def retain(self, ids: torch.Tensor) -> None:
        self.refcount.index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))

    @torch.inference_mode()
    def release(self, ids: torch.Tensor) -> None:
        """Drop one reference to each page; pages nobody references go back to the free list.

        Reference counts change inside inference mode: a pool filled under `torch.inference_mode()` holds inference
        tensors, which may only be updated there, and a fork may be dropped (garbage-collected) anywhere."""
        if ids.numel() == 0:
            return
        self.refcount.index_add_(0, ids, -torch.ones_like(ids, dtype=torch.int32))
        freed = ids[self.refcount[ids] == 0].unique()
        self.free.extend(freed.tolist())

    def write(self, ids: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """Write whole pages: values[name] is [len(ids), *field.shape]."""
        dev_ids = ids.to(self.device)
        for name, tensor in values.items():
            self.tensors[name][dev_ids] = tensor.to(self.fields[name].dtype)

    def write_slots(self, ids: torch.Tensor, offsets: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """Write single token slots: values[name] is [len(ids), *field.shape[1:]]."""
        dev_ids, dev_off = ids.to(self.device), offsets.to(self.device)
        for name, tensor in values.items():
            self.tensors[name][dev_ids, dev_off] = tensor.to(self.fields[name].dtype)

    def copy_page(self, src: torch.Tensor) -> torch.Tensor:
        """Copy pages into new ones (copy-on-write); returns the new ids."""
        dst = self.alloc(int(src.numel()))
        s, d = src.to(self.device), dst.to(self.device)
        for tensor in self.tensors.values():
            tensor[d] = tensor[s]
        return dst


class PoolSet:
    """Page pools shared by many caches: one pool per (layer, store) and page format, whichever cache asks first
    creates it. A server gives every request's cache the same set, so the decode kernel reads all the requests'
    rows of a layer in one launch (`fastpath.joint_step`), and pages one request frees are reused by the next.
    Its pools' free pages are room any cache can take, so budgets count their used pages (`PagePool.used_nbytes`)."""

    def __init__(self) -> None:
        self._pools: dict[tuple, PagePool] = {}

    def pool(self, key: tuple, fields: dict[str, Field], page_size: int, device: torch.device) -> PagePool:
        """The pool for `key` (e.g. (layer index, store name)) in this format, created on first use."""
        full_key = (key, tuple((n, f.shape, f.dtype) for n, f in fields.items()), page_size, str(device))
        if full_key not in self._pools:
            self._pools[full_key] = PagePool(fields, page_size, device, shared=True)
        return self._pools[full_key]

    def pools(self) -> list[PagePool]:
        return list(self._pools.values())

    def nbytes(self) -> int:
        """Bytes the pools hold (every page of capacity, used or free)."""
        return sum(pool.nbytes() for pool in self._pools.values())


class PagedRows:
    """Rows of tokens stored in pages of a shared pool: a page table and a length per row.

    Tokens of a row are stored in order from slot 0 of its first page; a row's last page may be partly filled.
    """

    def __init__(self, pool: PagePool, rows: int) -> None:
        self.pool = pool
        self.table = torch.full((rows, 0), -1, dtype=torch.long)
        self.lengths = torch.zeros(rows, dtype=torch.long)

    @property
    def rows(self) -> int:
        return int(self.lengths.numel())

    @property
    def page_size(self) -> int:
        return self.pool.page_size

    def pages_per_row(self) -> torch.Tensor:
        return (self.lengths + self.page_size - 1) // self.page_size

    def page_ids(self) -> torch.Tensor:
        """Every page id the rows reference."""
        return self.table[self.table >= 0]

    def table_nbytes(self) -> int:
        return self.table.numel() * self.table.element_size() + self.lengths.numel() * self.lengths.element_size()

    def nbytes(self) -> int:
        """Bytes of the pages this object references plus its tables (shared pages counted in full)."""
        return int(self.page_ids().numel()) * self.pool.page_nbytes() + self.table_nbytes()

    def _ensure_table_width(self, pages: int) -> None:
        if pages > self.table.shape[1]:
            pad = torch.full((self.rows, pages - self.table.shape[1]), -1, dtype=torch.long)
            self.table = torch.cat([self.table, pad], dim=1)

    def fill(self, values: dict[str, torch.Tensor], lengths: torch.Tensor) -> None:
        """Replace the contents with ragged rows: values[name] is [rows, max_len, *field.shape[1:]] (padded)."""
        self.clear()
        lengths = lengths.to(torch.long).cpu()
        npages = (lengths + self.page_size - 1) // self.page_size
        width = int(npages.max()) if lengths.numel() else 0
        self.table = torch.full((self.rows, width), -1, dtype=torch.long)
        self.lengths = lengths.clone()
        total = int(npages.sum())
        if total == 0:
            return
        ids = self.pool.alloc(total)
        used = torch.arange(width).unsqueeze(0) < npages.unsqueeze(1)
        self.table[used] = ids
        padded_len = width * self.page_size
        pages = {}
        for name, tensor in values.items():
            pad = padded_len - tensor.shape[1]
            if pad > 0:
                tensor = torch.cat([tensor, tensor.new_zeros(tensor.shape[0], pad, *tensor.shape[2:])], dim=1)
            tensor = tensor[:, :padded_len].unflatten(1, (width, self.page_size))
            pages[name] = tensor[used.to(tensor.device)]
        self.pool.write(ids, pages)

    def fill_pages(self, pages: dict[str, torch.Tensor], pages_per_row: torch.Tensor) -> None:
        """Replace the contents with whole pages: pages[name] is [sum(pages_per_row), *field.shape], row-major."""
        self.clear()
        pages_per_row = pages_per_row.to(torch.long).cpu()
        width = int(pages_per_row.max()) if pages_per_row.numel() else 0
        self.table = torch.full((self.rows, width), -1, dtype=torch.long)
        self.lengths = pages_per_row * self.page_size
        ids = self.pool.alloc(int(pages_per_row.sum()))
        self.table[torch.arange(width).unsqueeze(0) < pages_per_row.unsqueeze(1)] = ids
        self.pool.write(ids, pages)

    def append(self, values: dict[str, torch.Tensor], counts: torch.Tensor) -> None:
        """Append `counts[r]` tokens to row r: values[name] is [rows, max(counts), *field.shape[1:]]."""
        counts = counts.to(torch.long).cpu()
        new_lengths = self.lengths + counts
        self._unshare_last_pages(counts)
        self._give_pages_for(new_lengths)
        row_idx, tok_idx = torch.nonzero(torch.arange(counts.max().item() if counts.numel() else 0).unsqueeze(0)
                                         < counts.unsqueeze(1), as_tuple=True)
        slot = self.lengths[row_idx] + tok_idx
        page = self.table[row_idx, slot // self.page_size]
        dev_rows, dev_toks = row_idx.to(self.pool.device), tok_idx.to(self.pool.device)
        self.pool.write_slots(page, slot % self.page_size,
                              {name: t.to(self.pool.device)[dev_rows, dev_toks] for name, t in values.items()})
        self.lengths = new_lengths

    def reserve_tokens(self, extra: int) -> None:
        """Give every row the pages to hold `extra` more tokens (past its length) and make its partly filled last
        page its own, so a decode segment can write tokens in place (`write_next`) without allocating.
        `release_unused` gives back what the segment did not fill."""
        self._unshare_last_pages(torch.ones(self.rows, dtype=torch.long))
        self._give_pages_for(self.lengths + extra)

    def _give_pages_for(self, lengths: torch.Tensor) -> None:
        """Allocate pages so that row r has room for `lengths[r]` tokens. A row's pages fill its table from the
        left, so every empty entry left of what it needs is a page to allocate (pages already reserved stay)."""
        need = (lengths + self.page_size - 1) // self.page_size
        self._ensure_table_width(int(need.max()) if need.numel() else 0)
        missing = (torch.arange(self.table.shape[1]).unsqueeze(0) < need.unsqueeze(1)) & (self.table < 0)
        if missing.any():
            self.table[missing] = self.pool.alloc(int(missing.sum()))

    def release_unused(self) -> None:
        """Give back the pages past each row's length (what `reserve_tokens` set aside and was not written)."""
        beyond = (torch.arange(self.table.shape[1]).unsqueeze(0) >= self.pages_per_row().unsqueeze(1)) & (self.table >= 0)
        if beyond.any():
            self.pool.release(self.table[beyond])
            self.table[beyond] = -1

    def write_next(self, values: dict[str, torch.Tensor], table: torch.Tensor, lengths: torch.Tensor) -> None:
        """Write one token per row at slot `lengths[r]` of its reserved pages and count it: values[name] is
        [rows, *field.shape[1:]]. `table` and `lengths` are this object's own (CPU) tensors or their device
        mirrors (the fast loop's); either is updated in place, with no allocation and no host synchronisation."""
        page = table.gather(1, (lengths // self.page_size).long().unsqueeze(1)).squeeze(1).long()
        offset = (lengths % self.page_size).long()
        self.pool.write_slots(page, offset, values)
        lengths += 1

    def _unshare_last_pages(self, counts: torch.Tensor) -> None:
        """Copy-on-write: a partly filled last page shared with a fork is copied before it is written."""
        partial = (self.lengths % self.page_size != 0) & (counts > 0)
        if not partial.any():
            return
        rows = torch.nonzero(partial).squeeze(1)
        last = self.table[rows, self.pages_per_row()[rows] - 1]
        shared = self.pool.refcount[last] > 1
        if shared.any():
            rows, last = rows[shared], last[shared]
            self.table[rows, self.pages_per_row()[rows] - 1] = self.pool.copy_page(last)
            self.pool.release(last)

    def pop_first_pages(self, rows: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """Detach the first (full) page of each given row, or its first `count` pages, and return their ids
        ([rows], or [rows, count] oldest first); the caller owns the references."""
        n = 1 if count is None else count
        first = self.table[rows, :n].clone()
        self.table[rows] = torch.cat([self.table[rows, n:], torch.full((len(rows), n), -1, dtype=torch.long)], 1)
        self.lengths[rows] -= n * self.page_size
        return first[:, 0] if count is None else first

    def push_pages(self, rows: torch.Tensor, ids: torch.Tensor) -> None:
        """Append full pages to the given rows (which must end on a page boundary): ids [rows] (one page each) or
        [rows, count] (in order)."""
        ids = ids.view(len(rows), -1)
        have = self.pages_per_row()[rows]
        self._ensure_table_width(int(have.max()) + ids.shape[1])
        self.table[rows.unsqueeze(1), have.unsqueeze(1) + torch.arange(ids.shape[1])] = ids
        self.lengths[rows] += ids.shape[1] * self.page_size

    def read(self, names: tuple[str, ...], page_chunk: int,
             alias: bool = False) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """Chunks of `page_chunk` pages per row, one at a time: ({name: [rows, pages, *shape]}, valid [rows, tokens]).
        With `alias`, a chunk whose pages lie in the pool at a constant stride (as a prefill allocates them) is a
        view of the pool instead of a copy: only for readers that finish before anything writes the pool."""
        width = self.table.shape[1]
        slot = torch.arange(width * self.page_size).view(width, self.page_size)
        for start in range(0, width, page_chunk):
            ids = self.table[:, start:start + page_chunk]
            valid = slot[start:start + page_chunk].flatten().unsqueeze(0) < self.lengths.unsqueeze(1)
            strided = _strided_run(ids) if alias else None
            if strided is not None:
                fields = {n: _pages_view(self.pool.tensors[n], ids.shape, *strided) for n in names}
            else:
                dev_ids = ids.clamp_min(0).to(self.pool.device)  # unused slots (-1) read page 0; `valid` hides them
                fields = {n: self._gather(self.pool.tensors[n], dev_ids) for n in names}
            yield fields, valid.to(self.pool.device)

    @staticmethod
    def _gather(tensor: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """tensor[ids], or zeros when the pool holds no page at all (a pool that `PagePool.trim` emptied while
        tables keep their width)."""
        return tensor[ids] if tensor.shape[0] else tensor.new_zeros((*ids.shape, *tensor.shape[1:]))

    def defragment(self) -> None:
        """Move this object's pages to the lowest ids of its pool so `PagePool.trim` can give the rest back.

        Only when it is the pool's sole user (no fork shares a page): otherwise other tables would go stale.
        """
        ids, pool = self.page_ids(), self.pool
        n = int(ids.numel())
        if int((pool.refcount > 0).sum()) != n or bool((pool.refcount[ids] != 1).any()):
            return
        high = ids[ids >= n]
        if high.numel() == 0:
            return
        low = torch.tensor(sorted(i for i in pool.free if i < n), dtype=torch.long)  # exactly len(high) of them
        src, dst = high.to(pool.device), low.to(pool.device)
        for tensor in pool.tensors.values():
            tensor[dst] = tensor[src]
        with torch.inference_mode():  # see `PagePool.release`
            pool.refcount[low], pool.refcount[high] = 1, 0
        remap = torch.arange(pool.capacity)
        remap[high] = low
        used = self.table >= 0
        self.table[used] = remap[self.table[used]]
        pool.free = sorted(set(pool.free) - set(low.tolist()) | set(high.tolist()))

    def fork(self) -> "PagedRows":
        """A copy-on-write child: same pages (reference counted), own tables."""
        child = PagedRows(self.pool, self.rows)
        child.table, child.lengths = self.table.clone(), self.lengths.clone()
        self.pool.retain(self.page_ids())
        return child

    def __del__(self) -> None:
        # A dropped fork gives its page references back, so pages only it held return to the free list.
        try:
            self.pool.release(self.page_ids())
        except Exception:  # interpreter shutdown: nothing left to give back to
            pass

    def clear(self) -> None:
        self.pool.release(self.page_ids())
        self.table = torch.full((self.rows, 0), -1, dtype=torch.long)
        self.lengths = torch.zeros(self.rows, dtype=torch.long)


def _strided_run(ids: torch.Tensor) -> tuple[int, int] | None:
    """(first page, pages between rows) when page ids [rows, pages] are first + row * step + column, else None."""
    if ids.numel() == 0 or bool((ids < 0).any()):
        return None
    first = int(ids[0, 0])
    step = int(ids[1, 0]) - first if ids.shape[0] > 1 else ids.shape[1]
    if step < ids.shape[1]:
        return None
    expected = first + torch.arange(ids.shape[0]).unsqueeze(1) * step + torch.arange(ids.shape[1])
    return (first, step) if torch.equal(ids, expected) else None


def _pages_view(tensor: torch.Tensor, shape: torch.Size, first: int, step: int) -> torch.Tensor:
    """tensor[first + row * step + column] for [rows, pages] as a view of the pool tensor [pool pages, ...]."""
    stride = tensor.stride()
    return tensor.as_strided((*shape, *tensor.shape[1:]), (step * stride[0], *stride),
                             tensor.storage_offset() + first * stride[0])
