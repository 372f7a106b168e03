#!/usr/bin/env bash
# The GPU paths, on a machine with a CUDA device: the CUDA tests (optimize, calibrate, AMP
# fine-tuning, torchrun with nccl, latency), fine-tuning's tests on the GPU, speed tables on CUDA
# (float32 with torch's default TF32 convolutions, and float16; eager and CUDA-graph replay), a
# per-layer breakdown, and the demo end to end.
#
#     bash benchmarks/cuda_check.sh [OUT_DIR]          # default runs/cuda; logs and JSON rows there
#     STEPS="speed layers" bash benchmarks/cuda_check.sh # only these steps (tests speed speed_fp16 layers demo)
#
# Each step has its own time limit and the script goes on after a failure; the exit status is the
# number of failed steps. Fashion-MNIST must be where leanconv looks (Debian's package) for the
# torchrun test and the demo.
set -u
out=${1:-runs/cuda}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
failed=0

step() {  # step NAME SECONDS COMMAND...: run, log to $out/NAME.log, report its status and time
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" $name "* ]] || return 0
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "== $name: rc $rc in $((SECONDS - t0)) s"
    tail -n "${TAIL:-15}" "$out/$name.log"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

par=$($py -c "import xdist" 2>/dev/null && echo "-n 4")  # pytest-xdist where installed
step tests 130 $py -m pytest -q -p no:cacheprovider $par -rfE tests/test_finetune.py \
    tests/test_optimize.py::test_optimize_half_precision_on_cuda_stays_close \
    tests/test_optimize.py::test_optimize_matches_unoptimized tests/test_calibrate.py tests/test_measure.py \
    tests/test_convert.py::test_a_model_on_cuda_is_converted_and_timed_there
TAIL=40 step speed 220 $py benchmarks/speed.py --device cuda --cuda-graphs --threads 8 --repeats 20 \
    --json "$out/speed.jsonl" --models resnet50,vgg16 --batches 1,16,64 \
    --recipes sic-m2,unravel-b4,sic-bottleneck,sic-topo2d,topo2d
TAIL=12 step speed_fp16 80 $py benchmarks/speed.py --device cuda --cuda-graphs --dtype float16 --threads 8 \
    --repeats 20 --json "$out/speed.jsonl" --models resnet50 --batches 64 --recipes sic-m2,unravel-b4,sic-topo2d
TAIL=25 step layers 60 $py benchmarks/speed.py --device cuda --threads 8 --models resnet50 --batches 64 \
    --recipes sic-m2 --layers
TAIL=25 step demo 140 $py -m leanconv demo --quick --out "$out/demo"
exit "$failed"
