#!/usr/bin/env bash
# The coordination benchmark matrix: {mpirun, torchrun} x {2, 4 ranks} x in-flight sizes,
# kvdist vs the two pickled-object baselines in each run. Writes
# $OUT_DIR/coordination.json and $OUT_DIR/coordination.md (default benchmarks/results).
#
# Settings (environment): RANKS ("2 4"), LAUNCHERS ("mpirun torchrun"), SIZES
# (1,16,64,256,1024), STEPS (200), MIN_STEPS (50), WARMUP (30), BUDGET_S (per size, 40),
# RUN_TIMEOUT_S (per run, 600), PYTHON (python), OUT_DIR, and any extra arguments are
# passed to every run. Uses launch/mpirun.sh and launch/torchrun.sh when they exist, else
# mpiexec and torchrun directly.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
cd "$root"

RANKS="${RANKS:-2 4}"
LAUNCHERS="${LAUNCHERS:-mpirun torchrun}"
SIZES="${SIZES:-1,16,64,256,1024}"
STEPS="${STEPS:-200}"
MIN_STEPS="${MIN_STEPS:-50}"
WARMUP="${WARMUP:-30}"
BUDGET_S="${BUDGET_S:-40}"
RUN_TIMEOUT_S="${RUN_TIMEOUT_S:-600}"
PYTHON="${PYTHON:-python}"
OUT_DIR="${OUT_DIR:-$here/results}"

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

launcher_prefix() {  # sets $prefix: the command that starts N ranks of a command
    local launcher="$1" n="$2"
    case "$launcher" in
    mpirun)
        if [[ -x launch/mpirun.sh ]]; then prefix=(launch/mpirun.sh -n "$n" --)
        else prefix=(mpiexec -n "$n"); fi
        ;;
    torchrun)
        if [[ -x launch/torchrun.sh ]]; then prefix=(launch/torchrun.sh -n "$n" --)
        else prefix=(torchrun --standalone --nproc-per-node "$n" --no-python); fi
        ;;
    *)
        echo "unknown launcher $launcher (want mpirun or torchrun)" >&2
        exit 2
        ;;
    esac
}

parts_dir="$(mktemp -d)"
trap 'rm -rf "$parts_dir"' EXIT
mkdir -p "$OUT_DIR"
commands=()
parts=()
for launcher in $LAUNCHERS; do
    for n in $RANKS; do
        part="$parts_dir/$launcher-$n.json"
        args=(--sizes "$SIZES" --steps "$STEPS" --min-steps "$MIN_STEPS" --warmup "$WARMUP"
              --budget-s "$BUDGET_S" "$@")
        launcher_prefix "$launcher" "$n"
        cmd=("${prefix[@]}" "$PYTHON" benchmarks/coordination.py "${args[@]}")
        echo "== ${cmd[*]}" >&2
        commands+=("${cmd[*]}")
        timeout "$RUN_TIMEOUT_S" "${cmd[@]}" --json "$part"
        parts+=("$part")
    done
done

summary="benchmarks/run_coordination.sh:"
for c in "${commands[@]}"; do summary+=" [$c]"; done
"$PYTHON" benchmarks/coordination.py report "${parts[@]}" \
    --json "$OUT_DIR/coordination.json" --md "$OUT_DIR/coordination.md" --command "$summary"
echo "wrote $OUT_DIR/coordination.json and $OUT_DIR/coordination.md" >&2
