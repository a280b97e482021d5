#!/usr/bin/env bash
# The GPU checks in one call on a CUDA machine (no network needed), run from anywhere:
#
#   OUT=/some/dir bash bench/gpu_check.sh
#
# Sections, in order (SECTIONS=a,b,... runs some; default: all):
#   install       LEAP_KERNELS_BUILD_CUDA=1 pip install --no-deps --no-build-isolation -e . (build time
#                 logged); if the build fails the run goes on from the source tree without
#                 leap_kernels._C (the Triton and torch backends) and the failure is recorded
#   env           nvidia-smi, versions, backends -> $OUT/env.txt
#   tests         pytest -m gpu tests/test_gpu.py (every op, every backend, vs float64) -> $OUT/junit-gpu.xml
#   feature_loss  bench/bench_feature_loss.py          -> $OUT/feature_loss-<device>.csv
#   attention     bench/bench_attention.py             -> $OUT/attention-<device>.csv
#   teacher       bench/bench_attention.py --teacher   -> $OUT/attention-teacher-<device>.csv
#
# Every section runs under `timeout` and the whole run keeps to GPU_CHECK_BUDGET_S seconds (default 540):
# a section that no longer fits is skipped and listed as such, so one call returns within ~9 minutes
# with whatever it measured. A later call can run the rest, e.g. SECTIONS=env,feature_loss,attention,teacher
# (the extension built in place by `install` stays in the tree). Logs: $OUT/<section>.log; the summary is
# printed at the end and kept in $OUT/summary.txt. Exit status: 0 when no section failed.
#
# Other switches: OUT (default bench/results/gpu-run), PYTHON (default python), GPU_CHECK_DRY_RUN=1 (a CPU
# rehearsal of the flow: no install, benchmarks at their --smoke sizes, the GPU tests skip),
# GPU_CHECK_PYTEST_ARGS (extra pytest arguments, e.g. "-k paper").
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-bench/results/gpu-run}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3
DRY=${GPU_CHECK_DRY_RUN:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
ALL_SECTIONS="install,env,tests,feature_loss,attention,teacher"
SECTIONS=${SECTIONS:-$ALL_SECTIONS}
# The GPU tests must run the compiled kernels, not the interpreter; the source tree is importable
# even when the editable install fails.
export TRITON_INTERPRET=0
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

for s in ${SECTIONS//,/ }; do
    if [[ ",$ALL_SECTIONS," != *",$s,"* ]]; then
        echo "gpu_check: unknown section '$s' (sections: $ALL_SECTIONS)" >&2
        exit 2
    fi
done
wanted() { [[ ",$SECTIONS," == *",$1,"* ]]; }

SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
START=$SECONDS
failed=0
note() { echo "$*" | tee -a "$SUMMARY"; }

# run_section NAME TIMEOUT_S COMMAND...: runs within the remaining budget, logs to $OUT/NAME.log.
run_section() {
    local name=$1 limit=$2
    shift 2
    local left=$(( BUDGET - (SECONDS - START) ))
    if (( left < 30 )); then
        note "$name: SKIPPED (time budget of ${BUDGET} s used up)"
        return 0
    fi
    (( limit > left - 10 )) && limit=$(( left - 10 ))
    echo "gpu_check: $name (at most ${limit} s) ..."
    local t0=$SECONDS rc
    # SIGINT first: pytest then still writes its junit XML with the results so far.
    timeout -s INT -k 20 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    local took=$(( SECONDS - t0 ))
    if (( rc == 0 )); then
        note "$name: ok (${took} s)"
    elif (( rc == 124 || rc == 130 || rc == 137 )); then
        note "$name: TIMEOUT after ${took} s (limit ${limit} s; see $name.log)"
        failed=1
    else
        note "$name: FAILED, exit $rc (${took} s; see $name.log)"
        failed=1
    fi
    return $rc
}

if wanted install; then
    if [[ "$DRY" == 1 ]]; then
        note "install: skipped (dry run)"
    else
        # MAX_JOBS: parallel nvcc jobs. --no-index: nothing is fetched (the machine may have no network).
        # A failed build is recorded; the run goes on from the source tree.
        if ! LEAP_KERNELS_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} run_section install 300 \
                "$PY" -m pip install --no-deps --no-build-isolation --no-index --disable-pip-version-check -e .; then
            note "  -> continuing without a fresh leap_kernels._C: the triton and torch backends run;" \
                 "cpp/cuda report why they cannot (tail of install.log below)"
            tail -15 "$OUT/install.log" | sed 's/^/     /' | tee -a "$SUMMARY"
        fi
    fi
fi

DEVICE=$("$PY" -c "import torch; n = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'; \
print(''.join(c if c.isalnum() else '-' for c in n.lower()))" 2>/dev/null || echo unknown)

if wanted env; then
    env_report() {
        echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ local changes)')"
        if command -v nvidia-smi >/dev/null; then
            nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
            nvidia-smi
        else
            echo "nvidia-smi: not found"
        fi
        command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "nvcc: not found"
        "$PY" - <<'EOF'
import importlib, platform
import torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
for name in ("triton", "timm", "pytest", "numpy", "xformers"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:
        print(name, f"not importable ({type(exc).__name__})")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.0f} GiB", f"{p.multi_processor_count} SMs")
import leap_kernels
print("leap_kernels", leap_kernels.__version__, "from", leap_kernels.__file__)
for status in leap_kernels.backends("cuda" if torch.cuda.is_available() else "cpu").values():
    print("backend", status)
EOF
    }
    export -f env_report
    export PY
    run_section env 60 bash -c env_report
    cp "$OUT/env.log" "$OUT/env.txt" 2>/dev/null
    grep -E "^(torch|triton|device|backend) " "$OUT/env.txt" | sed 's/^/  /' | tee -a "$SUMMARY"
