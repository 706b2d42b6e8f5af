#!/usr/bin/env bash
# One GPU check of dreamlab, meant to finish in under 8 minutes on one H100 / H200:
#   1. makes dreamlab importable from the checkout without installing it (a sitecustomize finder
#      mirroring pyproject's package-dir: no setuptools or network needed), plus carried wheels;
#   2. starts gsplat's JIT build in the background (if gsplat imports);
#   3. builds dreamlab's CUDA rasterizer ahead of time (python -m dreamlab.cuda_ext.build);
#   4. runs the tests marked gpu (tests/test_cuda_ext.py, tests/test_rasterizer_backends.py,
#      tests/test_nerf_backends.py: its tiny-cuda-nn / nerfacc tests skip unless those are installed);
#   5. runs bench/bench_gpu.py: rasterizer backends at 512² / 1024² x 100k / 500k / 1M Gaussians,
#      one SDS and one VSD step with an SD 2.1-base-architecture UNet + VAE (random fp16 weights),
#      builtin-prior training steps (fp32 / bf16, first-step loss against the CPU's)
#      and a full default `dreamlab generate "a red cube" --device cuda` run;
# and writes gpu_report.md (card name from nvidia-smi, tables, build and test results) plus logs
# to $OUT (or bench-results/gpu-check-<time>).
#
# Machines without network: packages missing there must travel as wheels in .whl/ at the repo
# root (ignored by git; carried with the device tool's `carry`). For Python 3.12, x86_64:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl NAME==VERSION
# for dreamlab's own dependencies that the image lacks (diffusers, tyro and its docstring-parser /
# typeguard / shtab, trimesh, xatlas, pygltflib and its dataclasses-json / marshmallow /
# deprecated, fast_simplification, plyfile, imageio-ffmpeg) and, for the gsplat rows, gsplat
# (a pure-Python wheel that JIT-compiles its kernels on first use, several minutes; its
# jaxtyping / rich / ninja are usually there). Without gsplat the gsplat rows say why; without
# the others the generate / guidance sections report the import error and the rest still runs.
#
# Usage: bash bench/gpu_check.sh            (env: PYTHON=python3, GPU_CHECK_BUDGET_S=450)
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
OUT_DIR=${OUT:-$REPO/bench-results/gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/gpu_check.log
CHECKS=$OUT_DIR/checks.md.part
: >"$LOG"
: >"$CHECKS"
export PYTHONUNBUFFERED=1
START=$(date +%s)
elapsed() { echo $(($(date +%s) - START)); }
say() { echo "== [$(elapsed) s] $*" | tee -a "$LOG"; }
record() { echo "| $1 | $2 | $3 |" >>"$CHECKS"; }

say "gpu_check: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1)"

# 1. Python path: carried wheels, then dreamlab from this checkout.
if compgen -G ".whl/*.whl" >/dev/null; then
  t0=$(elapsed)
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/dreamlab-wheels .whl/*.whl >>"$LOG" 2>&1; then
    export PYTHONPATH=/tmp/dreamlab-wheels${PYTHONPATH:+:$PYTHONPATH}
    record "install carried wheels" ok "$(($(elapsed) - t0)) s"
  else
    record "install carried wheels" FAILED "see gpu_check.log"
  fi
fi
SRC=/tmp/dreamlab-src
rm -rf "$SRC" && mkdir -p "$SRC"
cat >"$SRC/sitecustomize.py" <<EOF
# Written by bench/gpu_check.sh: imports dreamlab from the checkout $REPO with pyproject's
# package-dir mapping (what an editable install does), ahead of any other dreamlab on the path.
import importlib.util
import sys

_MAP = {"dreamlab": "dreamlab", "dreamlab.renderers": "renderers", "dreamlab.guidance": "guidance",
        "dreamlab.assets": "assets", "dreamlab.cuda_ext": "cuda_ext"}


class _CheckoutFinder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name not in _MAP:
            return None
        folder = "$REPO/" + _MAP[name]
        return importlib.util.spec_from_file_location(
            name, folder + "/__init__.py", submodule_search_locations=[folder])


sys.meta_path.insert(0, _CheckoutFinder)
EOF
export PYTHONPATH=$SRC:$REPO${PYTHONPATH:+:$PYTHONPATH}
if ! $PY -c "import dreamlab.cuda_ext, dreamlab.renderers.gaussians" >>"$LOG" 2>&1; then
  say "dreamlab does not import; see $LOG"
  exit 1
fi
say "python: $($PY -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda)')"

# 2. gsplat's JIT build in the background (it takes minutes; our build and tests run meanwhile).
GSPLAT_PID=""
if $PY -c "import gsplat" >/dev/null 2>&1; then
  say "gsplat $($PY -c 'import gsplat; print(gsplat.__version__)'): JIT build in the background"
  timeout $((BUDGET / 2)) $PY bench/bench_gpu.py --warm-gsplat >"$OUT_DIR/gsplat_build.log" 2>&1 &
  GSPLAT_PID=$!
else
  record "gsplat" "not installed" "gsplat rows are skipped (carry its wheel in .whl/)"
fi

# 3. dreamlab's CUDA rasterizer, ahead of time.
say "building dreamlab's CUDA rasterizer"
t0=$(elapsed)
if timeout 300 $PY -m dreamlab.cuda_ext.build >>"$LOG" 2>&1; then
  record "build dreamlab.cuda_ext (AOT)" ok "$(($(elapsed) - t0)) s"
else
  record "build dreamlab.cuda_ext (AOT)" FAILED "$(($(elapsed) - t0)) s, see gpu_check.log"
fi

# 4. Tests marked gpu (gsplat's after its build).
run_tests() {  # $1: label, $2: -k expression
  local t0 rc summary
  t0=$(elapsed)
  timeout 240 $PY -m pytest -q -m gpu -p no:cacheprovider -k "$2" \
    tests/test_cuda_ext.py tests/test_rasterizer_backends.py tests/test_nerf_backends.py \
    >>"$OUT_DIR/pytest_gpu.log" 2>&1
  rc=$?
  summary=$(grep -E "passed|failed|error|skipped|no tests ran" "$OUT_DIR/pytest_gpu.log" | tail -n 1)
  record "$1" "$([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc)")" "$(($(elapsed) - t0)) s: $summary"
}
say "gpu tests (dreamlab kernels)"
run_tests "pytest -m gpu (cuda / torch)" "not gsplat"
if [ -n "$GSPLAT_PID" ]; then
  say "waiting for gsplat's build"
  if wait "$GSPLAT_PID"; then
    record "gsplat JIT build" ok "$(tail -n 1 "$OUT_DIR/gsplat_build.log")"
    say "gpu tests (gsplat)"
    run_tests "pytest -m gpu (gsplat)" "gsplat"
  else
    record "gsplat JIT build" "FAILED or timed out" "see gsplat_build.log"
  fi
fi

# 5. Benchmarks, within what is left of the budget (sections past it are marked skipped).
LEFT=$((BUDGET - $(elapsed)))
say "bench_gpu.py (budget ${LEFT} s)"
BACKENDS="cuda torch"
if [ -n "$GSPLAT_PID" ] && grep -q "gsplat ready" "$OUT_DIR/gsplat_build.log" 2>/dev/null; then
  BACKENDS="cuda gsplat torch"
fi
# shellcheck disable=SC2086
timeout $((LEFT > 60 ? LEFT + 120 : 180)) $PY bench/bench_gpu.py --device cuda --out "$OUT_DIR" \
  --backends $BACKENDS --budget-s "$LEFT" 2>&1 | tee -a "$LOG"

{
  echo
  echo "## Build and tests"
  echo
  echo "| step | result | details |"
  echo "|---|---|---|"
  cat "$CHECKS"
  echo
  echo "Total wall time of gpu_check.sh: $(elapsed) s."
} >>"$OUT_DIR/gpu_report.md"
rm -f "$CHECKS"
say "done: $OUT_DIR/gpu_report.md"
