#!/usr/bin/env bash
# Everything one lent GPU machine runs (issue 19 items 4 and 7), in one command, within 540 s:
#
#     mkdir -p data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz data/fashion-mnist/
#     run(command="bash benchmarks/gpu_session.sh", carry=["data/fashion-mnist"], timeout_s=600)
#     bash benchmarks/gpu_session.sh --smoke      # here, on the CPU, at a tiny scale (~5 min on 2 cores)
#
# The machine has torch, numpy, pyarrow and Pillow, and no Ray, boto3, scikit-learn or
# matplotlib: everything runs in-process (benchmarks/al_quality.py), results are JSON + .md.
# In parallel, in the background, each bounded by `timeout`:
#   (a) the reference recipe (ResNet-18, SGD 0.1 / momentum 0.9 / wd 5e-4, batch 128, crop + flip,
#       x0.1 at 80% of the epochs, warm start, 1,000 + 1,000 per cycle; reference code: a random
#       10k subset is scored), tidal-entropy vs margin, seed 0: one epoch is timed first and the
#       epochs (then the cycles) are cut to fit REF_SECONDS; the log says what was cut;
#   (b) the evidence matrix: al_quality arms (issue 19 item 4) for the regimes large, balanced,
#       imbalanced, cold x seeds 0,1,2, one process per (regime, seed, arm), JOBS at a time,
#       each bounded by the time left; a run not started or not finished by the deadline is
#       simply missing (every finished run is its own JSON);
#   (c) benchmarks/gpu_resume.py (another engineer's CUDA resume check), when it exists.
# Then the per-run JSONs are merged into $OUT/results/fashion-mnist-<regime>.json.
#
# Environment: OUT (default: a new temp dir), PYTHON (default: python3), DEVICE (cuda; cpu
# for --smoke), JOBS, TOTAL_SECONDS (540), REF_SECONDS (300), TIDAL_RAY_FASHION_MNIST_DIR;
# REGIMES, SEEDS, ARMS_ONLY (comma-separated) narrow the matrix; REFERENCE=0 skips (a);
# TUNE=1 replaces the matrix by the choice of beta and K on a pool split (below).
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d /tmp/gpu-session-XXXX)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "${TIDAL_RAY_FASHION_MNIST_DIR:-}" ]]; then
    TIDAL_RAY_FASHION_MNIST_DIR=data/fashion-mnist
    [[ -d $TIDAL_RAY_FASHION_MNIST_DIR ]] || TIDAL_RAY_FASHION_MNIST_DIR=/usr/share/datasets/fashion-mnist
fi
export TIDAL_RAY_FASHION_MNIST_DIR
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
START=$(date +%s)
TOTAL=${TOTAL_SECONDS:-540}
REGIMES=${REGIMES:-"large balanced imbalanced cold"}
SEEDS=${SEEDS:-"0 1 2"}
if ((SMOKE)); then
    DEVICE=${DEVICE:-cpu}
    JOBS=${JOBS:-2}
    REF_SECONDS=${REF_SECONDS:-20}
    SEEDS=${SMOKE_SEEDS:-0}
    TINY=(--initial 20 --k 10 --cycles 1 --pool-rows 600 --test-rows 200 --epochs 1 --min-steps 2)
    REF_TINY=(--pool-rows 300 --test-rows 200 --initial 20 --k 20 --cycles 1)
    RUN_TIMEOUT=${RUN_TIMEOUT:-900}
    TOTAL=${TOTAL_SECONDS:-3600}        # a functional check: a loaded 2-core CPU is far slower
else
    DEVICE=${DEVICE:-cuda}
    JOBS=${JOBS:-13}                    # 16 cores: 13 matrix runs + the reference's 2 + the driver
    REF_SECONDS=${REF_SECONDS:-300}
    TINY=()
    REF_TINY=()
    RUN_TIMEOUT=${RUN_TIMEOUT:-480}
fi
DEADLINE=$((START + TOTAL - 25))        # leaves time for the merge
mkdir -p "$OUT/logs" "$OUT/runs" "$OUT/results"
echo "gpu_session: out $OUT, device $DEVICE, jobs $JOBS, smoke $SMOKE, data $TIDAL_RAY_FASHION_MNIST_DIR" \
    | tee "$OUT/session.txt"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import torch, numpy, pyarrow; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'numpy', numpy.__version__, 'pyarrow', pyarrow.__version__)"
    echo "cpus: $(getconf _NPROCESSORS_ONLN)"
} 2>&1 | tee -a "$OUT/session.txt"

left() { echo $((DEADLINE - $(date +%s))); }

# (a) the reference recipe
REF_TIMEOUT=$((TOTAL - 40))
REF_PID=
[[ "${REFERENCE:-1}" == 1 ]] && timeout -k 5 "$REF_TIMEOUT" "$PY" benchmarks/al_quality.py --dataset fashion-mnist --regime reference --seeds 1 \
    --device "$DEVICE" --jobs 2 --fit-seconds "$REF_SECONDS" --runs-dir "$OUT/runs" --out "$OUT/results" \
    "${REF_TINY[@]}" > "$OUT/logs/reference.log" 2>&1 &
