#!/usr/bin/env bash
# One-shot CUDA check of Recon3D: everything a lent GPU machine has to run, in one script.
#
#   bench/gpu_check.sh [--cpu-only] [--bundle DIR]
#
# 1. installs the `gpu` extra (pip install -e '.[gpu]') and compiles nvdiffrast's CUDA
#    kernels (its first RasterizeCudaContext JIT-builds them with ninja);
# 2. runs the `cuda` tests (CUDA-vs-CPU render agreement, refinement on CUDA); a skipped
#    `cuda` test counts as a failure here, since it means CUDA was not usable;
# 3. times `recon3d reconstruct` on the sneaker: `fusion` and `nvdiffrec` at
#    $PRESET (balanced), each on CUDA and on the CPU path;
# 4. prints one table and exits non-zero if any step failed.
#
# Without a GPU (no nvidia-smi, or torch sees no CUDA device), or with --cpu-only, steps 1-2
# and the CUDA rows are reported as "skipped (no GPU)" and only the CPU rows run.
#
# Environment:
#   PYTHON        interpreter of the project's venv (default: python)
#   PIP_ARGS      extra pip arguments, e.g. "--no-index --find-links /wheels" on a machine
#                 without network access
#   PRESET        preset of the timed runs (default: balanced)
#   CPU_TIMEOUT_S limit of each CPU run, seconds (default 300): nvdiffrec balanced needs
#                 ~8 min on 2 cores, so on a short device lease the CPU row may say "timeout",
#                 which is reported, not failed
#   CUDA_TIMEOUT_S limit of each CUDA run, seconds (default 300)
#   OUT           folder for the runs' outputs (default: a temporary folder)
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python}"
PRESET="${PRESET:-balanced}"
CPU_TIMEOUT_S="${CPU_TIMEOUT_S:-300}"
CUDA_TIMEOUT_S="${CUDA_TIMEOUT_S:-300}"
BUNDLE="$ROOT/../shared/data/seed-example/input"
CPU_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-only) CPU_ONLY=1 ;;
    --bundle) BUNDLE="$2"; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
OUT="${OUT:-$(mktemp -d -t recon3d-gpu-check-XXXX)}"
mkdir -p "$OUT"
ROWS="$OUT/rows.tsv"
: > "$ROWS"
FAILED=0

row() {  # step, device, seconds, detail, result
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$ROWS"
  [ "$5" = "FAIL" ] && FAILED=1
  echo "[gpu_check] $1 ($2): $5 $4" >&2
}

elapsed() {  # seconds since a `date +%s.%N` stamp
  awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'
}

have_gpu() {
  command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L > /dev/null 2>&1 || return 1
}

if [ ! -d "$BUNDLE" ]; then
  echo "no bundle at $BUNDLE (pass --bundle DIR)" >&2
  exit 2
fi

GPU=0
if [ "$CPU_ONLY" = 0 ] && have_gpu; then GPU=1; fi
GPU_NAME="none"
[ "$GPU" = 1 ] && GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"

# ------------------------------------------------------------ 1. install and compile
if [ "$GPU" = 1 ]; then
  t0=$(date +%s.%N)
  # shellcheck disable=SC2086
  if "$PYTHON" -m pip install -q ${PIP_ARGS:-} -e ".[gpu]" > "$OUT/pip.log" 2>&1; then
    row "install gpu extra" "-" "$(elapsed "$t0")" "" "ok"
  else
    row "install gpu extra" "-" "$(elapsed "$t0")" "see $OUT/pip.log: $(tail -1 "$OUT/pip.log")" "FAIL"
  fi
  t0=$(date +%s.%N)
  if "$PYTHON" - > "$OUT/compile.log" 2>&1 <<'EOF'
import torch
import nvdiffrast.torch as dr

assert torch.cuda.is_available(), "torch sees no CUDA device (is the installed torch a CPU build?)"
ctx = dr.RasterizeCudaContext(device="cuda")  # JIT-compiles the CUDA kernels on first use
pos = torch.tensor([[[-0.5, -0.5, 0.0, 1.0], [0.5, -0.5, 0.0, 1.0], [0.0, 0.5, 0.0, 1.0]]], device="cuda")
tri = torch.tensor([[0, 1, 2]], dtype=torch.int32, device="cuda")
rast, _ = dr.rasterize(ctx, pos, tri, resolution=[16, 16])
assert int((rast[..., 3] > 0).sum()) > 0, "nvdiffrast rasterised nothing"
print(torch.cuda.get_device_name(0), "torch", torch.__version__, "cuda", torch.version.cuda)
EOF
  then
    row "compile nvdiffrast" "cuda" "$(elapsed "$t0")" "$(tail -1 "$OUT/compile.log")" "ok"
  else
    row "compile nvdiffrast" "cuda" "$(elapsed "$t0")" "see $OUT/compile.log: $(tail -1 "$OUT/compile.log")" "FAIL"
  fi
