"""The fast decode path: decode steps that touch only the GPU, so they can be captured in a CUDA graph.

The normal decode step does host work in every layer (it compacts the new token, grows page tables, copies them
to the device, packs groups). Here the work is split on a clock shared by all rows:
- a *segment* of steps: every layer writes each new token in place into pages reserved beforehand
  (`PagedRows.reserve_tokens`), through device mirrors of its page tables and lengths, and the Triton kernel reads
  those mirrors. No allocation, no host synchronisation: one captured graph replays the whole model step;
- at the segment's end, the host catches up: lengths come back, unused reserved pages are given back, and the
  clocked work of the normal path runs (`KVFoldLayer.after_decode`: packing every `group` tokens, decode-time
  eviction every `every` tokens). Segments end exactly where that clock ticks, so the fast path stores and reads
  the same tokens as the normal one and greedy decoding gives the same tokens.
The pools are grown once before the loop (`PagePool.reserve`), so the tensors a graph reads never move; if they do
(a bound was too small) the mirrors are rebuilt and the graph captured again.
Where the kernel cannot run (CPU, `KVFOLD_KERNELS=reference`) the same segments run eagerly and the reference reads
the CPU tables, which the steps update in place.
"""

from __future__ import annotations

import math

import torch

from .kernels import use_triton

Mirrors = dict[str, tuple[torch.Tensor, torch.Tensor]]


