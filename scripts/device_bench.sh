#!/usr/bin/env bash
# GPU benchmark run on the device machine (H100): installs the carried wheels, runs the GPU
# tests and the benchmarks, writes logs under $OUT (or ./out) and prints the table last.
# Usage: bash scripts/device_bench.sh [quick|all] [extra pytest paths...]
set -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
PART=${1:-quick}
shift || true
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi; nproc; free -g; python3 -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)'; } > "$OUT/machine.txt" 2>&1
python3 -m pytest -q -p no:cacheprovider tests/test_triton_dequant.py tests/test_streaming.py "$@" 2>&1 | tee "$OUT/pytest.txt" | tail -15
python3 -m benchmarks.gpu "$PART" --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt" | grep -v '^RESULT' | tail -60
