#!/usr/bin/env bash
# One prepared GPU check for a session whose task is lent a device machine (see docs/gpu_checks.md).
#
# HOW TO CALL (device time is 15 min per session in total, 10 min per command, a start costs 1-2 min):
#   1. here, on the CPU machine (needs PyPI):   bash bench/device_prepare.sh
#      -> .device_carry/ (git-ignored): wheels of the packages the GPU image lacks (trl, datasets, SimpleITK, ...),
#         sam2 / iopath / antlr4 as pure-Python folders, and a copy of the sample CT cache; ~57 MiB with the tree.
#   2. the device tool, once:
#        run(command="bash bench/device_check.sh", carry=[".device_carry"], timeout_s=600)
#      then give_back (unless you rerun at once). To rerun only some benches (e.g. after a fix):
#        run(command="BENCHES='grpo' bash bench/device_check.sh", carry=[".device_carry"], timeout_s=300)
#
# The device machine: python3 3.12 (/opt/torch/.venv) with torch 2.11 (CUDA 13), transformers 5.17, peft,
# accelerate, timm, scipy, pyarrow; no network, no pip index. A carried .venv (5+ GB) cannot travel (64 MiB
# limit), so this script installs the carried wheels with `pip --no-index --target /tmp/site` and puts
# /tmp/site, .device_carry/pure and the repo root on PYTHONPATH (MedVolR1Lib runs from the working tree).
# NOTE: the CPU tests here use transformers 5.24; the GPU image has 5.17 (its versions are printed first).
#
# What it does: prints nvidia-smi and the versions, then runs gpu_bench_medsam2.py, gpu_bench_qwen.py and
# gpu_bench_grpo.py for Qwen2.5-VL-3B, then gpu_bench_qwen.py and gpu_bench_grpo.py with --family qwen3-vl
# (the MedVol-R1 release's recipe: Qwen3-VL-4B-sized, 64 views of 256 px + 256 new tokens; one GRPO step
# with G = 4, LoRA r128 and MedSAM2-size coherence; peak memory), one after the other, each under `timeout`
# (100 + 110 + 150 + 100 + 130 s: at most 9.8 min), keeps going after a failure, and ends with one summary
# line per bench (ok / failed rc=N / timed out). With less device time, run the Qwen3-VL pair alone first:
#        run(command="BENCHES='qwen3 grpo_qwen3' bash bench/device_check.sh", carry=[".device_carry"], timeout_s=300)
# Files under $OUT (default ./device_out): device_check.log (everything), medsam2.json, qwen.json, grpo.json,
# qwen3.json, grpo_qwen3.json, summary.txt (7 files; the tool returns at most 8).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/device_out}
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
: > "$LOG"
PY=${PYTHON:-python3}
CARRY=${CARRY_DIR:-$ROOT/.device_carry}
BENCHES=${BENCHES:-"medsam2 qwen grpo qwen3 grpo_qwen3"}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

say() { echo "$*" | tee -a "$LOG"; }

{
  echo "== device_check $(date -u +%FT%TZ) in $ROOT, OUT=$OUT"
  nvidia-smi || echo "nvidia-smi: not available"
  uname -a
} 2>&1 | tee -a "$LOG"

# Install what the GPU image lacks (only when the carry folder came along).
if [ -d "$CARRY/wheels" ] && ls "$CARRY"/wheels/*.whl >/dev/null 2>&1; then
  { "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$CARRY"/wheels/*.whl \
      && echo "installed $(ls "$CARRY"/wheels | wc -l) wheels into /tmp/site"; } 2>&1 | tee -a "$LOG"
  export PYTHONPATH="/tmp/site:$CARRY/pure:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  say "no $CARRY/wheels: using $PY's own packages (run bench/device_prepare.sh here first for the GPU machine)"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
SAMPLE_ARGS=()
if [ -f "$CARRY/cache/sample_ct/example_ct.nii.gz" ]; then
  export MEDVOLR1_CACHE="$CARRY/cache"
  SAMPLE_ARGS=(--sample-dir "$CARRY/cache")
fi

"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
try:
    import torch
    print("torch", torch.__version__, "CUDA build", torch.version.cuda, "available", torch.cuda.is_available(),
          "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
except Exception as exc:
    print("torch: import failed:", exc)
for name in ("transformers", "trl", "peft", "accelerate", "datasets", "pyarrow", "sam2", "hydra", "SimpleITK", "MedVolR1Lib"):
    try:
        module = importlib.import_module(name)
        print(f"{name:12s} {getattr(module, '__version__', '?')}  {getattr(module, '__file__', '')}")
    except Exception as exc:
        print(f"{name:12s} IMPORT FAILED: {type(exc).__name__}: {exc}")
EOF

declare -A RESULT
run_bench() {  # name, timeout seconds, command...
  local name=$1 limit=$2
  shift 2
  say "== $name: timeout ${limit}s: $*"
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local took=$((SECONDS - start))
  if [ "$rc" -eq 0 ]; then
    RESULT[$name]="ok (${took} s)"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    RESULT[$name]="timed out after ${limit} s"
  elif [ "$rc" -eq 2 ]; then
    RESULT[$name]="failed rc=2 (no CUDA, or bad arguments) after ${took} s"
  else
    RESULT[$name]="failed rc=$rc after ${took} s"
  fi
}

for bench in $BENCHES; do
  case $bench in
    medsam2) run_bench medsam2 100 "$PY" bench/gpu_bench_medsam2.py --json "$OUT/medsam2.json" ;;
    qwen) run_bench qwen 110 "$PY" bench/gpu_bench_qwen.py --json "$OUT/qwen.json" ;;
    grpo) run_bench grpo 150 "$PY" bench/gpu_bench_grpo.py "${SAMPLE_ARGS[@]}" --out /tmp/gpu_bench_grpo --json "$OUT/grpo.json" ;;
    qwen3) run_bench qwen3 100 "$PY" bench/gpu_bench_qwen.py --family qwen3-vl --repeats 2 --json "$OUT/qwen3.json" ;;
    grpo_qwen3) run_bench grpo_qwen3 130 "$PY" bench/gpu_bench_grpo.py --family qwen3-vl --steps 2 "${SAMPLE_ARGS[@]}" \
                  --out /tmp/gpu_bench_grpo_qwen3 --json "$OUT/grpo_qwen3.json" ;;
    *) RESULT[$bench]="unknown bench (choose medsam2 qwen grpo qwen3 grpo_qwen3)" ;;
  esac
done

: > "$OUT/summary.txt"
say "== summary"
failed=0
for bench in $BENCHES; do
  line="$bench: ${RESULT[$bench]}"
  echo "$line" | tee -a "$LOG" >> "$OUT/summary.txt"
  case ${RESULT[$bench]} in ok*) ;; *) failed=1 ;; esac
done
cat "$OUT/summary.txt"
exit $failed
