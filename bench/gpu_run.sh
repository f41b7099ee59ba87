#!/usr/bin/env bash
# One prepared GPU run: throughput table, then --preset paper training of SIM, GIM and CPC (each for as
# long as its time box allows; an interrupted run keeps its checkpoint), then python -m train.report.
#
#   bench/gpu_run.sh [--dry-run] [--corpus DIR] [--wheels DIR] OUT_DIR
#
# For a CUDA machine with torch installed and no network, run from the repository root. Everything it
# writes goes to OUT_DIR: gpu_run.log (all output, time-stamped steps), env.txt, throughput.md,
# compare.md, runs/{sim,gim,cpc}/, report/ and summary.md (what ran, how long, exit status, clips seen).
# A step that fails or runs out of time is recorded in summary.md and the script goes on to the next.
#
#   --corpus DIR   an embedded corpus folder already built (python -m train.corpus --out DIR); without
#                  it the corpus is synthesised into OUT_DIR/corpus (needs espeakng-loader, ~10 s)
#   --wheels DIR   install missing Python packages from this folder, offline; fill it beforehand on a
#                  machine with network and the same Python version:
#                  pip download -d DIR numpy soundfile soxr tqdm tensorboard matplotlib espeakng-loader
#   --dry-run      tiny sizes on the CPU (what CI runs: the same steps, a few minutes on 2 cores)
#
# Time boxes (seconds; environment variables override them), 7 min 20 s in all on a GPU, leaving
# time for the corpus and the checks within 8 minutes:
#   SIM_GPU_THROUGHPUT_S=90 SIM_GPU_COMPARE_S=45 SIM_GPU_SIM_S=120 SIM_GPU_GIM_S=60 SIM_GPU_CPC_S=45
#   SIM_GPU_REPORT_S=80
# PYTHON selects the interpreter (default python3).
set -uo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-2}"; }

dry=0 corpus="" wheels="" out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --corpus) corpus="${2:?--corpus needs a folder}"; shift ;;
    --wheels) wheels="${2:?--wheels needs a folder}"; shift ;;
    -h|--help) usage 0 ;;
    -*) echo "error: unknown option $1" >&2; usage ;;
    *) [ -z "$out" ] || { echo "error: one OUT_DIR only" >&2; usage; }; out="$1" ;;
  esac
  shift
done
[ -n "$out" ] || { echo "error: OUT_DIR missing" >&2; usage; }
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out/runs" || exit 2
out="$(cd "$out" && pwd)"
log="$out/gpu_run.log" summary="$out/summary.md"
: > "$log"
printf '# gpu_run.sh summary\n\n| step | status | seconds |\n|---|---|---|\n' > "$summary"

say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$log"; }

# step NAME SECONDS CMD...: run with a time box (SIGINT first, so training saves; KILL 30 s later);
# its output goes to the log, and also to the file $STEP_OUT when that is set
step() {
  local name="$1" limit="$2" t0 rc status
  shift 2
  say "== $name (time box ${limit}s): $*"
  t0=$(date +%s)
  timeout --signal=INT --kill-after=30 "$limit" "$@" 2>> "$log" | tee -a "$log" > "${STEP_OUT:-/dev/null}"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status="ok" ;;
    124|130) status="stopped at its time box (exit $rc)" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  say "== $name: $status"
  echo "| $name | $status | $(( $(date +%s) - t0 )) |" >> "$summary"
  return $rc
}

if [ "$dry" = 1 ]; then
  device=cpu
  bench_sizes="2" bench=(--channels 16 --steps 1 --warmup 1 --threads 1) compare=(--rounds 1 --batch-sizes 2) fast=()
  model=(--channels 16 --hidden 8 --max-clips 8 --epochs 1 --threads 1)
  report=(--seeds 1 --probe-epochs 1 --decoder-epochs 1 --supervised-epochs 1 --no-baselines --pairs 4
          --traverse-dims 1 --traverse-steps 2 --interp-steps 2 --examples 1 --recon-words 4 --ood-words 0)
  : "${SIM_GPU_THROUGHPUT_S:=120}" "${SIM_GPU_COMPARE_S:=120}" "${SIM_GPU_SIM_S:=120}" "${SIM_GPU_GIM_S:=120}"
  : "${SIM_GPU_CPC_S:=120}"
  : "${SIM_GPU_REPORT_S:=300}"
