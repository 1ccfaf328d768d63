#!/usr/bin/env bash
# make gpu-check: on a GPU machine (python3 with a CUDA torch, nvcc; no network needed), build llmkern with
# its CUDA kernels, run the CUDA tests and the CUDA benchmark, and end with a short table. ~8 minutes.
# Build tools (scikit-build-core, cmake, ninja, pytest) come from the system or from wheels in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${GPU_VENV:-build/venv-gpu}  # under build/: git-ignored
LOG=${GPU_CHECK_LOG:-build/gpu-check}
mkdir -p "$LOG"
declare -a SUMMARY=()
note() { SUMMARY+=("$(printf '%-12s %-6s %s' "$1" "$2" "$3")"); }
finish() {
  echo
  echo "== gpu-check summary"
  printf '%s\n' "${SUMMARY[@]}"
  exit "$1"
}

# 1. The machine: a CUDA torch that sees a GPU, and nvcc for the build.
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)"; then
  echo "gpu-check: $PYTHON has no CUDA torch or sees no GPU; nothing to check"
  note machine FAIL "no CUDA torch / no GPU"
  finish 1
fi
NVCC=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || true)
if [ -z "$NVCC" ]; then
  echo "gpu-check: nvcc not found (needed to build the CUDA kernels)"
  note machine FAIL "nvcc not found"
  finish 1
fi
export CUDACXX=$NVCC
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
note machine ok "$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(), 'torch', torch.__version__)")"

# 2. A venv over the system site-packages, so the machine's CUDA torch is used (never installed here).
# If $PYTHON already is a venv's, use it directly: a venv made from it would see the base interpreter's
# site-packages, not this venv's (where the machine's torch and build tools live).
if "$PYTHON" -c "import sys; sys.exit(0 if sys.prefix != sys.base_prefix else 1)"; then
  PY=$PYTHON
else
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$VENV"
  PY="$VENV/bin/python"
fi
missing=$("$PY" - <<'EOF'
import importlib.util, shutil
need = {"scikit_build_core": "scikit-build-core", "pytest": "pytest", "numpy": "numpy"}
out = [pip for mod, pip in need.items() if importlib.util.find_spec(mod) is None]
out += [tool for tool in ("cmake", "ninja") if shutil.which(tool) is None and importlib.util.find_spec(tool) is None]
print(" ".join(out))
EOF
)
if [ -n "$missing" ]; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu-check: installing $missing from .whl/"
    "$PY" -m pip install -q --no-index .whl/*.whl || { note deps FAIL "pip install .whl/*.whl failed"; finish 1; }
  else
    echo "gpu-check: missing build/test tools: $missing. Install them, or put their wheels in .whl/ (the machine"
    echo "           has no network): pip download -d .whl scikit-build-core cmake ninja pytest numpy"
    note deps FAIL "missing: $missing"
    finish 1
  fi
fi
note deps ok "scikit-build-core, cmake, ninja, pytest"

# 3. Build for this GPU only (fastest); CMAKE_CUDA_ARCHITECTURES overrides.
ARCH=${CMAKE_CUDA_ARCHITECTURES:-native}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
t0=$SECONDS
if ! timeout 360 "$PY" -m pip install --no-build-isolation --no-deps -e . \
    -C cmake.define.CMAKE_CUDA_ARCHITECTURES="$ARCH" >"$LOG/build.log" 2>&1; then
  tail -n 40 "$LOG/build.log"
  note build FAIL "see $LOG/build.log"
  finish 1
fi
if ! "$PY" -c "import torch, llmkern.ops as lk; x = torch.randn(3, 64, device='cuda'); lk.rms_norm(x); torch.cuda.synchronize()" \
    >"$LOG/smoke.log" 2>&1; then
  cat "$LOG/smoke.log"
  note build FAIL "built, but rms_norm on CUDA failed (CUDA kernels not registered?)"
  finish 1
fi
note build ok "$((SECONDS - t0)) s, CUDA archs $ARCH"

# 4. CUDA tests.
status=0
t0=$SECONDS
# test_cuda.py is CUDA-only (its name matches -k cuda); the others run tests per device (the `device` and
# `torch_device` fixtures have a cuda case): the kernels' (attention, quant), then the layers above them (the
# fused loss, the norms under autocast, the serving engine; its tests need no HTTP stack).
timeout 420 "$PY" -m pytest -q -p no:cacheprovider tests/ops/test_cuda.py tests/ops/test_attention.py \
  tests/ops/test_quant.py tests/ops/test_loss.py tests/ops/test_norm.py tests/serve/test_engine.py -k cuda 2>&1 \
  | tee "$LOG/tests.log" | tail -n 25
rc=${PIPESTATUS[0]}
result=$(grep -E '[0-9]+ (passed|failed|error)' "$LOG/tests.log" | tail -n 1)
if [ "$rc" = 0 ]; then note tests ok "$result ($((SECONDS - t0)) s)"; else note tests FAIL "${result:-rc $rc} ($((SECONDS - t0)) s)"; status=1; fi

# 5. CUDA benchmark (its table is printed as it runs, and kept in the log).
t0=$SECONDS
if timeout 120 "$PY" -m bench.bench_cuda 2>&1 | tee "$LOG/bench.log"; then
  note bench ok "$((SECONDS - t0)) s; table above and in $LOG/bench.log"
else
  note bench FAIL "see $LOG/bench.log"
  status=1
fi
finish "$status"
