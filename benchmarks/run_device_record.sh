#!/usr/bin/env bash
# A shorter device run for the record path: benchmarks/device.py without the finetune compiles, then
# `resprobe record` on CUDA with the fused statistics kernel and with torch operations, compared.
# Results go to $OUT (or ./device-out); run from the repository root.
set -uo pipefail
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout "${DEVICE_TIMEOUT:-330}" python benchmarks/device.py --no-compile --out "$OUT/device.json" 2> "$OUT/device.log" > /dev/null
echo "device.py exit $?"; tail -4 "$OUT/device.log"
tiny=(fixtures/tiny_resnet.pt --data fixtures/shapes_test.npz --quiet --overwrite)
{
  python -m resprobe record "${tiny[@]}" --device cuda --out /tmp/fused.h5
  RESPROBE_FUSED_STATS=0 python -m resprobe record "${tiny[@]}" --device cuda --out /tmp/torch.h5
  python - /tmp/fused.h5 /tmp/torch.h5 <<'PY'
import sys, h5py, numpy as np
a, b = (h5py.File(p, "r") for p in sys.argv[1:])
for name in a["stats"]:
    x, y = a["stats"][name][()], b["stats"][name][()]
    finite = np.isfinite(y)
    same = np.array_equal(finite, np.isfinite(x))
    scale = np.abs(y[finite]).max(initial=1e-30)
    print(f"fused vs torch {name}: same finite {same}, max |diff| {np.abs(x[finite] - y[finite]).max(initial=0):.3g} (scale {scale:.3g})")
PY
} > "$OUT/cli.log" 2>&1
echo "cli exit $?"; cat "$OUT/cli.log" | tail -12
