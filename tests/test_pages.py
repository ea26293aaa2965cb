import torch

from kvfold.pages import Field, PagedRows, PagePool


def make_rows(rows=3, page=4, dim=2):
    pool = PagePool({"x": Field((page, dim), torch.float32)}, page, torch.device("cpu"))
    return PagedRows(pool, rows)


def read_rows(paged: PagedRows) -> list[torch.Tensor]:
    fields, valid = next(paged.read(("x",), page_chunk=max(1, paged.table.shape[1])))
    flat = fields["x"].flatten(1, 2)
    return [flat[r][valid[r]] for r in range(paged.rows)]


def test_ragged_fill_allocates_exactly_the_pages_needed():
    paged = make_rows()
    data = torch.randn(3, 9, 2)
    paged.fill({"x": data}, torch.tensor([9, 1, 0]))
    assert paged.pool.capacity == 3 + 1 + 0  # ceil(9/4), ceil(1/4), nothing for an empty row
    rows = read_rows(paged)
    assert torch.equal(rows[0], data[0]) and torch.equal(rows[1], data[1, :1]) and rows[2].numel() == 0


def test_append_fills_the_last_page_then_takes_new_ones():
    paged = make_rows()
    first = torch.randn(3, 3, 2)
    paged.fill({"x": first}, torch.tensor([3, 3, 3]))
    more = torch.randn(3, 2, 2)
    paged.append({"x": more}, torch.tensor([2, 1, 0]))
    assert paged.lengths.tolist() == [5, 4, 3]
    assert paged.pool.capacity == 4  # only row 0 crossed a page boundary
    rows = read_rows(paged)
    assert torch.equal(rows[0], torch.cat([first[0], more[0]]))
    assert torch.equal(rows[1], torch.cat([first[1], more[1, :1]]))


def test_fork_shares_pages_and_copies_only_on_write():
    paged = make_rows(rows=1)
    data = torch.randn(1, 6, 2)
    paged.fill({"x": data}, torch.tensor([6]))
    child = paged.fork()
    assert paged.pool.capacity == 2 and paged.pool.refcount.tolist() == [2, 2]
    child.append({"x": torch.ones(1, 1, 2)}, torch.tensor([1]))  # writes into the shared, partly filled page
    assert paged.pool.capacity == 3  # one copied page, the full first page still shared
    assert torch.equal(read_rows(paged)[0], data[0])
    assert torch.equal(read_rows(child)[0], torch.cat([data[0], torch.ones(1, 2)]))
    child.clear()
    assert paged.pool.refcount.tolist()[:2] == [1, 1] and len(paged.pool.free) == 1


def test_released_pages_are_reused():
    paged = make_rows(rows=2)
    paged.fill({"x": torch.randn(2, 8, 2)}, torch.tensor([8, 8]))
    paged.fill({"x": torch.randn(2, 4, 2)}, torch.tensor([4, 4]))
    assert paged.pool.capacity == 4 and len(paged.pool.free) == 2


def test_a_dropped_fork_gives_its_pages_back():
    paged = make_rows(rows=1)
    paged.fill({"x": torch.randn(1, 6, 2)}, torch.tensor([6]))
    child = paged.fork()
    child.append({"x": torch.ones(1, 5, 2)}, torch.tensor([5]))  # one copied page, one new page
    assert paged.pool.capacity == 4
    del child
    assert paged.pool.refcount.tolist() == [1, 1, 0, 0] and sorted(paged.pool.free) == [2, 3]


def test_aliased_reads_view_pages_at_a_constant_stride_and_copy_the_rest():
    """`read(alias=True)`: where a chunk's page ids are first + row * step + column (a prefill's layout) the chunk is
    a view of the pool, elsewhere (a page appended later, an unused slot) a copy; both read the same values."""
    paged = make_rows(rows=3, page=4)
    paged.fill({"x": torch.randn(3, 16, 2)}, torch.tensor([16, 16, 16]))  # 4 pages a row, rows 4 pages apart
    paged.append({"x": torch.randn(3, 1, 2)}, torch.tensor([1, 0, 1]))  # a fifth page for rows 0 and 2 only
    pool = paged.pool.tensors["x"]
    copied = list(paged.read(("x",), page_chunk=2))
    aliased = list(paged.read(("x",), page_chunk=2, alias=True))
    assert len(aliased) == 3
    for (a, valid_a), (c, valid_c) in zip(aliased, copied):
        assert torch.equal(valid_a, valid_c)
        assert torch.equal(a["x"][valid_a.view_as(a["x"][..., 0])], c["x"][valid_c.view_as(c["x"][..., 0])])
    shares = [a["x"].untyped_storage().data_ptr() == pool.untyped_storage().data_ptr() for a, _ in aliased]
    assert shares == [True, True, False]  # pages 0-1 and 2-3 of every row are views; the ragged fifth a copy


def test_a_pool_set_gives_one_pool_per_key_and_format_and_counts_used_pages():
    """`PoolSet`: caches asking for the same (layer, store) and page format share one pool; another format or key
    gets its own. A shared pool's free pages are anyone's room: `used_nbytes` leaves them out, `nbytes` does not."""
    from kvfold.pages import PoolSet

    pools = PoolSet()
    fields = {"x": Field((4, 2), torch.float32)}
    cpu = torch.device("cpu")
    first = pools.pool((0, "full"), fields, 4, cpu)
    assert pools.pool((0, "full"), dict(fields), 4, cpu) is first and first.shared
    assert pools.pool((1, "full"), fields, 4, cpu) is not first
    assert pools.pool((0, "full"), {"x": Field((4, 2), torch.float16)}, 4, cpu) is not first
    a, b = PagedRows(first, 2), PagedRows(first, 2)
    a.fill({"x": torch.randn(2, 8, 2)}, torch.tensor([8, 5]))
    b.fill({"x": torch.randn(2, 3, 2)}, torch.tensor([3, 1]))
    page, counts = 4 * 2 * 4, first.refcount.numel() * 4
    assert first.capacity == 6 and first.used_nbytes() == 6 * page + counts
    a.clear()
    assert first.capacity == 6 and first.used_nbytes() == 2 * page + counts and first.nbytes() == 6 * page + counts
    assert pools.nbytes() == sum(pool.nbytes() for pool in pools.pools())
