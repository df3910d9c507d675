#!/usr/bin/env bash
# gpu-check: run the whole test suite on a GPU machine with its preinstalled
# packages (CuPy, pytest, ...), and keep a report of what ran where.
#
#   bash bench/gpu_check.sh            (or: make gpu-check)
#
# Report: ${FASTNN_RESULTS_DIR:-bench/results}/gpu-check-<UTC time>.txt with the
# nvidia-smi / CUDA / CuPy / NVRTC versions, fastnn's backend table and the
# pytest output (GPU tests included, slow CPU-only tests left out). Exits with
# pytest's status. Never installs the test extra (these machines are offline
# and already carry what the tests need); wheels placed in .whl/ (e.g. a
# cupy-cuda13x wheel) are installed from that folder only.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
RESULTS_DIR="${FASTNN_RESULTS_DIR:-bench/results}"
mkdir -p "$RESULTS_DIR"
REPORT="$RESULTS_DIR/gpu-check-$(date -u +%Y%m%dT%H%M%SZ).txt"

section() { printf '\n## %s\n' "$1"; }

install_local_wheels() {
    compgen -G ".whl/*.whl" > /dev/null || return 0
    section "pip install .whl/*.whl (offline)"
    # --no-index: never reach for a package index from the GPU machine.
    "$PYTHON" -m pip install --no-index --find-links .whl .whl/*.whl \
        || echo "WARNING: installing .whl/*.whl failed; testing with what is installed"
}

environment_info() {
    echo "# fastnn gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(hostname)  git: $(git rev-parse --short HEAD 2>/dev/null || echo n/a)"
    section "nvidia-smi"
    nvidia-smi 2>&1 || echo "(nvidia-smi not available)"
    section "nvcc"
    nvcc --version 2>&1 | tail -n 2 || echo "(nvcc not on PATH)"
    section "python / cupy / CUDA"
    "$PYTHON" - <<'PY'
import os, platform, sys
print("python", sys.version.split()[0], "|", platform.platform())
try:
    import numpy
    print("numpy", numpy.__version__)
except Exception as exc:
    print("numpy: unavailable:", exc)
try:
    import cupy
    rt = cupy.cuda.runtime
    print("cupy", cupy.__version__)
    print("CUDA runtime", rt.runtimeGetVersion(), "| driver", rt.driverGetVersion())
    print("NVRTC", cupy.cuda.nvrtc.getVersion())
    for i in range(rt.getDeviceCount()):
        p = rt.getDeviceProperties(i)
        name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
        print(f"device {i}: {name}, sm_{p['major']}{p['minor']}, "
              f"{p['totalGlobalMem'] / 2**30:.1f} GiB")
    print("CUPY_TF32 =", os.environ.get("CUPY_TF32", "(unset)"))
except Exception as exc:
    print("cupy: unavailable:", type(exc).__name__, str(exc).splitlines()[:1])
try:
    import fastnn
    print("fastnn", fastnn.__version__, "from", os.path.dirname(fastnn.__file__))
    for name, reason in fastnn.available_backends().items():
        print(f"  backend {name}: {'ok' if reason is None else reason}")
except Exception as exc:
    print("fastnn: import failed:", type(exc).__name__, exc)
PY
}

# fastnn runs from this checkout (kernels/ found beside pyproject.toml).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

install_local_wheels 2>&1 | tee "$REPORT"
environment_info 2>&1 | tee -a "$REPORT"
section "pytest -m 'gpu or not slow'" | tee -a "$REPORT"
"$PYTHON" -m pytest -q tests -m "gpu or not slow" -ra -p no:cacheprovider 2>&1 | tee -a "$REPORT"
status=${PIPESTATUS[0]}
echo "gpu-check: pytest exit status $status; report: $REPORT" | tee -a "$REPORT"
exit "$status"
