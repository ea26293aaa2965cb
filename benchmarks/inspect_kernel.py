"""Compile the decode kernels for an H100/H200 (sm_90) on a machine without a GPU and report what the profiler would
start from: registers per thread and spills (ptxas), shared memory per block, whether the page loads are
asynchronous copies (pipelined through shared memory), and the SASS instructions of the page loop (nvdisasm).
Triton's wheel ships ptxas and nvdisasm, so this needs no CUDA device.

    python benchmarks/inspect_kernel.py                      # every fast kernel at Llama-3.1-8B decode shapes
    python benchmarks/inspect_kernel.py --warps 4 --stages 2 --dump /tmp/ttgir   # other launch; keep the TTGIR
    python benchmarks/inspect_kernel.py --estimate --dim 64 --group 3   # the sparse prefill's low-bit estimate
    python benchmarks/inspect_kernel.py --sparse --dim 64 --group 3     # the sparse prefill's kernel, per launch

Registers and instruction counts are not times: compare launches on a GPU (`benchmarks/decode_kernel.py
--sweep-only`). This is for reading the compiler's choices between device sessions (e.g. a float16 tile stored to
shared memory and read back per page).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from kvfold.kernels.decode import COLUMNS_UP_TO, FAST_LAUNCH, PACKED_LAUNCH, SCALED_LAUNCH  # noqa: E402
from kvfold.kernels.fast_decode import full_pages_kernel  # noqa: E402
from kvfold.kernels.float8_decode import float8_columns_kernel  # noqa: E402
from kvfold.kernels.packed_decode import kivi_columns_kernel, kivi_pages_kernel  # noqa: E402

COMMON = dict(q_ptr="*bf16", table_ptr="*i32", len_ptr="*i32", pos_ptr="*i32", m_ptr="*fp32", l_ptr="*fp32",
              acc_ptr="*fp32", width="i32", splits="i32", qpos_ptr="*i32", window="i32", scale="fp32")


def compile_for_hopper(kernel, signature: dict, constants: dict, launch: dict):
    """triton.compile for sm_90 with every pointer 16-byte aligned (as torch allocates them)."""
    names = kernel.arg_names
    full = {**signature, **{name: "constexpr" for name in constants}}
    full = {name: full[name] for name in names if name in full}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(full) if full[name].startswith("*")}
    return triton.compile(ASTSource(kernel, full, constexprs=constants, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                          options=launch)


def ptxas_report(compiled) -> str:
    ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        out = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", ptx.name, "-o", "/dev/null"],
                             capture_output=True, text=True).stderr
    registers = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores", out)
    used, spilled = (match.group(1) if match else "?" for match in (registers, spills))
    return f"{used:>4s} registers, {spilled:>4s} B spilled"


def loop_instructions(compiled, every: bool = False):
    """SASS instructions in the kernel's longest loop (the page loop), from ptxas and nvdisasm (Triton's wheel);
    `every`: each loop's count and its I2F and MUFU instructions (quarter-rate), in program order."""
    tools = Path(triton.__file__).parent / "backends/nvidia/bin"
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "k.ptx").write_text(compiled.asm["ptx"])
        subprocess.run([str(tools / "ptxas"), "--gpu-name", "sm_90a", f"{folder}/k.ptx", "-o", f"{folder}/k.cubin"],
                       check=True, capture_output=True)
        sass = subprocess.run([str(tools / "nvdisasm"), "-c", f"{folder}/k.cubin"], capture_output=True,
                              text=True, check=True).stdout
    labels, lines = {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(lines)
        elif re.search(r"/\*[0-9a-f]{4}\*/", line):
            lines.append(line)
    loops = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)) and labels.get(m.group(1), i) < i]
    if every:
        return [(end - start + 1, sum(" I2F" in line for line in lines[start:end + 1]),
                 sum("MUFU" in line for line in lines[start:end + 1])) for start, end in loops]
    return max((end - start + 1 for start, end in loops), default=0)


