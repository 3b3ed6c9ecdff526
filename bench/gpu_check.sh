#!/usr/bin/env bash
# Everything that needs a GPU, in one go, on a machine that has one (CI has none).
#
#   bash bench/gpu_check.sh [OUT_DIR]
#
# 1. bench/train_bench.py --gpu: the large preset in bf16-mixed, samples/s and TFLOP/s
#    (model FLOP utilisation against the card's peak, when known);
# 2. a nightly-sized training: 1M synthetic rows, python -m model.train on one GPU
#    (target: training under 5 minutes on an H200-class card);
# 3. bench/serve_bench.py: `valifi serve` picks the GPU itself (accelerator auto).
# Each step's output goes to OUT_DIR (default: gpu-check-<time>) and to the screen.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-check-$(date +%Y%m%dT%H%M%S)}"
mkdir -p "$out"
py="${VALIFI_PYTHON:-.venv/bin/python}"
[ -x "$py" ] || { python3 scripts/bootstrap.py && py=.venv/bin/python; }

"$py" - <<'PY' | tee "$out/device.txt"
import torch
assert torch.cuda.is_available(), "no CUDA device: this script needs a GPU"
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {p.name}, "
      f"{p.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}")
PY

echo "== 1. train_bench --gpu"
"$py" bench/train_bench.py --gpu 2>&1 | tee "$out/train_bench.txt"

echo "== 2. nightly-sized training on 1M rows"
"$py" - "$out" <<'PY' 2>&1 | tee "$out/train_1m.txt"
import json, subprocess, sys, time
from pathlib import Path
from model.synthetic import World, write_snapshot
from valifi.experiments import train_command
out = Path(sys.argv[1])
t = time.perf_counter()
snap = write_snapshot(out / "snap-1m", 1_000_000, World(seed=0))
print(f"snapshot of 1M rows in {time.perf_counter() - t:.0f} s", flush=True)
t = time.perf_counter()
cmd = train_command(snap, out / "run-1m", 0, "--preset", "large", "--accelerator", "gpu")
subprocess.run(cmd, check=True)
wall = time.perf_counter() - t
m = json.loads((out / "run-1m" / "result.json").read_text())["metrics"]
print(json.dumps({"wall_s": round(wall), **{k: m.get(k) for k in (
    "train_seconds", "epochs", "samples_per_s", "rmse", "auc", "train_rows")}}))
print(f"training {m.get('train_seconds', 0):.0f} s (target < 300 s)")
PY

echo "== 3. serve_bench (valifi serve on the GPU)"
"$py" bench/serve_bench.py 2>&1 | tee "$out/serve_bench.txt"
echo "results in $out/"
