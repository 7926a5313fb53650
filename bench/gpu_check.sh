#!/usr/bin/env bash
# The GPU check of issue 14, in one call on a machine with one CUDA GPU (under 8 minutes
# on an H100): the @pytest.mark.gpu tests, then bench/gpu.py's table (forward floor,
# unetflow end to end on a >= 4 GB volume, the near-free-model ceiling, the bf16 guard).
# Fails loudly (exit 2) where it finds no GPU: it never skips silently.
#
# Here, first:   bench/gpu_wheels.sh           (fetches .whl/: zarr, dask, ... for a machine without them)
# There:         bench/gpu_check.sh            (with .whl carried; the table lands in $OUT or ./gpu-out)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import zarr, dask, distributed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "FAIL: bench/gpu_check.sh needs a CUDA GPU; torch.cuda.is_available() is False on $(hostname)" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
status=0
echo "== GPU tests"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -o addopts="" 2>&1 | tee "$OUT/gpu-tests.txt" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== GPU benchmark"
timeout 300 python3 bench/gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu-bench.txt" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
