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
# What it does (default BENCHES="grpo_release eval_sharded", at most 330 + 240 s = 9.5 min): prints nvidia-smi and
# the versions, then
#   grpo_release  gpu_bench_grpo.py --family qwen3-vl --recipe Training/configs/ctorg-release.yaml: 3 GRPO steps of a
#                 Qwen3-VL-4B-sized random-weight policy (LoRA r128 with the vision tower, G = 4, beta 0.01), 64 views
#                 of 256 px of the sample CT, the release's CT-ORG reward (reward_mode release: format / time / space /
#                 consistency at 0.25 each) with the consistency term through MedSAM2 (real-size random SAM2.1-tiny at
#                 512 px) in bf16, +-5 slices; 256 new tokens (the recipe allows 2048: tokens/s gives that step's time);
#   eval_sharded  the test records of the sample CT (64 views of 256 px) evaluated in 2 shards, one process each on
#                 the same GPU (Training/evaluate.py --shard i/2, then --merge), at most 2 records, tiny Qwen3-VL policy
#                 and the random real-size MedSAM2 over the whole volume: the sharding and merge path on a GPU;
# each under `timeout`, going on after a failure, and ends with one summary line per bench (ok / failed rc=N /
# timed out) plus the grpo SUMMARY line (generated tokens/s, step time, peak memory). The older benches stay
# available by name: BENCHES='medsam2 qwen grpo qwen3 grpo_qwen3'.
# TINY=1: the same benches on CPU with the tiny fixtures (micro SAM2 / LiteMedSAM); DRY_RUN=1: print the commands
# and check that the scripts take their flags, run nothing (both used by Testing/test_device_check.py).
# Files under $OUT (default ./device_out): device_check.log, grpo_release.json, eval_sharded/ (the merged report),
# summary.txt.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/device_out}
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
: > "$LOG"
PY=${PYTHON:-python3}
CARRY=${CARRY_DIR:-$ROOT/.device_carry}
BENCHES=${BENCHES:-"grpo_release eval_sharded"}
TINY=${TINY:-0}
DRY_RUN=${DRY_RUN:-0}
WORK=${WORK:-/tmp/medvolr1_device_check}
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
  if [ "$DRY_RUN" = 1 ]; then
    RESULT[$name]="dry run"
    return
  fi
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

TINY_ARGS=()
if [ "$TINY" = 1 ]; then
  TINY_ARGS=(--tiny --steps 1 --coherence-repeats 0 --max-completion-length 8)
fi

eval_sharded() {  # prepare 64 views of the sample CT, evaluate 2 shards side by side, merge them
  local work=$WORK/eval_sharded views=64 size=256 device=cuda propagator=(--propagator medsam2)
  rm -rf "$work" && mkdir -p "$work"
  if [ "$TINY" = 1 ]; then
    views=4 size=128 device=cpu propagator=(--propagator litemedsam --eval_window 1)
  else
    local ckpt=$work/random_sam2.1_hiera_t512.pt
    "$PY" -c "import sys; from MedVolR1Lib.fixtures.micro_sam2 import save_random_sam2_checkpoint as s; s(sys.argv[1], [], seed=0)" "$ckpt" || return 1
    propagator+=(--sam_checkpoint "$ckpt" --eval_window -1)
  fi
  local smoke=Training/configs/cpu-smoke.yaml start=$SECONDS
  "$PY" Training/prepare_data.py --config $smoke --out_dir "$work/data" --num_views $views --image_size $size || return 1
  echo "prepare: $((SECONDS - start)) s"
  local pids=() i
  for i in 0 1; do
    "$PY" Training/evaluate.py --config $smoke --eval_data_dir "$work/data" --report_dir "$work/eval" \
      --checkpoints grpo=tiny-qwen3 --tiny_model_dir "$work/tiny" --device $device "${propagator[@]}" \
      --max_records 2 --blank_control false --max_new_tokens 64 --shard $i/2 > "$work/shard$i.log" 2>&1 &
    pids+=($!)
  done
  start=$SECONDS
  local rc=0
  for i in 0 1; do wait "${pids[$i]}" || rc=1; tail -n 5 "$work/shard$i.log"; done
  echo "2 shards side by side: $((SECONDS - start)) s"
  [ $rc -eq 0 ] || return 1
  "$PY" Training/evaluate.py --merge "$work/eval" || return 1
  mkdir -p "$OUT/eval_sharded" && cp "$work"/eval/*.md "$work"/eval/*.csv "$OUT/eval_sharded/" 2>/dev/null
  cat "$work"/eval/results.csv 2>/dev/null
}

export -f eval_sharded
export PY WORK TINY OUT

if [ "$DRY_RUN" = 1 ]; then  # the flags these benches pass must exist in the scripts they call
  for pair in "bench/gpu_bench_grpo.py --recipe" "bench/gpu_bench_grpo.py --coherence-repeats" \
              "Training/evaluate.py --shard" "Training/evaluate.py --merge"; do
    set -- $pair
    if "$PY" "$1" --help 2>/dev/null | grep -q -- "$2"; then say "flag ok: $1 $2"; else say "flag MISSING: $1 $2"; DRY_FAILED=1; fi
  done
fi

for bench in $BENCHES; do
  case $bench in
    grpo_release) run_bench grpo_release 330 "$PY" bench/gpu_bench_grpo.py --family qwen3-vl --recipe Training/configs/ctorg-release.yaml \
                    --steps 3 --coherence-repeats 1 "${SAMPLE_ARGS[@]}" "${TINY_ARGS[@]}" --out "$WORK/grpo_release" --json "$OUT/grpo_release.json" ;;
    eval_sharded) run_bench eval_sharded 240 bash -c eval_sharded ;;
    medsam2) run_bench medsam2 100 "$PY" bench/gpu_bench_medsam2.py --json "$OUT/medsam2.json" ;;
    qwen) run_bench qwen 110 "$PY" bench/gpu_bench_qwen.py --json "$OUT/qwen.json" ;;
    grpo) run_bench grpo 150 "$PY" bench/gpu_bench_grpo.py "${SAMPLE_ARGS[@]}" --out /tmp/gpu_bench_grpo --json "$OUT/grpo.json" ;;
    qwen3) run_bench qwen3 100 "$PY" bench/gpu_bench_qwen.py --family qwen3-vl --repeats 2 --json "$OUT/qwen3.json" ;;
    grpo_qwen3) run_bench grpo_qwen3 130 "$PY" bench/gpu_bench_grpo.py --family qwen3-vl --steps 2 "${SAMPLE_ARGS[@]}" \
                  --out /tmp/gpu_bench_grpo_qwen3 --json "$OUT/grpo_qwen3.json" ;;
    *) RESULT[$bench]="unknown bench (choose grpo_release eval_sharded medsam2 qwen grpo qwen3 grpo_qwen3)" ;;
  esac
done

: > "$OUT/summary.txt"
say "== summary"
failed=0
for bench in $BENCHES; do
  line="$bench: ${RESULT[$bench]}"
  echo "$line" | tee -a "$LOG" >> "$OUT/summary.txt"
  case ${RESULT[$bench]} in ok*|"dry run") ;; *) failed=1 ;; esac
done
grep -h "^SUMMARY" "$LOG" | tee -a "$OUT/summary.txt"
[ "${DRY_FAILED:-0}" = 1 ] && failed=1
cat "$OUT/summary.txt"
exit $failed
