#!/usr/bin/env bash
# Everything issue 7 asks of a GPU, in one go (about 5 minutes on an H100/H200):
#   1. benchmarks/device.py (the figures, JSON);
#   2. the command line on CUDA: align, record with bf16 and loader workers, record with the fused
#      statistics kernel and without (RESPROBE_FUSED_STATS=0), ablate (compared with the CPU's figures),
#      finetune with --compile.
# Results go to $OUT (or ./device-out); run from the repository root, resprobe importable.
set -uo pipefail
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, torchvision, timm, typer, h5py; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'typer', typer.__version__, 'h5py', h5py.__version__)" | tee -a "$OUT/gpu.txt"

timeout 420 python benchmarks/device.py --out "$OUT/device.json" 2> "$OUT/device.log" > /dev/null
echo "device.py exit $?"; tail -5 "$OUT/device.log"

tiny=(fixtures/tiny_resnet.pt --data fixtures/shapes_test.npz --quiet)
{
  set -x
  python -m resprobe align "${tiny[@]}" --device cuda
  python -m resprobe record "${tiny[@]}" --device cuda --precision bf16 --workers 2 --out /tmp/rec.h5
  python -m resprobe align /tmp/rec.h5 --format json | head -c 600; echo
  # the fused statistics kernel (default on CUDA) against torch operations, fp32, same recording
  python -m resprobe record "${tiny[@]}" --device cuda --out /tmp/fused.h5 --overwrite
  RESPROBE_FUSED_STATS=0 python -m resprobe record "${tiny[@]}" --device cuda --out /tmp/torch.h5 --overwrite
  python - /tmp/fused.h5 /tmp/torch.h5 <<'PY'
import sys, h5py, numpy as np
a, b = (h5py.File(p, "r") for p in sys.argv[1:])
names = [k for k in a["stats"]] if "stats" in a else []
for name in names:
    x, y = a["stats"][name][()], b["stats"][name][()]
    finite = np.isfinite(y)
    assert np.array_equal(finite, np.isfinite(x)), name
    scale = np.abs(y[finite]).max(initial=1e-30)
    print(f"fused vs torch {name}: max |diff| {np.abs(x[finite] - y[finite]).max(initial=0):.3g} (scale {scale:.3g})")
PY
  python -m resprobe ablate "${tiny[@]}" --device cuda --format json > "$OUT/ablate_cuda.json"
  python -m resprobe ablate "${tiny[@]}" --device cpu --format json > "$OUT/ablate_cpu.json"
  python - "$OUT/ablate_cuda.json" "$OUT/ablate_cpu.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
rows = [(a["baseline"], b["baseline"])] + list(zip(a["blocks"], b["blocks"]))
print("ablate cuda vs cpu, max |diff| of loss/acc:",
      max(max(abs(x["loss"] - y["loss"]), abs(x["acc"] - y["acc"])) for x, y in rows))
PY
  python -m resprobe finetune "${tiny[@]}" --device cuda --max-steps 20 --batch-size 32 --compile --out /tmp/ft.pt --format json | head -c 400; echo
} > "$OUT/cli.log" 2>&1
echo "cli exit $?"; tail -30 "$OUT/cli.log"
