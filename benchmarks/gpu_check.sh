#!/usr/bin/env bash
# The GPU checks in one command, for a machine with an NVIDIA GPU and CUDA torch:
#
#     bash benchmarks/gpu_check.sh [WORKDIR]
#
# 1. benchmarks/score_throughput.py --device cuda (ResNet-18 on 3x32x32: model only vs the
#    Ray pipeline vs in-process, one GPU scorer actor);
# 2. a 1-GPU Ray Train run with nccl (`tidal-ray train --use-gpu --workers 1`) on a made pool;
# 3. `tidal-ray score --use-gpu` with that checkpoint, fp32 then bf16, and how many of the
#    selected ids the two precisions share.
# Prints the figures; JSON and logs go under benchmarks/out/gpu_check/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
TIDAL=${TIDAL_RAY:-.venv/bin/tidal-ray}
OUT=benchmarks/out/gpu_check
WORK=${1:-$(mktemp -d /tmp/gpu-check-XXXX)}
mkdir -p "$OUT" "$WORK"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch has no CUDA here'; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

echo "== 1. score_throughput --device cuda"
"$PY" benchmarks/score_throughput.py --device cuda --rows 50000 --model-rows 8192 --nice 0 \
    --workdir "$WORK/throughput" --out "$OUT/score_throughput_cuda.json" | tee "$OUT/score_throughput_cuda.log"

echo "== 2. 1-GPU Ray Train (nccl)"
"$TIDAL" make-pool "$WORK/labeled" --source synthetic --rows 5000 --format pixels --shape 3x32x32 --seed 1
"$TIDAL" make-pool "$WORK/pool" --source synthetic --rows 50000 --format pixels --shape 3x32x32 --shards 8
started=$(date +%s.%N)
"$TIDAL" train --labeled "$WORK/labeled" --out "$WORK/train" --backbone resnet18 --epochs 3 --workers 1 \
    --use-gpu --checkpoint-every 3 | tee "$OUT/train.log"
echo "train wall seconds: $(echo "$(date +%s.%N) - $started" | bc)" | tee -a "$OUT/train.log"
CHECKPOINT=$(sed -n 's/^checkpoint: //p' "$OUT/train.log" | tail -1)

echo "== 3. score --use-gpu, fp32 and bf16"
for precision in fp32 bf16; do
    "$TIDAL" score --checkpoint "$CHECKPOINT" --pool "$WORK/pool" --k 500 --out "$WORK/score-$precision" \
        --use-gpu --precision "$precision" --batch-size 1024 | tee "$OUT/score-$precision.log"
done
"$PY" - "$WORK" <<'PYEOF' | tee "$OUT/precision.txt"
import json, sys
import pyarrow.parquet as pq
work = sys.argv[1]
picked = {p: set(pq.read_table(f"{work}/score-{p}/selection.parquet").column("id").to_pylist()) for p in ("fp32", "bf16")}
timing = {p: json.load(open(f"{work}/score-{p}/selection.json"))["timing"] for p in ("fp32", "bf16")}
print(f"selected ids shared by fp32 and bf16: {len(picked['fp32'] & picked['bf16'])} of {len(picked['fp32'])}")
for p, t in timing.items():
    print(f"{p}: steady {t['steady_rows_per_s']} rows/s after a start-up of {t['first_row_seconds']} s")
PYEOF
echo "figures and logs: $OUT"
