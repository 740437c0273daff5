#!/usr/bin/env bash
# The GPU checks in one run, for a machine with CUDA, PyTorch, numpy and pytest (no package
# index needed: metarl is imported from this checkout; envpool, gymnasium, wandb and
# lightning are not used). About 5-8 minutes on one GPU; at most 4 x PART_TIMEOUT.
#
#   bash benchmarks/gpu_check.sh                 # DEVICE=cuda, output in runs/gpu-check
#   OUT=/tmp/x DEVICE=cpu SIZES=1,8 bash benchmarks/gpu_check.sh   # a dry run on a CPU
#
# Each part writes its output to $OUT/PART.txt and its last line (the benchmark's JSON
# headline) to $OUT/summary.jsonl; a part that fails or runs out of time (PART_TIMEOUT
# seconds) is reported and the next one runs.
#
# 1. tests/test_host_sync.py: no host read per environment step on the device;
# 2. benchmarks/inner_loop.py: CartPole (torch-native) one at a time and at each population
#    size, eager and compiled;
# 3. the same for Breakout-MinAtar (the paper's configuration);
# 4. the optimiser slot (Adam, SGD, OPEN, OPEN-FF, No-Features) at the largest size.
set -u
cd "$(dirname "$0")/.."  # the repository's root
OUT=${OUT:-runs/gpu-check}
DEVICE=${DEVICE:-cuda}
SIZES=${SIZES:-1,64,1024}
PY=${PYTHON:-python3}
PART_TIMEOUT=${PART_TIMEOUT:-130}
LARGEST=$(tr ',' '\n' <<< "$SIZES" | sort -n | tail -n 1)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
: > "$OUT/summary.jsonl"

part() {
    local name=$1
    shift
    echo "== $name: $*"
    local t0=$SECONDS
    timeout "$PART_TIMEOUT" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - t0)) s"
    tail -n 4 "$OUT/$name.txt" | cut -c1-400
    tail -n 1 "$OUT/$name.txt" | grep '^{' >> "$OUT/summary.jsonl"
}

$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee "$OUT/env.txt"
command -v nvidia-smi > /dev/null && nvidia-smi -L | tee -a "$OUT/env.txt"

part host_sync $PY -m pytest -q -p no:cacheprovider tests/test_host_sync.py
part cartpole $PY benchmarks/inner_loop.py --device "$DEVICE" --backend torch \
    --sizes "$SIZES" --alone 1 --updates 6 --compile
part breakout $PY benchmarks/inner_loop.py --device "$DEVICE" --env Breakout-MinAtar \
    --backend torch --sizes "$LARGEST" --alone 1 --updates 3
part optimisers $PY benchmarks/inner_loop.py --device "$DEVICE" --backend torch \
    --sizes "$LARGEST" --alone 1 --updates 3 --optimisers
echo "== done: $OUT"