def cases(page: int, group: int, dim: int, tile_tokens: int = 0):
    """(label, kernel, signature, constants, default launch) for each fast kernel's store kind."""
    shape = dict(G=group, D=dim, PAGES_PER_SPLIT=64, WINDOWED=False)
    block_g = max(16, triton.next_power_of_2(group))
    tile = max(1, tile_tokens // page)
    for label, dtype, scaled in (("bf16 pages", "bf16", 0), ("fp8, scale/token", "fp8e4nv", 1),
                                 ("fp8, scale/page", "fp8e4nv", 2)):
        scales = "*fp16" if scaled else "*i32"
        yield (label, full_pages_kernel, {**COMMON, "k_ptr": "*" + dtype, "v_ptr": "*" + dtype, "ks_ptr": scales,
                                          "vs_ptr": scales},
               {**shape, "BLOCK_G": block_g, "P": page, "SCALED": scaled, "TILE": tile},
               SCALED_LAUNCH if scaled else FAST_LAUNCH)
        if scaled:  # what `paged_decode` picks for float8 pages at GQA <= 8
            yield (f"{label} (columns)", float8_columns_kernel,
                   {**COMMON, "k_ptr": "*" + dtype, "v_ptr": "*u16", "ks_ptr": scales, "vs_ptr": scales},
                   {**shape, "BLOCK_G": max(8, triton.next_power_of_2(group)), "P": page, "SCALED": scaled,
                    "E5M2": False, "ASM": True, "ASYNC_SCALES": 1, "PAGE_IDS": False, "STEP": 0}, PACKED_LAUNCH)  # ASTSource applies no defaults
            if page > 32:  # launch STEP=32, PAGE_IDS=1: half a page a step, two buffers in one page's shared memory
                yield (f"{label} (columns, 32 a step)", float8_columns_kernel,
                       {**COMMON, "k_ptr": "*" + dtype, "v_ptr": "*u16", "ks_ptr": scales, "vs_ptr": scales},
                       {**shape, "BLOCK_G": max(8, triton.next_power_of_2(group)), "P": page, "SCALED": scaled,
                        "E5M2": False, "ASM": True, "ASYNC_SCALES": 1, "PAGE_IDS": True, "STEP": 32}, PACKED_LAUNCH)
    for bits in (4, 2):
        for key_token in (False, True):
            label = f"{'kv4' if key_token else 'kivi'}:{bits}"
            value_group = dim if key_token else min(64, dim)  # KV4: a value scale per token; KIVI: groups of 64
            word = "*u16" if bits >= 4 and dim * bits % 16 == 0 and dim * bits // 16 >= 16 else "*u8"  # `decode.packed_words`
            signature = {**COMMON, "k_ptr": word, "v_ptr": word, "ks_ptr": "*fp16", "kz_ptr": "*fp16",
                         "ksm_ptr": "*fp16" if key_token else "*i32", "vs_ptr": "*fp16", "vz_ptr": "*fp16",
                         "vch_ptr": "*i32"}
            pairs = triton.next_power_of_2(group * dim // value_group)
            constants = {**shape, "P": page, "BITS": bits, "VG": value_group, "KEY_TOKEN": key_token,
                         "PAGE_TOKENS": 0, "P_PAD": 0, "VALUE_CHANNEL": False, "ASM": True, "FOLD": True}
            if pairs <= COLUMNS_UP_TO:  # what `paged_decode` picks at these shapes
                columns = {**constants, "BLOCK_G": max(8, pairs), "KEY_FOLD": True,
                           "ASYNC_SCALES": 0 if key_token and bits == 2 else 3, "PAGE_IDS": True}  # as `decode._partials` launches it
                words = bits == 2 and dim * bits // 16 >= 16  # on CUDA 2-bit codes are read as 16-bit words
                read = {**signature, "k_ptr": "*u16", "v_ptr": "*u16"} if words else signature
                yield label, kivi_columns_kernel, read, columns, PACKED_LAUNCH
                if page > 32:  # launch STEP=32: half a page a step
                    yield f"{label} (32 a step)", kivi_columns_kernel, read, {**columns, "STEP": 32}, PACKED_LAUNCH
                if words:  # launch WORDS=0: bytes of 4 fields
                    yield f"{label} (bytes)", kivi_columns_kernel, signature, columns, PACKED_LAUNCH
            value_groups = dim // value_group
            if value_groups > 1 and triton.next_power_of_2(group) <= COLUMNS_UP_TO:  # launch GROUP_ROWS=1 (bytes: a
                # group's value dot needs 16 words)
                rows = {**constants, "BLOCK_G": max(8, triton.next_power_of_2(group)), "KEY_FOLD": True,
                        "ASYNC_SCALES": 3, "PAGE_IDS": True, "GROUP_ROWS": True}
                yield f"{label} (value groups as rows)", kivi_columns_kernel, signature, rows, PACKED_LAUNCH
            yield (f"{label} (rows)", kivi_pages_kernel, signature,
                   {**constants, "BLOCK_G": max(16, pairs), "PAGE_IDS": False}, PACKED_LAUNCH)


def estimate_cases(group: int, dim: int, rows: int, extra: dict):
    """The low-bit estimate's kernel (`kernels.estimate`) at its default launch (and `extra`'s overrides): 4-bit codes
    as float8 or int8, each reduce."""
    from kvfold.kernels.estimate import ESTIMATE_LAUNCH, pair_tiles

    options = {**ESTIMATE_LAUNCH, **extra}
    launch = {name: value for name, value in options.items() if name in ("num_warps", "num_stages", "maxnreg")}
    for codes in ("fp8e4nv", "i8"):
        signature = dict(qc_ptr="*" + codes, qs_ptr="*fp32", kc_ptr="*" + codes, ks_ptr="*fp32", mass_ptr="*fp32",
                         scratch_ptr="*fp32", taken_ptr="*i32", tokens="i32", blocks="i32", tiles="i32", heads="i32",
                         first_tile="i32", scale_log2="fp32")
        for reduce in ("sum", "max"):
            pairs, span = pair_tiles(rows, group, options["PAIRS"])  # as `lowbit_block_mass_triton` tiles
            constants = dict(GROUP=group, ROWS=rows, D=dim, BLOCK=64, INTERPRETED_BLOCKS=0, INTERPRETED_TILES=0,
                             PAIRS=pairs, SPAN=span, PERSISTENT=bool(options["PERSISTENT"]),
                             PREFETCH=bool(options["PREFETCH"]),
                             MAX=reduce == "max")
            yield f"estimate {'float8' if codes[0] == 'f' else 'int8'} codes, {reduce}", signature, constants, launch


def inspect_sparse(group: int, dim: int, warps: int | None, stages: int | None) -> None:
    """The sparse prefill's kernel (`kernels.sparse`, 64-token blocks, bf16) at each launch option: registers, and
    per loop its instructions and MUFU (exponential) instructions; the listed blocks' loop is the longest."""
    from kvfold.kernels.sparse import _sparse_kernel

    signature = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", picks_ptr="*i32", counts_ptr="*i32",
                     diagonal_ptr="*i8", out_ptr="*bf16", overflow_ptr="*i8", tokens="i32", blocks="i32", scale="fp32")
    launch = {"num_warps": warps or 4, "num_stages": stages or 3}
    print(f"sm_90, triton {triton.__version__}; GQA {group}, head_dim {dim}, 64-token blocks, {launch}")
    for label, options in (("FOLD", {"FOLD": True}), ("no FOLD", {"FOLD": False}),
                           ("LAZY", {"FOLD": True, "LAZY": True}), ("PAIRED", {"FOLD": True, "PAIRED": True}),
                           ("ANCHORED (default)", {"FOLD": True, "ANCHORED": True})):
        constants = dict(Q_HEADS=group * 2, GROUP=group, D=dim, BLOCK=64, INTERPRETED_BLOCKS=0, FOLD=False,
                         LAZY=False, PAIRED=False, ANCHORED=False, RETRY=False)
        compiled = compile_for_hopper(_sparse_kernel, signature, {**constants, **options}, launch)
        loops = ", ".join(f"{count} ({mufu} MUFU)" for count, _, mufu in loop_instructions(compiled, every=True))
        print(f"{label:18s} {ptxas_report(compiled)}, {compiled.metadata.shared:6d} B shared; loops: {loops}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--page", type=int, default=64, help="tokens per page")
    parser.add_argument("--group", type=int, default=4, help="query heads per KV head")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--warps", type=int, help="override every kernel's default launch")
    parser.add_argument("--stages", type=int)
    parser.add_argument("--dump", type=Path, help="write each kernel's TTGIR here")
    parser.add_argument("--tile-tokens", type=int, default=0, help="16-bit/float8 pages: tokens read per step "
                        "(`paged_decode(tile_tokens=)`; 0: one page)")
    parser.add_argument("--only", default="", help="only the kernels whose label contains this")
    parser.add_argument("--estimate", action="store_true", help="the sparse prefill's low-bit estimate kernel instead "
                        "(its loops: the anchors, the key blocks before the diagonal, the diagonal ones, the shares)")
    parser.add_argument("--sparse", action="store_true", help="the sparse prefill's block-sparse kernel instead, "
                        "at 64-token blocks, for each launch option (FOLD, LAZY, PAIRED, ANCHORED)")
    parser.add_argument("--rows", type=int, default=4, help="--estimate: sampled queries per block")
    parser.add_argument("--pairs", type=int, default=0, help="--estimate: (query block, head) pairs a program")
    args = parser.parse_args()
    if args.sparse:
        inspect_sparse(args.group, args.dim, args.warps, args.stages)
        return
    if args.estimate:
        from kvfold.kernels.estimate import _lowbit_mass_kernel

        extra = {**({"num_warps": args.warps} if args.warps else {}), **({"num_stages": args.stages} if args.stages
                                                                         else {}), **({"PAIRS": args.pairs} if args.pairs else {})}
        print(f"sm_90, triton {triton.__version__}; GQA {args.group}, head_dim {args.dim}, {args.rows} sampled rows "
              f"per block, {extra or 'default launch'}")
        for label, signature, constants, launch in estimate_cases(args.group, args.dim, args.rows, extra):
            compiled = compile_for_hopper(_lowbit_mass_kernel, signature, constants, launch)
            loops = ", ".join(f"{count} ({i2f} I2F, {mufu} MUFU)" for count, i2f, mufu in
                              loop_instructions(compiled, every=True))
            print(f"{label:28s} {ptxas_report(compiled)}, {compiled.metadata.shared:6d} B shared; loops: {loops}")
        return
    print(f"sm_90, triton {triton.__version__}; {args.page}-token pages, GQA {args.group}, head_dim {args.dim}"
          + (f", {args.tile_tokens} tokens per step" if args.tile_tokens else ""))
    for label, kernel, signature, constants, launch in cases(args.page, args.group, args.dim, args.tile_tokens):
        if args.only not in label:
            continue
        launch = {**launch, **({"num_warps": args.warps} if args.warps else {}),
                  **({"num_stages": args.stages} if args.stages else {})}
        compiled = compile_for_hopper(kernel, signature, constants, launch)
        ttgir = compiled.asm["ttgir"]
        print(f"{label:18s} {launch['num_warps']} warps, {launch['num_stages']} stages: {ptxas_report(compiled)}, "
              f"{compiled.metadata.shared:6d} B shared, {ttgir.count('async_copy_global_to_local')} async copies, "
              f"{loop_instructions(compiled)} instructions in the page loop")
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            name = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
            (args.dump / f"{name}.ttgir").write_text(ttgir)


if __name__ == "__main__":
    main()