fi

if wanted tests; then
    # shellcheck disable=SC2086
    run_section tests 300 "$PY" -m pytest -m gpu tests/test_gpu.py -q -rfEs -p no:cacheprovider \
        --junitxml="$OUT/junit-gpu.xml" ${GPU_CHECK_PYTEST_ARGS:-}
    if [[ -f "$OUT/junit-gpu.xml" ]]; then
        "$PY" - "$OUT/junit-gpu.xml" <<'EOF' | tee -a "$SUMMARY"
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
print(f"  tests: {passed} passed, {count['failures']} failed, {count['errors']} errors, {count['skipped']} skipped")
bad = [c for c in root.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
for case in bad[:20]:
    node = case.find("failure") if case.find("failure") is not None else case.find("error")
    print(f"  FAILED {case.get('name')}: {(node.get('message') or '').splitlines()[0][:160] if node.get('message') else ''}")
if len(bad) > 20:
    print(f"  ... and {len(bad) - 20} more (junit-gpu.xml)")
sys.exit(1 if count["failures"] or count["errors"] else 0)
EOF
        (( PIPESTATUS[0] != 0 )) && failed=1
    else
        note "  tests: no junit XML written (see tests.log)"
    fi
fi

if [[ "$DRY" == 1 ]]; then
    FL_ARGS=(--smoke --variants eager,ours)
    AT_ARGS=(--smoke)
    TE_ARGS=(--teacher --smoke)
else
    FL_ARGS=()
    AT_ARGS=()
    TE_ARGS=(--teacher)
fi
if wanted feature_loss; then
    run_section feature_loss 240 "$PY" bench/bench_feature_loss.py "${FL_ARGS[@]}" --out "$OUT/feature_loss-$DEVICE.csv"
fi
if wanted attention; then
    run_section attention 180 "$PY" bench/bench_attention.py "${AT_ARGS[@]}" --out "$OUT/attention-$DEVICE.csv"
fi
if wanted teacher; then
    run_section teacher 240 "$PY" bench/bench_attention.py "${TE_ARGS[@]}" --out "$OUT/attention-teacher-$DEVICE.csv"
fi

echo
echo "== gpu_check summary ($(( SECONDS - START )) s, dry run: $DRY, results in $OUT)"
cat "$SUMMARY"
for csv in "$OUT"/*.csv; do
    [[ -f "$csv" ]] && echo "  wrote $(basename "$csv") ($(( $(wc -l < "$csv") - 1 )) rows)"
done
echo "total: $(( SECONDS - START )) s; $([[ $failed == 0 ]] && echo 'no section failed' || echo 'SOME SECTIONS FAILED')"
exit $failed