class FastLayer:
    """One layer's state during the fast loop; `kvfold_attention` hands decode steps to `step`."""

    def __init__(self, layer, q_pos: torch.Tensor, widths: dict[str, int]) -> None:
        from .kernels.decode import supports

        self.layer, self.q_pos, self.widths = layer, q_pos, widths
        self.use_kernel = (use_triton(layer.device) and layer.kernel_readable
                           and supports(layer.kernel_parts(), layer.head_dim))
        self.mirrors: Mirrors = {}
        self.parts: list | None = None
        self._pointers: tuple[int, ...] = ()

    def begin(self, steps: int) -> bool:
        """Prepare `steps` in-place steps; False when a captured graph must be captured again (mirrors or pools
        moved)."""
        layer = self.layer
        layer.full.reserve_tokens(steps)
        if not self.use_kernel:
            return True
        stable = True
        for name, rows in layer.stores():
            table, lengths = self.mirrors.get(name, (None, None))
            if table is None or table.shape[1] < rows.table.shape[1]:
                width = max(self.widths.get(name, 0), rows.table.shape[1])
                table = torch.empty(rows.rows, width, dtype=torch.int32, device=layer.device)
                lengths = torch.empty(rows.rows, dtype=torch.int32, device=layer.device)
                self.mirrors[name], stable = (table, lengths), False
            table.fill_(-1)
            table[:, :rows.table.shape[1]].copy_(rows.table)
            lengths.copy_(rows.lengths)
        pointers = self._pool_pointers()
        stable &= pointers == self._pointers
        self._pointers = pointers
        self.parts = layer.kernel_parts(self.mirrors)
        return stable

    def refresh(self) -> bool:
        """Rebuild the kernel's view of the pools when they moved since `begin`: another cache that shares them (a
        fork of the same prefix) grew or trimmed them. Call before a step whenever others changed them; True when
        they had moved."""
        if not self.use_kernel:
            return False
        pointers = self._pool_pointers()
        if pointers == self._pointers:
            return False
        self._pointers = pointers
        self.parts = self.layer.kernel_parts(self.mirrors)
        return True

    def _pool_pointers(self) -> tuple[int, ...]:
        """Where the layer's pool tensors live now: the kernel parts hold these tensors, so a move needs new parts."""
        return tuple(t.data_ptr() for pool in self.layer.pools() for t in pool.tensors.values())

    def step(self, staged, query: torch.Tensor, scale: float) -> torch.Tensor:
        """Store one token per row in place and attend over the store: [batch, 1, q_heads, dim]."""
        layer = self.layer
        batch, heads, _, dim = staged.keys.shape
        rows = batch * heads
        positions = self.q_pos.to(layer.device)
        token = layer.token_rows(staged, positions)
        if not self.use_kernel:
            layer.full.write_next(token, layer.full.table, layer.full.lengths)
            layer._remember_queries(query, positions)
            return layer.attend(query, positions, scale)
        from .kernels.decode import paged_decode, write_tokens

        table, lengths = self.mirrors["full"]
        write_tokens(layer.full.pool.tensors, table, lengths, token["k"], token["v"], positions)  # one kernel
        layer._remember_queries(query, positions)
        q_heads = query.shape[1]
        out = paged_decode(query.reshape(rows, q_heads // heads, dim), self.parts, positions, scale,
                           layer.sliding_window, out_dtype=query.dtype)
        return out.view(batch, q_heads, 1, dim).transpose(1, 2)

    def end(self, steps: int, seen: int) -> None:
        """The host catches up after `steps` steps that brought the sequence to `seen` tokens."""
        layer = self.layer
        if self.use_kernel:
            layer.full.lengths = self.mirrors["full"][1].cpu().long()
        layer.seen = seen
        layer.valid_seen += steps
        layer.peak_row_tokens = max(layer.peak_row_tokens, int(layer.row_lengths().max()))
        layer.full.release_unused()
        layer.after_decode(steps)
        if layer.is_sliding:
            layer._drop_out_of_window()


def joint_key(layer) -> tuple | None:
    """What layers of different caches must share to decode as one (`joint_step`): the method, the very pools
    (a `pages.PoolSet`'s) and the stores. None for a layer that cannot join: no fast state, no kernel, or a
    sliding window (the kernel reads one query position for every row)."""
    fast = layer.fast
    if fast is None or not fast.use_kernel or layer.is_sliding:
        return None
    return (layer.compressor.spec, tuple(id(pool) for pool in layer.pools()), tuple(n for n, _ in layer.stores()))


def joint_step(layers: list, keys: torch.Tensor, values: torch.Tensor, query: torch.Tensor,
               scale: float) -> torch.Tensor:
    """`FastLayer.step` of one layer of several caches (batch 1 each, equal `joint_key`s) at once: one kernel writes
    every row's token, one `paged_decode` reads every row's store, through the members' page tables side by side.
    keys, values [n, kv_heads, 1, dim] and query [n, q_heads, 1, dim], member i in row i; returns
    [n, 1, q_heads, dim]. Each member's own length mirror is then brought up to date, so its clock goes on alone.
    The read is batch-invariant (`paged_decode(batch_invariant=True)`): a member's output, bit for bit, does not
    depend on who else is in the step, so a request's greedy answer does not either (beyond the model's matmuls)."""
    from .kernels.decode import paged_decode, write_tokens

    fasts, first = [layer.fast for layer in layers], layers[0]
    n, heads, _, dim = keys.shape
    rows = n * heads
    mirrors = {}
    for name, _ in first.stores():
        tables = [fast.mirrors[name][0] for fast in fasts]
        width = max(table.shape[1] for table in tables)
        tables = [t if t.shape[1] == width else torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-1)
                  for t in tables]
        mirrors[name] = (torch.cat(tables), torch.cat([fast.mirrors[name][1] for fast in fasts]))
    q_pos = torch.cat([fast.q_pos for fast in fasts])
    positions = q_pos if n == 1 else q_pos.repeat_interleave(heads)  # one per row
    write_tokens(first.full.pool.tensors, *mirrors["full"], keys.reshape(rows, dim), values.reshape(rows, dim),
                 positions)
    for fast, lengths in zip(fasts, mirrors["full"][1].split(heads)):
        fast.mirrors["full"][1].copy_(lengths)
    for i, layer in enumerate(layers):
        layer._remember_queries(query[i:i + 1], fasts[i].q_pos)
    q_heads = query.shape[1]
    out = paged_decode(query.reshape(rows, q_heads // heads, dim), first.kernel_parts(mirrors), q_pos[:1], scale,
                       out_dtype=query.dtype, batch_invariant=True)
    return out.view(n, q_heads, 1, dim).transpose(1, 2)


def run_then_capture(device: torch.device, stream: torch.cuda.Stream, layers: list, run, run_static
                     ) -> tuple[torch.Tensor, torch.cuda.CUDAGraph | None, torch.Tensor | None, Exception | None]:
    """Run a model step eagerly on `stream` (the step's real work; Triton compiles, cuBLAS gets its workspace),
    then capture `run_static` (the same step on the static inputs a replay reads) into a CUDA graph. Capturing runs
    nothing, but the captured forward advanced the layers' `seen` counters: they are put back. Returns the eager
    step's logits, then the graph and its output, or (None, None, the error) when the capture failed."""
    current = torch.cuda.current_stream(device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        logits = run().clone()
    current.wait_stream(stream)
    seen = [layer.seen for layer in layers]
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=stream):
            output = run_static()
    except Exception as error:  # noqa: BLE001  an unsupported model: the caller decodes eagerly
        return logits, None, None, error
    finally:
        for layer, value in zip(layers, seen):
            layer.seen = value
    return logits, graph, output, None


def tail_bound(layer, max_steps: int) -> int:
    """The most full-precision tokens a row's tail will hold during `max_steps` more steps."""
    quantizer = layer.compressor.quantizer
    now = int(layer.full.lengths.max()) if layer.full.rows else 0
    if quantizer is None:
        return now + max_steps
    return max(now, quantizer.residual, quantizer.group - 1) + min(max_steps, quantizer.group)


def prepare(layers: list, q_pos: torch.Tensor, max_steps: int) -> list[FastLayer]:
    """Grow each layer's pools once for `max_steps` steps and attach a `FastLayer` to it."""
    fast = []
    for layer in layers:
        size, rows = layer.full.page_size, layer.full.rows
        quantizer = layer.compressor.quantizer
        widths = {"full": math.ceil(tail_bound(layer, max_steps) / size) + 1}
        # new tail tokens a row can hold at once: all of them, or a group before it is packed
        written = max_steps if quantizer is None else min(max_steps, quantizer.group)
        layer.full.pool.reserve(rows * (math.ceil(written / size) + 2))
        if layer.packed is not None:
            group = layer.packed.page_size
            widths["packed"] = layer.packed.table.shape[1] + math.ceil(max_steps / group) + 1
            layer.packed.pool.reserve(rows * (math.ceil(max_steps / group) + 1))
        layer.fast = FastLayer(layer, q_pos, widths)
        fast.append(layer.fast)
    return fast


def segment_length(layers: list, seen: int, left: int) -> int:
    """Steps until the next clock tick of any layer (a packing or re-compression), at most `left`."""
    steps = left
    for layer in layers:
        quantizer, every = layer.compressor.quantizer, layer.compressor.scorer.every
        for period in (quantizer.group if quantizer else 0, every):
            if period:
                steps = min(steps, period - seen % period)
    return max(1, steps)


class Segments:
    """The fast loop's clock for one cache: `begin` before each model step (a segment's in-place steps are prepared
    when one is due), `advance` after it (the host catches up where the segment ends), `close` when decoding stops.
    `q_pos` [1] (int32, on `device`) is the position of the token being stored, which the kernels read in place."""

    def __init__(self, layers: list, device, max_steps: int) -> None:
        self.layers = layers
        self.seen = layers[0].seen
        self.q_pos = torch.full((1,), self.seen, dtype=torch.int32, device=device)
        self.fast = prepare(layers, self.q_pos, max_steps)
        self.left, self.in_segment, self.done = max_steps, 0, 0

    def begin(self) -> bool:
        """Before a step: start a segment if one is due. False when it moved what a captured graph reads."""
        if self.in_segment:
            return True
        self.in_segment = segment_length(self.layers, self.seen, self.left)
        return all([fast.begin(self.in_segment) for fast in self.fast])

    def refresh(self) -> bool:
        """Before a step, after other caches sharing these pools began their segments (see `FastLayer.refresh`).
        True when a pool moved (what a captured graph reads changed)."""
        return any([fast.refresh() for fast in self.fast])

    def advance(self) -> None:
        """After a step: one more token stored in every layer; at a segment's end the host catches up."""
        self.seen += 1
        self.q_pos += 1
        self.left, self.in_segment, self.done = self.left - 1, self.in_segment - 1, self.done + 1
        if self.in_segment == 0:
            self._end_segment()

    def _end_segment(self) -> None:
        for fast in self.fast:
            fast.end(self.done, self.seen)
        self.done = 0

    def close(self) -> None:
        """End a segment cut short, detach the fast state from the layers and give back unused reserve."""
        if self.done:
            self._end_segment()
        detach(self.layers)
        give_back_reserve(self.layers)


def detach(layers: list) -> None:
    for layer in layers:
        layer.fast = None


def give_back_reserve(layers: list) -> None:
    """After the loop: shrink pools whose reserve is still mostly free (more than an eighth of their pages), so a
    short generation does not leave the cache holding room for tokens it never wrote."""
    for layer in layers:
        for pool in layer.pools():
            if len(pool.free) * 8 > pool.capacity:
                pool.trim()
