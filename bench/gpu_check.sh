#!/usr/bin/env bash
# gpu-check: run the whole test suite on a GPU machine with its preinstalled
# packages (CuPy, pytest, ...), then the GPU benchmarks, and keep a report of
# what ran where.
#
#   bash bench/gpu_check.sh            (or: make gpu-check)
#
# Report: ${FASTNN_RESULTS_DIR:-bench/results}/gpu-check-<UTC time>.txt with the
# nvidia-smi / CUDA / CuPy / NVRTC versions, fastnn's backend table, the
# pytest output (the GPU tests first, then the rest but the slow CPU-only
# tests, both within FASTNN_GPU_PYTEST_LIMIT_S, default 150 s, interrupted
# there with their summaries kept, each test cut at 120 s when pytest-timeout
# is there; FASTNN_GPU_CHECK_TESTS narrows the test paths, default tests),
# the benchmark table
# (gpu-bench-<UTC time>.json, + .png when matplotlib is there), the fused
# kernels' bandwidth (gpu-kernels-<UTC time>.json), the step profile
# (gpu-profile-<UTC time>.json), issue 6's targets against them
# (gpu-targets-<UTC time>.md) and the main job at each GEMM precision.
#
# Time: every section runs under a guard cut to one deadline,
# FASTNN_GPU_CHECK_BUDGET_S (default 440 s) after the start, so the whole check
# ends near it even when something hangs; the shortest useful runs given to a
# section that starts late never reach past 40 s after it (480 s: 8 minutes).
# The benchmark runs right after pytest
# (it is what the GPU run is for) with at least BENCH_FLOOR_S, at most 300 s;
# its JSON is rewritten after every workload, so a cut-short run keeps what it
# measured. The kernel and profile tools share what is left but a reserve for
# the main job at each precision, which runs last.
#
# Exit status: pytest's; 4 when pytest was cut at its guard (never 124/137,
# which read as the device tool's own time-out); 3 when pytest passed but no
# GPU was usable (a dry run of the script, not a GPU check). The benchmark's
# status is reported, never returned. Never installs the test extra (these
# machines are offline and already carry what the tests need); wheels placed
# in .whl/ (e.g. a cupy-cuda13x wheel) are installed from that folder only.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
RESULTS_DIR="${FASTNN_RESULTS_DIR:-bench/results}"
mkdir -p "$RESULTS_DIR"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
REPORT="$RESULTS_DIR/gpu-check-$STAMP.txt"
SECONDS=0

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
    echo "host: $(hostname)  git: $(git rev-parse --short HEAD 2>/dev/null \
        || echo "${FASTNN_GIT_COMMIT:-n/a} (FASTNN_GIT_COMMIT)")"
    section "nvidia-smi"
    timeout -k 5 60 nvidia-smi 2>&1 || echo "(nvidia-smi not available or hung)"
    section "nvcc"
    nvcc --version 2>&1 | tail -n 2 || echo "(nvcc not on PATH)"
    section "python / cupy / CUDA"
    timeout -k 5 60 "$PYTHON" - <<'PY' || echo "(version probe failed or hung: $?)"
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
    section "fastnn info"
    timeout -k 5 60 "$PYTHON" -m fastnn info 2>&1 || echo "(fastnn info failed or hung: $?)"
}

# The tests' CPU build of the kernels (tests/cuda_on_cpu.py) stands in for a
# GPU in CI; here the GPU runs them, and the guard's time goes to that.
export FASTNN_TESTS_CUDA_ON_CPU=0
# fastnn runs from this checkout (kernels/ found beside pyproject.toml).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Every section's output goes through tee: unbuffered, a section cut at its
# guard still leaves what it printed.
export PYTHONUNBUFFERED=1

