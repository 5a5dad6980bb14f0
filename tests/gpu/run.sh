#!/usr/bin/env bash
# Every GPU check and benchmark in one command, for the first GPU machine lent:
#   bash tests/gpu/run.sh            (results under $OUT, default bench-results/gpu)
# Uses the python on PATH (or $PY); it must have torch with CUDA, triton and the test extras.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY="${PY:-python}"
OUT="${OUT:-bench-results/gpu}"
mkdir -p "$OUT"
export RAY_AUTH_MODE=disabled RAYMOE_HOME="${RAYMOE_HOME:-$(mktemp -d)}"
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else
  f'torch {torch.__version__} in {sys.executable} sees no CUDA: the GPU tests would all skip. Use a CUDA build of torch (PY=...)')" || exit 1
rc=0  # any step failing fails the run (each still runs, so one call gives every figure it can)
{ nvidia-smi; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(0))"; } 2>&1 | tee "$OUT/env.txt"
"$PY" -m pytest -q tests/gpu tests/kernels -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt" || rc=1
"$PY" -m cluster.cli bench kernels --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt" || rc=1
"$PY" -m cluster.cli bench generate --dtype bfloat16 --batch-sizes 1,8,32 --out "$OUT/generate.json" 2>&1 \
  | tee "$OUT/generate.txt" || rc=1
echo "results in $OUT (exit status $rc)"
exit $rc
