#!/usr/bin/env bash
# The one prepared GPU check (issue: GPU readiness). Runs on the lent GPU machine from the
# working tree alone, with that machine's python3 (torch, torchvision, lightning, timm,
# torchmetrics, rich, scikit-learn and pytest preinstalled; no registry, no install step):
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, about 6 minutes
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh   # a dry run of the same steps on CPU
#
# Writes benchmarks/results/gpu*.{json,md} and benchmarks/results/gpu-tests.txt; with $OUT set
# (the device tool's output folder) copies them there too. Each step has its own time limit so
# that the whole check stays within 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-}
RESULTS=benchmarks/results
mkdir -p "$RESULTS"

echo "== versions"
$PY - <<'PY'
import platform, torch
from importlib.metadata import PackageNotFoundError, version
print("python", platform.python_version())
for name in ("torch", "torchvision", "lightning", "timm", "torchmetrics", "rich", "scikit-learn", "pytest"):
    try:
        print(name, version(name))
    except PackageNotFoundError:  # a missing package is reported, not fatal
        print(name, "MISSING")
print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
PY

status=0
echo "== tests on $DEVICE"
if [ "$DEVICE" = cuda ]; then selector="cuda"; else selector="cpu"; fi
timeout 180 $PY -m pytest -q -p no:cacheprovider tests/test_devices.py -k "$selector" -o addopts="-ra" \
    2>&1 | tee "$RESULTS/gpu-tests.txt" | tail -25 || status=1

echo "== benchmarks on $DEVICE"
timeout 360 $PY -m benchmarks.gpu --device "$DEVICE" ${QUICK:+--quick} || status=1

if [ -n "${OUT:-}" ]; then
    cp "$RESULTS"/gpu* "$OUT"/ 2>/dev/null || true
fi
echo "== done (status $status)"
exit $status
