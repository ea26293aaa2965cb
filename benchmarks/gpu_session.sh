#!/usr/bin/env bash
# One GPU session's work in one command (the device tool allows ~10 minutes a command, 30 a session):
# the kernel tests compiled, then the kernel benchmarks and the end-to-end decode loop, each writing
# $OUT/<name>.json and .md. Usage on the device: OUT=... bash benchmarks/gpu_session.sh [tests|prefill-tests|decode|grid|decode-fast|decode-gqa8|ragged|fp8-columns|columns-tall|async-scales|fp8-page-scales|registers|page-ids|page-ids-next|words|steps|profile|few|prefill|sparse|estimate|lowbit|group-rows|e2e|e2e8|chunked|agreement|serve|peer]...
# (no argument: all five, in that order; each step has its own time limit so one slow step cannot eat the rest).
set -u
export TRITON_INTERPRET=0 PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kvfold_gpu}
mkdir -p "$OUT"
steps=("$@")
carry_wheels() {
  # The device has no network: packages it lacks travel as wheels in benchmarks/captured/wheels (carried, not
  # committed; made with `pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64
  # --platform manylinux_2_28_x86_64 -d benchmarks/captured/wheels fastapi uvicorn openai httpx prometheus-client`
  # and `--no-deps flashinfer-python==0.5.3 apache-tvm-ffi`). They are unpacked into one folder that a .pth file
  # puts after site-packages, so the environment's own packages win and only the missing ones come from the wheels.
  [ -f /tmp/kvfold_deps/.done ] && return
  for wheel in benchmarks/captured/wheels/*.whl; do python -m zipfile -e "$wheel" /tmp/kvfold_deps; done
  echo /tmp/kvfold_deps > "$(python -c 'import site; print(site.getsitepackages()[0])')/kvfold_deps.pth"
  touch /tmp/kvfold_deps/.done
}
[ ${#steps[@]} -eq 0 ] && steps=(tests decode prefill sparse e2e)
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.used --format=csv
for step in "${steps[@]}"; do
  echo "== $step ($(date +%T))"
  case $step in
    tests) timeout 420 python -m pytest -q -x -n 8 tests/kernels tests/test_reading.py -p no:cacheprovider 2>&1 | tail -4 ;;  # one process: 270 s warm, over 420 s fresh (compiles are CPU-bound: 8 workers)
    prefill-tests) timeout 150 python -m pytest -q --tb=line tests/kernels/test_prefill.py tests/kernels/test_sparse.py \
                     -p no:cacheprovider 2>&1 | tail -12 ;;
    decode) timeout 330 python benchmarks/decode_kernel.py --out "$OUT/decode_kernel.json" 2>&1 | grep -v Warn | tail -40 ;;
    grid) timeout 300 python benchmarks/decode_grid.py --tokens 32768,4096,131072 --out "$OUT/decode_grid" 2>&1 \
            | grep -v Warn | tail -14 ;;  # context 4k-128k x batch 1-32 at GQA 8 (issue 7's grid)
    decode-fast) timeout 200 python benchmarks/decode_kernel.py --skip-accuracy --out "$OUT/decode_kernel.json" 2>&1 \
                   | grep -v Warn | tail -30 ;;  # the speed table alone (the error table takes ~2 minutes more)
    decode-gqa8) timeout 230 python benchmarks/decode_kernel.py --skip-accuracy --group 8 --out "$OUT/decode_kernel_gqa8.json" \
                   2>&1 | grep -v Warn | tail -30 ;;  # 64 q heads / 8 KV heads (Llama-3.1-70B's GQA 8)
    group-rows) timeout 150 python -m pytest -q -x -n 8 tests/kernels/test_fast_decode.py -k value_groups_as_rows \
                  -p no:cacheprovider 2>&1 | tail -2  # compiled: GROUP_ROWS = queries repeated per value group
                timeout 200 python benchmarks/decode_kernel.py --sweep-only "kivi:4|kivi:2" --group 8 --splits default \
                  --launches "num_warps=1,num_stages=3,GROUP_ROWS=0;num_warps=1,num_stages=3,GROUP_ROWS=1;num_warps=1,num_stages=4,GROUP_ROWS=1" \
                  --out "$OUT/decode_kernel_sweep_group_rows.json" 2>&1 | grep -v Warn | tail -12 ;;  # GQA 8: 16 pairs -> 8 columns
    agreement) timeout 200 python benchmarks/path_agreement.py --invariant --out "$OUT/path_agreement_invariant.json" \
                 2>&1 | grep -v Warn | tail -8 ;;  # fast loop vs normal path, teacher-forced, bit for bit
    ragged) timeout 200 python benchmarks/decode_kernel.py --skip-accuracy --cases "none (bf16,uniform,ragged" \
              --out "$OUT/decode_kernel_ragged.json" 2>&1 | grep -v Warn | tail -24 ;;  # per-head budgets: split sizing
    fp8-columns) timeout 200 python benchmarks/decode_kernel.py --sweep-only "fp8|fp8:scale=page" --splits default,16 \
                   --launches "num_warps=2,num_stages=3;COLUMNS=1,num_warps=1,num_stages=3;COLUMNS=1,num_warps=1,num_stages=2;COLUMNS=1,num_warps=2,num_stages=3" \
                   --out "$OUT/decode_kernel_sweep_fp8_columns.json" 2>&1 | grep -v Warn | tail -20 ;;  # float8_columns_kernel vs full_pages_kernel
    columns-tall) for group in 8 16; do  # 16 and 32 (query, value group) pairs: GQA 8, a 4-token turn at GQA 4
                    timeout 150 python benchmarks/decode_kernel.py --sweep-only "kivi:4|kivi:2|kv4:4" --group $group \
                      --splits default --launches "num_warps=1,num_stages=3,COLUMNS=0;num_warps=2,num_stages=3,COLUMNS=0;num_warps=1,num_stages=3,COLUMNS=1;num_warps=2,num_stages=3,COLUMNS=1" \
                      --out "$OUT/decode_kernel_sweep_columns_group$group.json" 2>&1 | grep -v Warn | tail -14
                  done ;;
    async-scales) timeout 200 python benchmarks/decode_kernel.py --sweep-only "kivi:4|kivi:2|kv4:4|kv4:2|fp8|fp8:scale=page" \
                    --splits default --launches "COLUMNS=1,num_warps=1,num_stages=3,KEY_FOLD=0,ASYNC_SCALES=0;COLUMNS=1,num_warps=1,num_stages=3,KEY_FOLD=1,ASYNC_SCALES=0;COLUMNS=1,num_warps=1,num_stages=3,KEY_FOLD=0,ASYNC_SCALES=2;COLUMNS=1,num_warps=1,num_stages=3,KEY_FOLD=1,ASYNC_SCALES=2" \
                    --out "$OUT/decode_kernel_sweep_async_scales.json" 2>&1 | grep -v Warn | tail -26  # scales copied ahead, key offsets folded
                  timeout 170 python -m pytest -q -x tests/kernels/test_fast_decode.py -p no:cacheprovider \
                    -k "scales_copied or offsets or both_packed or float8" 2>&1 | tail -3 ;;
    fp8-page-scales) timeout 150 python benchmarks/decode_kernel.py --sweep-only "fp8:scale=page|fp8:e5m2,scale=page" --splits default,16 \
                       --launches "ASYNC_SCALES=1,num_warps=1,num_stages=3;ASYNC_SCALES=2,num_warps=1,num_stages=3" \
                       --out "$OUT/decode_kernel_sweep_fp8_page_scales.json" 2>&1 | grep -v Warn | tail -10  # page scales before the loop
                     timeout 150 python benchmarks/decode_kernel.py --sweep-only "kivi:4|kivi:2|kv4:4" --splits default \
                       --launches "ASYNC_SCALES=2,num_warps=1,num_stages=3;ASYNC_SCALES=3,num_warps=1,num_stages=3" \
                       --out "$OUT/decode_kernel_sweep_tied_zeros.json" 2>&1 | grep -v Warn | tail -8 ;;  # value zeros tied to the dot
    registers) timeout 240 python benchmarks/decode_kernel.py --sweep-only "kivi:4|kivi:2|kv4:4|fp8" --splits default,16 \
                 --launches "num_warps=1,num_stages=3;num_warps=1,num_stages=3,maxnreg=168;num_warps=1,num_stages=3,maxnreg=128" \
                 --out "$OUT/decode_kernel_sweep_registers.json" 2>&1 | grep -v Warn | tail -26 ;;  # one-warp programs: 8 resident at 235 registers, 12 at 168, 16 at 128
    page-ids) timeout 240 python benchmarks/decode_kernel.py --sweep-only "kivi:4|kivi:2|kv4:4|kv4:2|fp8|fp8:scale=page" \
                --splits default --launches "num_warps=1,num_stages=3,PAGE_IDS=0;num_warps=1,num_stages=3,PAGE_IDS=1;num_warps=1,num_stages=4,PAGE_IDS=1" \
                --out "$OUT/decode_kernel_sweep_page_ids.json" 2>&1 | grep -v Warn | tail -20 ;;  # the split's page ids before the loop: two code buffers
    page-ids-next) for group in 8 16; do  # the packed rows kernel (taller tiles) with its page ids loaded ahead, against
                     # the columns kernel as it is now (COLUMNS_UP_TO was timed before ASYNC_SCALES and PAGE_IDS; offline at
                     # GQA 8, kivi:2 as words: 1850 loop instructions, no spill, against the rows kernel's 2044)
                     timeout 170 python benchmarks/decode_kernel.py --sweep-only "kivi:4|kivi:2|kv4:4" --group $group --splits default \
                       --launches "num_warps=1,num_stages=3,COLUMNS=0,PAGE_IDS=0;num_warps=1,num_stages=3,COLUMNS=0,PAGE_IDS=1;num_warps=2,num_stages=3,COLUMNS=0,PAGE_IDS=0;num_warps=2,num_stages=3,COLUMNS=0,PAGE_IDS=1;num_warps=1,num_stages=3,COLUMNS=1,WORDS=1;num_warps=2,num_stages=3,COLUMNS=1,WORDS=1" \
                       --out "$OUT/decode_kernel_sweep_page_ids_rows_group$group.json" 2>&1 | grep -v Warn | tail -20
                   done  # float8 pages: two or three buffers leave 4-6 programs a multiprocessor, so fewer, longer splits
                   timeout 150 python benchmarks/decode_kernel.py --sweep-only "fp8|fp8:scale=page" --splits default,64 \
                     --launches "num_warps=1,num_stages=3,PAGE_IDS=0;num_warps=1,num_stages=3,PAGE_IDS=1;num_warps=1,num_stages=4,PAGE_IDS=1" \
                     --out "$OUT/decode_kernel_sweep_page_ids_fp8.json" 2>&1 | grep -v Warn | tail -12
                   # full_pages_kernel: 16-token float8 pages (4 a step) and 16-bit pages (offline: 1 -> 2 buffers at 3 stages)
                   timeout 120 python benchmarks/decode_kernel.py --sweep-only "fp8:group=16|fp8:scale=page,group=16" --splits default \
                     --launches "num_warps=2,num_stages=3,PAGE_IDS=0;num_warps=2,num_stages=3,PAGE_IDS=1;num_warps=4,num_stages=3,PAGE_IDS=1" \
                     --out "$OUT/decode_kernel_sweep_page_ids_full_fp8.json" 2>&1 | grep -v Warn | tail -8
                   timeout 120 python benchmarks/decode_kernel.py --sweep-only "none|ragged25:none" --splits default \
                     --launches "num_warps=4,num_stages=2,PAGE_IDS=0;num_warps=4,num_stages=2,PAGE_IDS=1;num_warps=4,num_stages=3,PAGE_IDS=1" \
                     --out "$OUT/decode_kernel_sweep_page_ids_full_bf16.json" 2>&1 | grep -v Warn | tail -10 ;;  # ragged 25%: 3.01x, the aim 3x
    steps) timeout 240 python benchmarks/decode_kernel.py --sweep-only "fp8|fp8:scale=page" --splits default,16 \
             --launches "num_warps=1,num_stages=3;num_warps=1,num_stages=3,STEP=32,PAGE_IDS=1;num_warps=1,num_stages=4,STEP=32,PAGE_IDS=1;num_warps=1,num_stages=3,STEP=16,PAGE_IDS=1;num_warps=1,num_stages=4,STEP=16,PAGE_IDS=1" \
             --out "$OUT/decode_kernel_sweep_fp8_steps.json" 2>&1 | grep -v Warn | tail -22  # float8 pages part of a page a step: two buffers, fewer registers
           timeout 300 python benchmarks/decode_kernel.py --sweep-only "kivi:4|kivi:2|kv4:4" --splits default,16 \
             --launches "num_warps=1,num_stages=3,WORDS=1;num_warps=1,num_stages=3,STEP=32,WORDS=1;num_warps=1,num_stages=3,STEP=16,WORDS=1" \
             --out "$OUT/decode_kernel_sweep_packed_steps.json" 2>&1 | grep -v Warn | tail -20 ;;  # packed: 248 -> 168 registers at 32 a step (8 -> 12 programs a multiprocessor), +34% instructions
    words) timeout 150 python benchmarks/decode_kernel.py --sweep-only "kivi:2|kv4:2" --splits default \
             --launches "num_warps=1,num_stages=3,WORDS=0;num_warps=1,num_stages=3,WORDS=1;num_warps=1,num_stages=4,WORDS=1" \
             --out "$OUT/decode_kernel_sweep_words.json" 2>&1 | grep -v Warn | tail -10 ;;  # 2-bit codes as 16-bit words (offline: 1426 -> 1204 loop instructions)
    profile) for spec in kivi:4 kivi:2 fp8; do  # where the page loop stalls: Nsight Compute's warp states and source counters
               timeout 120 ncu --clock-control none --kernel-name regex:columns --launch-skip 2 --launch-count 1 \
                 --section WarpStateStats --section SchedulerStats --section SourceCounters --section Occupancy \
                 --metrics regex:smsp__pcsamp_warps_issue_stalled_.*$ --print-details all python benchmarks/ncu_decode.py $spec > "$OUT/ncu_${spec/:/}.txt" 2>&1
               { grep -E "issue_stalled|Issued Warp|Eligible Warps|Achieved Active" "$OUT/ncu_${spec/:/}.txt" | grep -v not_issued \
                   || tail -8 "$OUT/ncu_${spec/:/}.txt"; } | head -30
               timeout 120 ncu --clock-control none --kernel-name regex:columns --launch-skip 2 --launch-count 1 \
                 --section SourceCounters --section WarpStateStats --page source --print-source sass --csv \
                 python benchmarks/ncu_decode.py $spec > "$OUT/ncu_${spec/:/}_sass.csv" 2>&1  # stalls per instruction
             done ;;
    few) timeout 300 python benchmarks/few_token_decode.py --out "$OUT/few_token_decode.json" 2>&1 | grep -v Warn | tail -24 ;;
    prefill) timeout 240 python benchmarks/prefill_kernel.py --out "$OUT/prefill_kernel" 2>&1 | grep -v Warn | tail -24 ;;
    sparse) timeout 200 python benchmarks/sparse_prefill.py --out "$OUT/sparse_prefill" 2>&1 | grep -v Warn | tail -8
            capture=benchmarks/captured/smollm2_layer15_8k.safetensors  # benchmarks/capture_qkv.py; carried, not committed
            # gamma 0.9: recall 0.960 at 40% of the blocks on all 30 layers at 8k (sparse_density_cpu.md)
            for gamma in 0.95 0.9; do
              [ -f $capture ] && timeout 150 python benchmarks/sparse_prefill.py --block 64 --captured $capture \
                --gamma $gamma --out "$OUT/sparse_prefill_captured_g${gamma/./}" 2>&1 | grep -v Warn | tail -8
            done ;;
    estimate) capture=benchmarks/captured/smollm2_layer15_8k.safetensors
              # compiled, three times (on an H100 they failed in every mode, with the codes test, from the reference's CUDA
              # division by a Python number; fixed in 3957ef5, not yet re-run): each mode against the reference
              for i in 1 2 3; do
                timeout 100 python -m pytest -q -n 8 tests/kernels/test_estimate.py -p no:cacheprovider --tb=line 2>&1 \
                  | awk '/^FAILED/ {print $1, $2; next} /passed|failed/' | tail -14  # which modes fail
              done
              # the estimate kernel alone against an earlier revision of its file (carried: `git show
              # REV:src/kvfold/kernels/estimate.py > benchmarks/captured/estimate_REV.py`), and each mode
              timeout 200 python benchmarks/estimate_kernel.py --captured $capture --before benchmarks/captured/estimate_*.py \
                --launches "${ESTIMATE_LAUNCHES-PERSISTENT=0,PREFETCH=0;PERSISTENT=0;PERSISTENT=1;PERSISTENT=1,SLOTS=396}" \
                --out "$OUT/estimate_kernel_captured" 2>&1 | grep -v Warn | tail -14
              [ -n "${ESTIMATE_NCU-}" ] && timeout 150 ncu --clock-control none --kernel-name regex:lowbit_mass --launch-count 1 \
                --section SourceCounters --section WarpStateStats --section Occupancy --section SchedulerStats --page source \
                --print-source sass --csv python benchmarks/estimate_kernel.py --captured $capture --profile --lengths 65536 \
                --launches "${ESTIMATE_NCU}" \
                > "$OUT/ncu_estimate_sass.csv" 2>&1 && python benchmarks/ncu_stalls.py "$OUT/ncu_estimate_sass.csv" --top 25 2>&1 | tail -45
              ;;
    lowbit) capture=benchmarks/captured/smollm2_layer15_8k.safetensors
            # low-bit (SALE-style) pattern, shares of each row's total: gamma 0.97 at 4 rows recalls 0.95 on the layer
            # tiled to 128k (CPU, sparse_density.py); REDUCE:GAMMA:ROWS; the launches (the estimate kernel's alone:
            # `estimate`) of the sparse kernel timed on the first run, over its mask
            # ANCHORED (the default since 2026-12-06: H100 128k 11.67 -> 10.21 ms) against the running maximum (FOLD)
            kernels=${LOWBIT_KERNELS-"ANCHORED=0;ANCHORED=1;ANCHORED=1,num_stages=4"}
            # the pick: 31 bisection steps or 16 of three thresholds (ARITY=4: 0.44 -> 0.98 ms at 128k, H100)
            picks=${LOWBIT_PICKS-"ARITY=2;ARITY=4,num_warps=4"}
            first=
            for run in ${LOWBIT_RUNS:-sum:0.97:4 sum:0.96:4 sum:0.97:8 max:0.98:8}; do  # LOWBIT_RUNS: fewer, when time is short
              IFS=: read -r reduce gamma rows <<< "$run"
              timeout $( [ -z "$first" ] && echo 260 || echo 120 ) python benchmarks/sparse_prefill.py --block 64 --captured $capture --estimate int4 \
                --reduce $reduce --gamma $gamma --rows $rows --kernel-launches "$( [ -z "$first" ] && echo "$kernels")" \
                --pick-launches "$( [ -z "$first" ] && echo "$picks")" \
                --out "$OUT/sparse_prefill_captured_int4_${reduce}_g$(echo $gamma | tr -d .)_r$rows" 2>&1 | grep -v Warn | tail -60
              first=no
            done
            timeout 200 python -m pytest -q -x -n 8 tests/kernels/test_estimate.py tests/kernels/test_sparse.py \
              tests/kernels/test_prefill.py -k "estimate or sparse or through_the_kernel" -p no:cacheprovider 2>&1 \
              | tail -3  # the low-bit estimate and the sparse kernel compiled (after the timings: their numbers first)
            for run in ${LOWBIT_SYNTHETIC-sum:0.96 max:0.98}; do  # Llama-3.1-8B shapes (32 / 8 heads, head_dim 128), synthetic pattern
              timeout 120 python benchmarks/sparse_prefill.py --estimate int4 --reduce ${run%:*} --gamma ${run#*:} \
                --out "$OUT/sparse_prefill_int4_${run%:*}" 2>&1 | grep -v Warn | tail -4
            done ;;
    e2e) timeout 330 python benchmarks/fast_decode.py --methods none,kivi:4,kivi:2,fp8,kv4:4,snapkv:0.75+kivi:4 \
           --normal fp8,kv4:4 --eager "" --out "$OUT/fast_decode.json" 2>&1 | grep -v Warn | tail -14 ;;
    e2e8) timeout 420 python benchmarks/fast_decode.py --batch 8 --methods none,kivi:4,kivi:2,kv4:4,snapkv:0.75+kivi:4 \
            --normal "" --eager "" --out "$OUT/fast_decode_batch8.json" 2>&1 | grep -v Warn | tail -12 ;;  # the issue's batch 8 (e2e: 4)
    chunked) for chunk in 2048 4096; do  # kept tokens 16-bit until the end (default), against packed as the chunks go
               timeout 280 python benchmarks/fast_decode.py --methods "snapkv:0.75+kivi:4;snapkv:0.75+kivi:4,defer=false" \
                 --normal "" --eager "" --prefill-chunk $chunk --out "$OUT/fast_decode_chunk$chunk.json" 2>&1 \
                 | grep -v Warn | tail -8
             done ;;
    serve) carry_wheels
           python -c "import fastapi, uvicorn, openai; print('serve deps: fastapi', fastapi.__version__)"
           model=/tmp/kvfold_llama8b  # random weights of Llama-3.1-8B's shape, the embedded tokenizer (carried)
           [ -d $model ] || timeout 240 python benchmarks/random_model.py --shape llama-3.1-8b --out $model 2>&1 | tail -2
           timeout 330 python benchmarks/serve_load.py --model $model --clients 32 --seconds 60 --baseline-seconds 15 \
             --max-tokens 32 --method snapkv:0.5+kivi:4 --out "$OUT/serve_load_h200" 2>&1 | tail -8
           [ -f "$OUT/serve_load_h200.json" ] || tail -25 /tmp/kvfold_serve_load.log ;;
    peer) carry_wheels  # FlashInfer compiles its kernels at first use (minutes; not timed)
          timeout 540 python benchmarks/peer_decode.py --out "$OUT/peer_decode" 2>&1 | grep -v Warn | tail -24 ;;
    *) echo "unknown step $step (tests, prefill-tests, decode, grid, decode-fast, decode-gqa8, ragged, fp8-columns, columns-tall, async-scales, fp8-page-scales, registers, page-ids, page-ids-next, words, steps, profile, few, prefill, sparse, estimate, lowbit, group-rows, e2e, e2e8, chunked, agreement, serve, peer)" ;;
  esac
done