BUDGET_S="${FASTNN_GPU_CHECK_BUDGET_S:-440}"
HARD_S=$(( BUDGET_S + 40 ))  # the floors below may use this slack, never more
DIGITS_RESERVE_S=100  # kept at the end for the main job and the three precisions
TOOL_MIN_S=20         # kept after the benchmark for each of the kernel and profile tools
BENCH_FLOOR_S=150     # the benchmark's share even when pytest used its whole guard

# Seconds a section may run: its own cap, cut so that `reserve` seconds stay
# before the deadline (BUDGET_S after the start); may be <= 0 (then skip it).
guard_s() {
    local cap=$1 reserve=$2
    local left=$(( BUDGET_S - SECONDS - reserve ))
    echo $(( left < cap ? left : cap ))
}

# A floor for a section that starts late: at least `floor` seconds, but never
# past the hard deadline less `reserve` (the later sections' own floors).
floored_s() {
    local limit=$1 floor=$2 reserve=$3
    (( limit < floor )) && limit=$floor
    local most=$(( HARD_S - SECONDS - reserve ))
    echo $(( limit < most ? limit : most ))
}

gpu_bench() {
    local limit
    # What is left but the tools' and the main job's reserves; when pytest took
    # its whole guard that is short, so the floor is taken from the tools first.
    limit=$(guard_s 300 $(( 2 * TOOL_MIN_S + DIGITS_RESERVE_S )))
    if (( limit < BENCH_FLOOR_S )); then
        local most
        most=$(guard_s 300 "$DIGITS_RESERVE_S")
        limit=$(( most < BENCH_FLOOR_S ? most : BENCH_FLOOR_S ))
    fi
    limit=$(floored_s "$limit" 0 $(( 2 * TOOL_MIN_S + 40 )))  # the later sections' floors
    local workloads="${FASTNN_GPU_BENCH_WORKLOADS:-a,c,x,e,e-tf32,e-bf16,d,d-tf32,d-bf16}"
    local stem="$RESULTS_DIR/gpu-bench-$STAMP"
    section "fastnn bench --device gpu --workloads $workloads --rounds 3 (time guard ${limit} s)"
    if (( limit < 45 )); then
        echo "gpu-check: skipped the benchmark: only ${limit} s left of the ${BUDGET_S} s budget"
        return 0
    fi
    local plot=()
    if "$PYTHON" -c "import matplotlib" 2>/dev/null; then
        plot=(--plot "$stem.png")
    fi
    # SIGUSR1 at the guard: fastnn bench prints where it hangs; killed 15 s later.
    timeout -s USR1 -k 15 "$limit" "$PYTHON" -m fastnn bench --device gpu --workloads "$workloads" \
        --rounds 3 --json "$stem.json" ${plot[@]+"${plot[@]}"} -v
    local rc=$?
    if (( rc == 124 || rc == 137 )); then
        if [[ -f "$stem.json" ]]; then
            echo "gpu-check: the benchmark was stopped at its ${limit} s guard; $stem.json" \
                 "holds the workloads it finished (\"complete\": false)"
        else
            echo "gpu-check: the benchmark was stopped at its ${limit} s guard before its first" \
                 "workload finished: no JSON"
        fi
    elif [[ -f "$stem.json" ]]; then
        echo "gpu-check: benchmark exit status $rc; JSON: $stem.json"
    else
        echo "gpu-check: benchmark exit status $rc; no JSON written"
    fi
}