else
  row "install gpu extra" "-" "-" "no GPU" "skipped"
  row "compile nvdiffrast" "cuda" "-" "no GPU" "skipped"
fi

# ------------------------------------------------------------ 2. cuda tests
if [ "$GPU" = 1 ]; then
  t0=$(date +%s.%N)
  "$PYTHON" -m pytest -q -m cuda -rs -p no:cacheprovider tests > "$OUT/pytest-cuda.log" 2>&1
  rc=$?
  summary="$(grep -E '(passed|failed|skipped|error)' "$OUT/pytest-cuda.log" | tail -1)"
  if [ $rc -eq 0 ] && ! grep -q "skipped" <<< "$summary" && grep -q "passed" <<< "$summary"; then
    row "cuda tests" "cuda" "$(elapsed "$t0")" "$summary" "ok"
  else
    row "cuda tests" "cuda" "$(elapsed "$t0")" "$summary (see $OUT/pytest-cuda.log)" "FAIL"
  fi
else
  row "cuda tests" "cuda" "-" "no GPU" "skipped"
fi

# ------------------------------------------------------------ 3. timed runs
run_model() {  # model device timeout
  local model="$1" device="$2" limit="$3" dir="$OUT/$1-$2"
  local t0 rc detail
  t0=$(date +%s.%N)
  timeout "$limit" "$PYTHON" -m pipeline.cli reconstruct "$BUNDLE" --out "$dir" --model "$model" \
    --preset "$PRESET" --device "$device" --quiet > "$dir.log" 2>&1
  rc=$?
  local wall
  wall="$(elapsed "$t0")"
  if [ $rc -eq 124 ]; then
    row "$model $PRESET" "$device" ">$limit" "timed out (limit CPU_TIMEOUT_S / CUDA_TIMEOUT_S)" \
      "$([ "$device" = cpu ] && echo timeout || echo FAIL)"
    return
  fi
  if [ $rc -ne 0 ]; then
    row "$model $PRESET" "$device" "$wall" "exit $rc: $(tail -1 "$dir.log")" "FAIL"
    return
  fi
  detail="$("$PYTHON" - "$dir" <<'EOF'
import json, sys
r = json.load(open(f"{sys.argv[1]}/result.json"))
t = r["timings_s"]
q = r.get("quality", {})
parts = [f"device {r['device']}", f"total {t.get('total', 0):.1f} s"]
if "refine" in t:
    parts.append(f"refine {t['refine']:.1f} s")
if q:
    parts.append(f"PSNR {q['psnr']:.2f} dB, SSIM {q['ssim']:.3f}, {q['status']}")
print("; ".join(parts))
EOF
)"
  row "$model $PRESET" "$device" "$wall" "$detail" "ok"
}

for model in fusion nvdiffrec; do
  if [ "$GPU" = 1 ]; then
    run_model "$model" cuda "$CUDA_TIMEOUT_S"
  else
    row "$model $PRESET" "cuda" "-" "no GPU" "skipped"
  fi
  run_model "$model" cpu "$CPU_TIMEOUT_S"
done

# ------------------------------------------------------------ 4. table
echo
echo "Recon3D GPU check: $(date -u +%Y-%m-%dT%H:%MZ), GPU: $GPU_NAME, $(nproc) CPU cores, bundle $(basename "$(dirname "$BUNDLE")")/$(basename "$BUNDLE"), outputs in $OUT"
echo
printf '| %-22s | %-6s | %9s | %-6s | %s\n' "step" "device" "wall s" "result" "detail |"
printf '|%s|%s|%s|%s|%s|\n' "------------------------" "--------" "-----------" "--------" "--------"
while IFS=$'\t' read -r step device secs detail result; do
  printf '| %-22s | %-6s | %9s | %-6s | %s |\n' "$step" "$device" "$secs" "$result" "$detail"
done < "$ROWS"
echo
if [ "$FAILED" = 1 ]; then
  echo "gpu_check: FAILED"
  exit 1
fi
echo "gpu_check: ok$([ "$GPU" = 0 ] && echo ' (CPU rows only: no GPU)')"
