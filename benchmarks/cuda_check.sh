#!/usr/bin/env bash
# The GPU checks, on a machine with a CUDA device. By default the fused-kernel set (issue 20), sized
# for one lent GPU: the Triton kernels' tests on the device, the speed tables (VGG-16 and ResNet-50,
# batch 16 and 64, bfloat16 and float32, eager and CUDA-graph replay) with the fused kernels offered
# to optimize, a per-layer table, Triton against torch.compile(max-autotune) for one SIC layer, and
# fine-tuning throughput; then, if time is left, optimize's CUDA tests.
#
#     bash benchmarks/cuda_check.sh [OUT_DIR]                 # default: $OUT, else runs/cuda
#     STEPS="kernel_tests speed" bash benchmarks/cuda_check.sh  # only these steps
#     STEPS="tests speed_fp16 demo" bash benchmarks/cuda_check.sh  # the earlier GPU checks (not in the default)
#     BUDGET=420 bash benchmarks/cuda_check.sh                 # seconds for all steps together (default 450)
#
# Each step logs to OUT_DIR/NAME.log (JSON rows to OUT_DIR/*.jsonl), has its own time limit, never
# runs past the overall BUDGET (a step that would start with under 20 s left is skipped), and the
# script goes on after a failure; the exit status is the number of failed or skipped steps;
# OUT_DIR/summary.txt lists them.
#
# Estimated device time of the default steps on an H100, about 7 minutes (the budget caps it at 7.5).
# Triton compile times are measured here, compiling the kernels for sm_90 on this project's CPU
# machine (tests/compile_kernels.py: 2-4 s per kernel variant and block config on 2 busy cores);
# the other figures scale the last H100 session's step times (benchmarks/README.md, "CUDA").
#   kernel_tests  ~70 s: 30 CUDA test cases at tiny shapes; ~35 compiles (one block config each at
#                 <= 64 channels) dominate.
#   speed        ~260 s: 32 rows (2 models x 2 batches x 2 dtypes x 4 recipes). The last H100 run did
#                 30 such rows, conversion included, within its 220 s limit (~7 s a row); here each
#                 (model, recipe) is converted once for both dtypes (16 conversions, not 32), plus
#                 ~26 compiles (per dtype: SIC 3x3 with multiplier 1 and 4, bottleneck k=2, three
#                 configs each by channel count; four block-sparse variants, one config) and ~100
#                 autotune keys at ~50 ms each.
#   layers        ~40 s: one conversion of VGG-16 (sic-m2), its optimize (kernels cached on disk by
#                 then), 13 layers timed synchronized at batch 64.
#   inductor      ~80 s: four torch.compile(mode="max-autotune") builds (two forms x two shapes,
#                 bfloat16; Inductor benchmarks its GEMM configs on each), the rest is milliseconds.
#   finetune      ~30 s: ResNet-50, two recipes, 10 distillation steps each at batch 64.
#   optimize_tests: whatever time is left (optimize on CUDA for every recipe, exactness).
set -u
out=${1:-${OUT:-runs/cuda}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
failed=0
deadline=$((SECONDS + ${BUDGET:-450}))
STEPS=${STEPS:-"kernel_tests speed layers inductor finetune optimize_tests"}
: >"$out/summary.txt"

step() {  # step NAME SECONDS COMMAND...: run within the budget, log to $out/NAME.log, report status and time
    local name=$1 limit=$2 t0=$SECONDS rc left
    shift 2
    [[ " $STEPS " == *" $name "* ]] || return 0
    left=$((deadline - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "== $name: skipped, ${left} s of the budget left" | tee -a "$out/summary.txt"
        failed=$((failed + 1))
        return 0
    fi
    [ "$limit" -le "$left" ] || limit=$left
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "== $name: rc $rc in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$out/summary.txt"
    tail -n "${TAIL:-15}" "$out/$name.log"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $py -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$out/env.log"

# --- issue 20: fused Triton kernels
TAIL=20 step kernel_tests 150 $py -m pytest -q -p no:cacheprovider -rfE -m cuda tests/test_kernels_triton.py
TAIL=50 step speed 280 $py benchmarks/speed.py --device cuda --cuda-graphs --threads 8 --repeats 20 \
    --json "$out/speed.jsonl" --models vgg16,resnet50 --batches 16,64 --dtype bfloat16,float32 \
    --recipes sic-m2,unravel-b4,sic-bottleneck,sic-topo2d
TAIL=20 step layers 60 $py benchmarks/speed.py --device cuda --threads 8 --repeats 20 --models vgg16 --batches 64 \
    --dtype bfloat16 --recipes sic-m2 --layers
TAIL=10 step inductor 90 $py benchmarks/triton_vs_inductor.py --shapes 128x56,256x28 --dtypes bfloat16 \
    --json "$out/inductor.jsonl"
TAIL=10 step finetune 45 $py benchmarks/finetune_throughput.py --device cuda --models resnet50 \
    --recipes sic-m2,sic-topo2d --batch 64 --repeats 10 --json "$out/finetune.jsonl"
TAIL=10 step optimize_tests 120 $py -m pytest -q -p no:cacheprovider -rfE -m cuda tests/test_optimize.py

# --- the earlier GPU checks (STEPS="tests speed_fp16 demo")
par=$($py -c "import xdist" 2>/dev/null && echo "-n 4")  # pytest-xdist where installed
step tests 130 $py -m pytest -q -p no:cacheprovider $par -rfE tests/test_finetune.py \
    tests/test_optimize.py::test_optimize_half_precision_on_cuda_stays_close \
    tests/test_optimize.py::test_optimize_matches_unoptimized tests/test_calibrate.py tests/test_measure.py \
    tests/test_convert.py::test_a_model_on_cuda_is_converted_and_timed_there
TAIL=12 step speed_fp16 80 $py benchmarks/speed.py --device cuda --cuda-graphs --dtype float16 --threads 8 \
    --repeats 20 --json "$out/speed.jsonl" --models resnet50 --batches 64 --recipes sic-m2,unravel-b4,sic-topo2d
TAIL=25 step demo 140 $py -m leanconv demo --quick --out "$out/demo"
exit "$failed"