# The main job (default path), then its accuracy and speed at each GEMM
# precision through fit's per-op / CUDA-graph path (FASTNN_FAST_PATH=0: the
# one-launch kernel for tiny nets computes in float32 whatever the policy),
# the three in one process (one CuPy start-up), each printed as it ends.
digits_by_precision() {
    local limit
    limit=$(floored_s $(( $(guard_s 100000 0) / 3 )) 20 20)
    (( limit > 60 )) && limit=60
    section "fastnn train --backend cupy (the main job, default path; guard ${limit} s)"
    if (( limit < 10 )); then
        echo "gpu-check: skipped the main job: no time left"
    else
        timeout -k 5 "$limit" "$PYTHON" -m fastnn train --backend cupy --quiet \
            || echo "gpu-check: train failed ($?)"
    fi
    limit=$(floored_s $(( $(guard_s 100000 0) )) 20 0)
    (( limit > 150 )) && limit=150
    section "fastnn train --backend cupy --precision P --hidden 512 512 --epochs 40, P = float32 tf32 bf16 (FASTNN_FAST_PATH=0; one process; guard ${limit} s)"
    if (( limit < 10 )); then
        echo "gpu-check: skipped the precisions: no time left"
        return 0
    fi
    FASTNN_FAST_PATH=0 timeout -k 5 "$limit" "$PYTHON" - <<'PY' || echo "gpu-check: train at each precision failed ($?)"
import sys
from fastnn.cli import main

status = 0
for precision in ("float32", "tf32", "bf16"):
    print(f"--- fastnn train --backend cupy --precision {precision} --hidden 512 512 --epochs 40",
          flush=True)
    try:
        status |= main(["train", "--backend", "cupy", "--precision", precision,
                        "--hidden", "512", "512", "--epochs", "40", "--quiet"]) or 0
    except Exception as exc:  # the next precision still runs
        print(f"gpu-check: train at {precision} failed: {type(exc).__name__}: {exc}", flush=True)
        status = 1
sys.exit(status)
PY
}

# One fastnn.benchmarking tool writing <name>-<UTC time>.json, under a guard of
# at most 90 s that leaves `reserve` seconds (the tools after it and the main
# job) before the deadline; TOOL_MIN_S at least when started late, but leaving
# `floors` seconds before the hard deadline.
# Args: module, result name, what it measures (for the failure line), reserve, floors.
device_tool() {
    local limit
    limit=$(floored_s "$(guard_s 90 "$4")" "$TOOL_MIN_S" "$5")
    section "python -m fastnn.benchmarking.$1 (guard ${limit} s)"
    if (( limit < 10 )); then
        echo "gpu-check: skipped $3: no time left"
        return 0
    fi
    timeout -k 5 "$limit" "$PYTHON" -m "fastnn.benchmarking.$1" --json "$RESULTS_DIR/$2-$STAMP.json" \
        || echo "gpu-check: $3 failed ($?)"
}

# Issue 6's targets against what this run measured (reads the JSON files only).
targets_table() {
    local bench="$RESULTS_DIR/gpu-bench-$STAMP.json"
    section "python -m fastnn.benchmarking.targets"
    [[ -f "$bench" ]] || { echo "gpu-check: no benchmark JSON: no target table"; return 0; }
    local extra=()
    [[ -f "$RESULTS_DIR/gpu-kernels-$STAMP.json" ]] && extra+=(--kernels "$RESULTS_DIR/gpu-kernels-$STAMP.json")
    [[ -f "$RESULTS_DIR/gpu-profile-$STAMP.json" ]] && extra+=(--profile "$RESULTS_DIR/gpu-profile-$STAMP.json")
    "$PYTHON" -m fastnn.benchmarking.targets "$bench" ${extra[@]+"${extra[@]}"} --markdown \
        | tee "$RESULTS_DIR/gpu-targets-$STAMP.md" || echo "gpu-check: target table failed"
}

install_local_wheels 2>&1 | tee "$REPORT"
environment_info 2>&1 | tee -a "$REPORT"
# pytest-xdist (on the GPU machine) spreads the suite over processes sharing
# the one GPU: most of a cold run is compiling kernels (NVRTC, NVVM) and
# CPU-only tests, which then overlap. FASTNN_GPU_PYTEST_WORKERS=0: serial.
WORKERS="${FASTNN_GPU_PYTEST_WORKERS:-8}"
XDIST=()
if [[ "$WORKERS" != 0 ]] && "$PYTHON" -c "import xdist" 2>/dev/null; then
    XDIST=(-n "$WORKERS")
