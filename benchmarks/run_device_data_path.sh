#!/usr/bin/env bash
# The data path on one GPU (issue 16), ready for a session with a device: end-to-end `record` and
# `eval` of a ResNet-50 on a generated JPEG folder against the model-only floor, with the JPEGs decoded
# on the GPU (--decode auto) and, for comparison, in CPU workers (--decode cpu); then the two paths'
# figures side by side on the same folder. Results go to $OUT (or ./device-out); run from the
# repository root. About 5 minutes on an H200 with 16 cores.
set -uo pipefail
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
WORKERS=${WORKERS:-$(( $(nproc) - 2 ))}
FOLDER=/tmp/resprobe-jpegs
python - "$FOLDER" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from data_path import make_jpeg_folder
if not Path(sys.argv[1]).is_dir():
    make_jpeg_folder(Path(sys.argv[1]), 4096)
PY
for decode in auto cpu; do
  timeout "${DEVICE_TIMEOUT:-200}" python benchmarks/data_path.py --device cuda --model timm:resnet50 \
    --folder "$FOLDER" --batch-size 256 --workers "$WORKERS" --decode "$decode" \
    --out "$OUT/data_path_$decode.json" 2> "$OUT/data_path_$decode.log" | tail -12
  echo "data_path.py --decode $decode exit $?"
done
for decode in device cpu; do
  python -m resprobe eval timm:resnet50 --data "$FOLDER" --limit 1024 --decode "$decode" --batch-size 256 \
    --quiet -f json > "$OUT/eval_$decode.json" 2>> "$OUT/eval.log"
done
python - "$OUT/eval_device.json" "$OUT/eval_cpu.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
print("eval --decode device vs cpu:", {k: (a[k], b[k]) for k in ("n", "loss", "acc")})
PY
