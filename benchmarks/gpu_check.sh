#!/usr/bin/env bash
# Every GPU check of refattn in one run, on a machine with an NVIDIA GPU, CuPy
# and PyTorch built for CUDA: the fused CuPy decode kernel against the spec,
# the spec's own stages on CuPy, `refattn bench` over issue 9's grid, and the
# suite's CuPy and torch-CUDA cases. Each part has a time limit, so one that
# hangs does not take the others with it; everything lands in OUT.
#
#   benchmarks/gpu_check.sh OUT [PARTS]     PARTS: any of tests,profile,sweep,bench,cases
set -u
out=${1:?usage: gpu_check.sh OUT [tests,profile,sweep,bench,cases]}
parts=${2:-tests,profile,sweep,bench,cases}
mkdir -p "$out"
py=${PYTHON:-python3}
wants() { [[ ",$parts," == *",$1,"* ]]; }
started=$(date +%s)
stamp() { echo "[$(($(date +%s) - started))s] $*"; }

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $py -c "import cupy, torch, sys; print('python', sys.version.split()[0]); \
print('cupy', cupy.__version__, 'CUDA runtime', cupy.cuda.runtime.runtimeGetVersion()); \
print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

if wants tests; then
    timeout 200 $py -m pytest -q -p no:cacheprovider -p no:randomly tests/test_cupy_decode.py \
        -k "${TESTS_K:-not nothing}" > "$out/test_cupy_decode.txt" 2>&1
    stamp "fused kernel tests: rc=$?"; tail -3 "$out/test_cupy_decode.txt"
fi
if wants profile; then
    timeout 60 $py benchmarks/cupy_spec_profile.py --json "$out/profile.json" \
        > "$out/profile.txt" 2>&1
    stamp "spec profile: rc=$?"; cat "$out/profile.txt" | tail -25
fi
if wants sweep; then
    timeout 100 $py benchmarks/cupy_decode_sweep.py --json "$out/sweep.json" \
        > "$out/sweep.txt" 2>&1
    stamp "fused kernel settings sweep: rc=$?"; cat "$out/sweep.txt" | tail -100
fi
if wants bench; then
    COLUMNS=200 timeout 180 $py -m refattn.cli bench --backends cupy --mode decode --batch 1,8 \
        --q-heads 32 --kv-heads 8,32 --seq-lens 1024,8192,32768 --dtypes float16 \
        --repeats 20 --warmup 3 --bandwidth-mib 4096 --json "$out/bench.json" \
        --plot "$out/bench.png" > "$out/bench.txt" 2>&1
    stamp "bench: rc=$?"; grep -E "fused|SDPA|GB/s|cupy" "$out/bench.txt" | tail -50
fi
if wants cases; then
    REFATTN_EXAMPLES=25 timeout 150 $py -m pytest -q -p no:cacheprovider -x \
        -k "cupy or cuda" tests > "$out/test_gpu_cases.txt" 2>&1
    stamp "CuPy and torch-CUDA cases of the suite: rc=$?"; tail -3 "$out/test_gpu_cases.txt"
fi