else
  device=cuda
  bench_sizes="8 16 32 64 128 256 512" bench=(--steps 5 --warmup 3) compare=(--rounds 3 --batch-sizes 256)
  fast=(--autocast bf16)
  model=()
  report=(--seeds 2 --probe-epochs 20 --decoder-epochs 20 --supervised-epochs 3 --pairs 50 --ood-words 50)
  : "${SIM_GPU_THROUGHPUT_S:=90}" "${SIM_GPU_COMPARE_S:=45}" "${SIM_GPU_SIM_S:=120}" "${SIM_GPU_GIM_S:=60}"
  : "${SIM_GPU_CPC_S:=45}" "${SIM_GPU_REPORT_S:=80}"
fi

say "gpu_run.sh $([ "$dry" = 1 ] && echo '(dry run, CPU)') -> $out"
# preflight: the interpreter, torch, CUDA and the packages training and the report import
if [ -n "$wheels" ]; then
  step "install wheels" 120 "$PY" -m pip install --no-index --find-links "$wheels" \
    numpy soundfile soxr tqdm tensorboard matplotlib espeakng-loader
fi
if ! "$PY" - "$device" > "$out/env.txt" 2>> "$log" <<'EOF'
import importlib, platform, subprocess, sys
import torch
device = sys.argv[1]
missing = [m for m in ("numpy", "soundfile", "soxr", "tqdm", "tensorboard", "matplotlib") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {' '.join(missing)} (give --wheels DIR, see --help)")
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device (use --dry-run for the CPU check)")
print(f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads")
if device == "cuda":
    print(f"cuda {torch.version.cuda}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
    print(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
print("code", rev.stdout.strip() or "unknown")
EOF
then
  say "preflight failed: $(tail -n 1 "$log")"
  echo "| preflight | FAILED | 0 |" >> "$summary"
  exit 1
fi
say "preflight: $(head -n 2 "$out/env.txt" | tr '\n' ' ')"

if [ -n "$corpus" ]; then
  [ -f "$corpus/corpus.json" ] || { say "error: $corpus is not a built corpus (no corpus.json)"; exit 1; }
  corpus="$(cd "$corpus" && pwd)"
else
  corpus="$out/corpus"
  [ -f "$corpus/corpus.json" ] || step "corpus" 300 "$PY" -m train.corpus --out "$corpus" --no-progress \
    || { say "no corpus: give --corpus DIR or install espeakng-loader"; exit 1; }
fi

# shellcheck disable=SC2086
STEP_OUT="$out/throughput.md" step "throughput" "$SIM_GPU_THROUGHPUT_S" "$PY" bench/train_throughput.py \
  --device "$device" --batch-sizes $bench_sizes "${bench[@]}" "${fast[@]}"
# the old step against the new one (see bench/train_throughput.py --compare)
STEP_OUT="$out/compare.md" step "compare" "$SIM_GPU_COMPARE_S" "$PY" bench/train_throughput.py \
  --device "$device" --compare "${bench[@]}" "${compare[@]}" "${fast[@]}"

trained=()
for method in sim gim cpc; do
  limit_var="SIM_GPU_${method^^}_S"
  step "train $method" "${!limit_var}" "$PY" -m train.sim --method "$method" --preset paper --device "$device" \
    --corpus-dir "$corpus" --out "$out/runs/$method" "${model[@]}" "${fast[@]}"
  [ -f "$out/runs/$method/checkpoint.pt" ] && trained+=(--run "$method=$out/runs/$method")
done
# how far each run got (a run stopped at its time box has trained part of the paper's schedule)
"$PY" - "$out"/runs/*/checkpoint.pt >> "$summary" 2>> "$log" <<'EOF'
import sys, torch
print("\n| run | steps | clips seen | of the schedule | epoch, batch |\n|---|---|---|---|---|")
for path in sys.argv[1:]:
    c = torch.load(path, map_location="cpu", weights_only=True)
    cfg = c["config"]
    seen = c["step"] * cfg["batch_size"]
    print(f"| {cfg['method']} | {c['step']} of batch {cfg['batch_size']} | {seen:,} | {cfg['clips_seen']:,} | "
          f"{c['epoch']}, {c.get('batch', 0)} |")
EOF

if [ ${#trained[@]} -gt 0 ]; then
  printf '\n| step | status | seconds |\n|---|---|---|\n' >> "$summary"
  step "report" "$SIM_GPU_REPORT_S" "$PY" -m train.report "${trained[@]}" --out "$out/report" --corpus "$corpus" \
    --device "$device" "${report[@]}"
fi
say "done: $summary"
cat "$summary"