fi
# A hung GPU test must not eat the benchmark's share of the device time: each
# test is cut at 120 s (pytest-timeout, when installed) and each pass gets
# SIGINT at its guard, after which pytest still prints its summary of what ran.
PER_TEST=()
"$PYTHON" -c "import pytest_timeout" 2>/dev/null && PER_TEST=(--timeout=120)
PYTEST_LIMIT_S="${FASTNN_GPU_PYTEST_LIMIT_S:-150}"
PYTEST_END=$(( SECONDS + PYTEST_LIMIT_S ))

# One pytest pass over the tests marked `$1`, within what is left of the
# pytest guard; its exit status (4: cut at the guard, 0: nothing selected).
pytest_pass() {
    local marker=$1 limit=$(( PYTEST_END - SECONDS ))
    local cmd=("$PYTHON" -m pytest -q ${FASTNN_GPU_CHECK_TESTS:-tests} -m "$marker" -ra
               --durations=10 -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"}
               ${PER_TEST[@]+"${PER_TEST[@]}"})
    section "pytest -m '$marker' (guard ${limit} s): $(printf '%q ' "${cmd[@]}")"
    if (( limit < 5 )); then
        echo "gpu-check: pytest -m '$marker' skipped: the pytest guard is spent"
        return 4
    fi
    timeout -s INT -k 20 "$limit" "${cmd[@]}" 2>&1
    local rc=$?
    if (( rc == 124 || rc == 137 )); then
        echo "gpu-check: pytest -m '$marker' was cut at its guard (FASTNN_GPU_PYTEST_LIMIT_S)"
        rc=4
    fi
    (( rc == 5 )) && rc=0  # no test carries the marker in these paths
    return $rc
}

# The GPU tests first (what this machine is for), then the rest of the suite
# (the CPU-only tests also pass in CI) in the time left.
pytest_pass "gpu" 2>&1 | tee -a "$REPORT"
gpu_status=${PIPESTATUS[0]}
pytest_pass "not gpu and not slow" 2>&1 | tee -a "$REPORT"
cpu_status=${PIPESTATUS[0]}
status=$(( gpu_status > cpu_status ? gpu_status : cpu_status ))
(( gpu_status == 1 || cpu_status == 1 )) && status=1  # a failure outranks a cut
if (( status == 4 )); then
    echo "gpu-check: pytest was cut at its guard (FASTNN_GPU_PYTEST_LIMIT_S); exit status 4" | tee -a "$REPORT"
fi
echo "gpu-check: pytest -m gpu exit status $gpu_status, the rest $cpu_status" | tee -a "$REPORT"
echo "gpu-check: pytest exit status $status ($SECONDS s so far)" | tee -a "$REPORT"
gpu_bench 2>&1 | tee -a "$REPORT"
# Fused elementwise kernels against the device-to-device copy bandwidth.
device_tool gpu_kernels gpu-kernels "kernel bandwidth" $(( TOOL_MIN_S + DIGITS_RESERVE_S )) $(( TOOL_MIN_S + 40 )) 2>&1 \
    | tee -a "$REPORT"
# Where each step's time goes (host vs device, per layer and op, the graph
# replay), for reading any missed target.
device_tool gpu_profile gpu-profile "step profile" "$DIGITS_RESERVE_S" 40 2>&1 | tee -a "$REPORT"
targets_table 2>&1 | tee -a "$REPORT"
digits_by_precision 2>&1 | tee -a "$REPORT"
echo "gpu-check: pytest exit status $status; ${SECONDS} s in all; report: $REPORT" | tee -a "$REPORT"
if ! timeout -k 5 60 "$PYTHON" -c \
        "import sys, fastnn; sys.exit(fastnn.available_backends()['cupy'] is not None)" 2>/dev/null; then
    # A run without a usable GPU checks the script, not the GPU code: never a pass.
    echo "gpu-check: NOT A GPU RUN: fastnn's CuPy backend is unusable here (see above)" | tee -a "$REPORT"
    (( status == 0 )) && status=3
fi
exit "$status"