[[ "${REFERENCE:-1}" == 1 ]] && REF_PID=$!
REFERENCE_RUNS=0
[[ -n "$REF_PID" ]] && REFERENCE_RUNS=2

# (c) the CUDA resume check, when another engineer has added it
RESUME_PID=
if [[ -f benchmarks/gpu_resume.py ]]; then
    mkdir -p "$OUT/resume"
    OUT="$OUT/resume" timeout -k 5 120 "$PY" benchmarks/gpu_resume.py > "$OUT/logs/gpu_resume.log" 2>&1 &
    RESUME_PID=$!
fi

# (b) the evidence matrix: one line per (regime, seed, arm), large and balanced first; --smoke
# runs each arm once (in the first regime that has it) and every regime at least once
# TUNE=1 runs instead the choice of beta and K on a pool split (accuracy on 5,000 held-out pool
# rows, never the test split): balanced, margin under power 1/2/4 and cluster 50/200/1000.
"$PY" - "$REGIMES" "$SEEDS" "$SMOKE" "${TUNE:-0}" "${ARMS_ONLY:-}" > "$OUT/matrix.txt" <<'PYEOF'
import sys
sys.path.insert(0, "benchmarks")
from al_arms import ARMS
seen = set()
only = set(filter(None, sys.argv[5].split(",")))
if sys.argv[4] == "1":
    for seed in sys.argv[2].split():
        for arm in ["margin", "margin-power1", "margin-power2", "margin-power4", "margin-cluster50",
                    "margin-cluster200", "margin-cluster1000"]:
            if not only or arm in only:
                print("balanced", seed, arm, "--pool-split", 5000)
    sys.exit()
for regime in sys.argv[1].split():
    for seed in sys.argv[2].split():
        arms = [a for a in ARMS[regime] if not only or a in only]
        if sys.argv[3] == "1":
            arms = [a for a in arms if a not in seen] or arms[:1]
            seen.update(arms)
        for arm in arms:
            print(regime, seed, arm)
PYEOF
echo "matrix: $(wc -l < "$OUT/matrix.txt") runs, $JOBS at a time" | tee -a "$OUT/session.txt"

run_cell() {  # regime seed arm [more al_quality args]: one run, bounded by the time left
    local regime=$1 seed=$2 arm=$3 budget
    budget=$(left)
    ((budget > RUN_TIMEOUT)) && budget=$RUN_TIMEOUT
    if ((budget < 20)); then
        echo "skipped $regime $seed $arm: ${budget} s left" >> "$OUT/logs/skipped.txt"
        return 0
    fi
    local started=$(date +%s)
    timeout -k 5 "$budget" "$PY" benchmarks/al_quality.py --dataset fashion-mnist --regime "$regime" --seeds 1 \
        --first-seed "$seed" --arms "$arm" --device "$DEVICE" --runs-dir "$OUT/runs" --out "$OUT/results" \
        "${TINY[@]}" "${@:4}" > "$OUT/logs/$regime-$seed-$arm.log" 2>&1
    echo "$regime $seed $arm rc=$? $(( $(date +%s) - started )) s" >> "$OUT/logs/cells.txt"
}
export -f run_cell left
export PY DEVICE OUT DEADLINE RUN_TIMEOUT
export TINY_ARGS="${TINY[*]}"
# bash cannot export arrays: the cells rebuild TINY from a string
xargs -P "$JOBS" -L 1 bash -c 'TINY=($TINY_ARGS); run_cell "$@"' _ < "$OUT/matrix.txt"

[[ -n "$REF_PID" ]] && { wait "$REF_PID"; echo "reference rc=$?" | tee -a "$OUT/session.txt"; }
[[ -n "$RESUME_PID" ]] && { wait "$RESUME_PID"; echo "gpu_resume rc=$?" | tee -a "$OUT/session.txt"; }

MERGES=($REGIMES)
[[ "${TUNE:-0}" == 1 ]] && MERGES=("balanced --pool-split 5000")
MERGES+=(reference)
for merge in "${MERGES[@]}"; do
    # shellcheck disable=SC2086  # "balanced --pool-split 5000" is meant to split
    "$PY" benchmarks/al_quality.py --dataset fashion-mnist --regime $merge --merge --no-plot \
        --runs-dir "$OUT/runs" --out "$OUT/results" >> "$OUT/logs/merge.log" 2>&1 \
        || echo "merge $merge failed (see logs/merge.log)" | tee -a "$OUT/session.txt"
done
grep -h "reference recipe on" "$OUT/logs/reference.log" 2>/dev/null | tee -a "$OUT/session.txt"
echo "finished runs: $(find "$OUT/runs" -name '*.json' | wc -l) of $(( $(wc -l < "$OUT/matrix.txt") + REFERENCE_RUNS )); cells:" \
    | tee -a "$OUT/session.txt"
sort "$OUT/logs/cells.txt" 2>/dev/null | tee -a "$OUT/session.txt"
echo "wall $(( $(date +%s) - START )) s; results in $OUT/results" | tee -a "$OUT/session.txt"
# One archive of everything: the device tool brings back a limited number of files, and
# on 2026-12-04 the per-run JSONs were left behind (only logs/ came back).
tar czf "$OUT/session.tgz" -C "$OUT" --exclude session.tgz . && echo "archive: $OUT/session.tgz"
