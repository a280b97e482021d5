#!/usr/bin/env bash
# The GPU checks in one call on a CUDA machine (no network needed), run from anywhere:
#
#   OUT=/some/dir bash tools/gpu_check.sh
#
# Sections, in order of value: the headline numbers come first, the full test matrix last, so a call
# cut short by its time budget still returns what matters most (SECTIONS=a,b,... runs some; default all).
# Each section writes its results under $OUT as soon as it ends.
#   install   LEAP_KERNELS_BUILD_CUDA=1 pip install --no-deps --no-build-isolation -e . for the visible
#             card only (TORCH_CUDA_ARCH_LIST), MAX_JOBS = all cores; then a check that leap_kernels._C
#             has its CUDA kernels. A failed build fails the run (it goes on from the source tree with
#             the Triton and torch backends, so the other numbers still come back)
#   env       nvidia-smi, versions, backends -> $OUT/env.txt
#   smoke     tools/gpu_smoke.py: every op and backend once at the headline shapes against the float64
#             reference (about 30 s; it also compiles the Triton kernels the benchmarks time) -> smoke.json
#   bench     the headline op benchmarks (pytest bench/test_bench_ops.py): fused loss, plain and
#             token-normalized, M=32768, 384->1536, bf16, fwd+bwd; token_normalized_mse; teacher attention
#             at N=261 and N=1025; each against eager, torch.compile, the GEMM floor and (attention) SDPA's
#             cuDNN, flash and efficient backends, with peak memory -> bench-<device>.json; then
#             bench/compare.py against bench/baselines/<device>.json when there is one -> compare.log.
#             The DINOv3 cases come with them: attention with RoPE, B=64, N=201 and 1029, H=6/16/32,
#             d=64/64/128, ours (rotation fused in the kernel) vs SDPA after timm's separate rotation.
#             GPU_CHECK_BENCH_ALL=1 adds the other cases (the 192-wide student, ViT-S attention)
#   teacher   the truncated teacher forward (ViT-g/14 reg4, B=128, bf16) at k = 20,40 (GPU_CHECK_TEACHER_KS):
#             timm eager, timm with regional torch.compile (one compiled block reused), ours per attention
#             backend; and the DINOv3 ViT-7B/16 (random init, bf16, B=64, 224 px) at k = 10,20,40: timm,
#             ours, and ours with the blocks past k offloaded, with the peak GPU memory of each forward
#             (peak_total_mb) -> teacher-<device>.json
#   step      one full LEAP training step at k = 10,40 (GPU_CHECK_STEP_KS): ours vs stock timm + PyTorch, eager
#             and compiled (regional) -> step-<device>.json; then bench/whole_run.py: the whole-run time
#             over the paper's trajectory -> whole-run-<device>.json, table in the summary
#   overhead  bench/trainer_overhead.py: leap distill's step against the plain timm + PyTorch loop a user would
#             write, ViT-g/14 reg4 -> ViT-S/14, bf16, batch 128, baseline and LEAP held at k = 10, 40
#             -> trainer-overhead-<device>.csv
#   fp8       tools/fp8_teacher.py: ViT-g/14 reg4 (random init, built on the GPU) with --teacher-precision
#             fp8 vs bf16 vs fp32 on the Fashion-MNIST sample committed under tests/data: relative error
#             and CKA per block, the truncated teacher's time in bf16 and fp8 -> fp8_teacher-<device>.csv
#   tests     the full GPU test matrix: pytest -m gpu, one pytest call per file (an import error in one file
#             cannot stop the others) -> junit-gpu-<file>.xml
#
# The run keeps to GPU_CHECK_BUDGET_S seconds (default 540): every section runs under `timeout`, and a
# section that no longer fits is skipped and listed, so one call returns within ~9 minutes with whatever
# it measured. A later call can run the rest, e.g. SECTIONS=env,tests (the extension built in place by
# `install` stays in the tree). The plan, with each section's estimated time, is printed first. Logs:
# $OUT/<section>.log; one table per benchmark JSON in $OUT/tables.md; the summary is printed at the end
# and kept in $OUT/summary.txt. Exit status: 0 when no section failed (a failed CUDA build, a missed
# smoke tolerance and a benchmark regression against the baseline are failures).
#
# Nothing is read from the network, a system dataset or a user cache: the models are random-init timm
# models, the images random or the committed sample.
#
# Other switches: OUT (default bench/results/gpu-run), PYTHON (default python), GPU_CHECK_DRY_RUN=1 (a CPU
# rehearsal of the flow: no install, benchmarks at --bench-size=smoke with torch.compile's eager backend,
# the GPU tests skip), GPU_CHECK_PYTEST_ARGS (extra arguments of the GPU tests, e.g. "-k paper"),
# GPU_CHECK_BENCH_ARGS (extra arguments of the three benchmark runs, e.g. "-k ours").
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
ALL_SECTIONS="install,env,smoke,bench,teacher,step,overhead,fp8,tests"
SECTIONS=${SECTIONS:-$ALL_SECTIONS}
# Seconds each section is expected to take on an H100/H200 from a fresh machine (cold caches), and
# the most it may take.
# bench and teacher include their DINOv3 cases (about 60 s and 90 s: the RoPE shapes, the 7B's init and forwards).
declare -A ESTIMATE=([install]=120 [env]=5 [smoke]=45 [bench]=210 [teacher]=150 [step]=90 [overhead]=90 [fp8]=40 [tests]=300)
declare -A LIMIT=([install]=240 [env]=60 [smoke]=120 [bench]=300 [teacher]=300 [step]=180 [overhead]=180 [fp8]=120 [tests]=400)
# GPU_CHECK_TEST_FILES replaces the list, e.g. with tests/test_teacher_attention_rope.py tests/test_dinov3.py
# (the DINOv3 GPU checks: the RoPE kernels, the offloaded teacher).
GPU_TEST_FILES=${GPU_CHECK_TEST_FILES:-"tests/test_gpu.py tests/test_leap_fp8.py tests/test_teacher_attention_rope.py tests/test_dinov3.py tests/test_device_pipeline.py tests/test_host_syncs.py"}
# The GPU tests must run the compiled kernels, not the interpreter; the source tree is importable
# even when the editable install fails.
export TRITON_INTERPRET=0
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# No hub downloads (the machine may have no network): every model here is built with random weights.
export HF_HUB_OFFLINE=1

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
RAN=0
note() { echo "$*" | tee -a "$SUMMARY"; }

# The plan: what runs, in which order, and how long each part should take.
plan_total=0
plan="gpu_check plan (budget ${BUDGET} s, dry run: $DRY):"
for s in ${ALL_SECTIONS//,/ }; do
    wanted "$s" || continue
    plan_total=$(( plan_total + ESTIMATE[$s] ))
    plan+=$'\n'"  $(printf '%-8s' "$s") ~${ESTIMATE[$s]} s (at most ${LIMIT[$s]} s; ends by ~${plan_total} s)"
done
note "$plan"
(( plan_total > BUDGET )) && note "  (the estimates exceed the budget: the last sections may be skipped)"

# run_section NAME COMMAND...: runs within its limit and the remaining budget, logs to $OUT/NAME.log.
run_section() {
    local name=$1
    shift
    local limit=${LIMIT[$name]:-60}
    local left=$(( BUDGET - (SECONDS - START) ))
    RAN=0
    if (( left < 30 )); then
        note "$name: SKIPPED (time budget of ${BUDGET} s used up)"
        return 0
    fi
    RAN=1
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
        # The visible card's architecture only (one nvcc pass per .cu instead of two).
        ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "9.0")
        install_and_check() {
            # --no-index: nothing is fetched (the machine may have no network).
            "$PY" -m pip install --no-deps --no-build-isolation --no-index --disable-pip-version-check -e . || return $?
            # The build must have produced the CUDA kernels: a missing cuda backend is an error here.
            "$PY" -c "import sys, leap_kernels._ext as e; e.available() and e.with_cuda() or \
sys.exit('leap_kernels._C has no CUDA kernels: %s' % (e.load_error() or 'built without CUDA'))"
        }
        export -f install_and_check
        export PY
        if ! LEAP_KERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}" \
                MAX_JOBS=${MAX_JOBS:-$(nproc)} run_section install bash -c install_and_check; then
            note "  -> continuing without a usable leap_kernels._C: the triton and torch backends run;" \
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
for name in ("triton", "timm", "transformers", "torchvision", "pytest", "pytest_benchmark", "numpy", "xformers"):
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
    run_section env bash -c env_report
    cp "$OUT/env.log" "$OUT/env.txt" 2>/dev/null
    grep -E "^(torch|triton|device|backend) " "$OUT/env.txt" | sed 's/^/  /' | tee -a "$SUMMARY"
fi

if wanted smoke; then
    run_section smoke "$PY" tools/gpu_smoke.py --out "$OUT/smoke.json"
    (( RAN )) && grep -E "^smoke: |MISS" "$OUT/smoke.log" | sed 's/^/  /' | tee -a "$SUMMARY"
fi

# The benchmark sections: pytest-benchmark JSON under $OUT, a table of each in tables.md, pass counts in
# the summary.
if [[ "$DRY" == 1 ]]; then
    BENCH_ARGS=(--bench-size=smoke --bench-compile-backend=eager)
    TEACHER_KS=${GPU_CHECK_TEACHER_KS:-}
    STEP_KS=${GPU_CHECK_STEP_KS:-}
else
    BENCH_ARGS=()
    TEACHER_KS=${GPU_CHECK_TEACHER_KS:-20,40}
    STEP_KS=${GPU_CHECK_STEP_KS:-10,40}
fi
# shellcheck disable=SC2206
BENCH_ARGS+=(${GPU_CHECK_BENCH_ARGS:-})

# run_bench NAME JSON PYTEST_ARGS...: one pytest-benchmark run of the suite.
run_bench() {
    local name=$1 json=$2
    shift 2
    rm -f "$json"
    # -o timeout=0: compiling a ViT-g step can take a while; the section's own limit bounds the run.
    run_section "$name" "$PY" -m pytest "$@" "${BENCH_ARGS[@]}" -q -rfEs -p no:cacheprovider \
        -o timeout=0 --benchmark-json="$json" --benchmark-columns=median,iqr,rounds
    local rc=$?
    (( RAN )) || return 0
    tail -1 "$OUT/$name.log" | sed "s/^/  $name: /" | tee -a "$SUMMARY"
    if [[ -f "$json" ]]; then
        "$PY" bench/compare.py --show "$json" >> "$OUT/tables.md" 2>&1
        echo >> "$OUT/tables.md"
    fi
    return $rc
}

if wanted bench; then
    JSON="$OUT/bench-$DEVICE.json"
    HEADLINE=()
    # The headline cases only: the 384-wide student and ViT-g attention (N = 261 and 1025).
    [[ "${GPU_CHECK_BENCH_ALL:-0}" == 1 ]] || HEADLINE=(-k "not 192x1536 and not vits")
    run_bench bench "$JSON" bench/test_bench_ops.py "${HEADLINE[@]}"
    if (( RAN )) && [[ -f "$JSON" ]]; then
        # A regression beyond 1.25x against the committed baseline of this card fails the run.
        LIMIT[compare]=60
        run_section compare "$PY" bench/compare.py --baseline-dir bench/baselines --threshold 1.25 "$JSON"
        (( RAN )) && grep -E "^(no baseline|the baseline|[0-9]+ benchmarks:|FAILED|OK)" "$OUT/compare.log" \
            | sed 's/^/  compare: /' | tee -a "$SUMMARY"
    fi
fi
if wanted teacher; then
    run_bench teacher "$OUT/teacher-$DEVICE.json" bench/test_bench_teacher.py ${TEACHER_KS:+--teacher-ks=$TEACHER_KS}
fi
if wanted step; then
    JSON="$OUT/step-$DEVICE.json"
    run_bench step "$JSON" bench/test_bench_step.py ${STEP_KS:+--step-ks=$STEP_KS}
    if (( RAN )) && [[ -f "$JSON" ]]; then
        LIMIT[whole_run]=60
        run_section whole_run "$PY" bench/whole_run.py "$JSON" --out "$OUT/whole-run-$DEVICE.json"
        (( RAN )) && grep -E "^(\||whole run)" "$OUT/whole_run.log" | sed 's/^/  /' | tee -a "$SUMMARY"
    fi
fi
if wanted overhead; then
    # leap distill's step against the loop a user would write (ViT-g/14 -> ViT-S/14, bf16, batch 128).
    if [[ "$DRY" == 1 ]]; then
        OVERHEAD_ARGS=(--size small --smoke)
    else
        OVERHEAD_ARGS=(--size vitg --rounds 1 --steps 6)
    fi
    run_section overhead "$PY" bench/trainer_overhead.py "${OVERHEAD_ARGS[@]}" --out "$OUT/trainer-overhead-$DEVICE.csv"
    (( RAN )) && grep -E "^\|" "$OUT/overhead.log" | sed 's/^/  /' | tee -a "$SUMMARY"
fi

if wanted fp8; then
    if [[ "$DRY" == 1 ]]; then
        FP8_ARGS=(--images 4 --batch 4)  # the bundled demo teacher, CPU emulation
    else
        FP8_ARGS=(--model vit_giant_patch14_reg4_dinov2 --images 8 --batch 8 --time-batch 32)
    fi
    run_section fp8 "$PY" tools/fp8_teacher.py "${FP8_ARGS[@]}" --out "$OUT/fp8_teacher-$DEVICE.csv"
fi

if wanted tests; then
    gpu_tests() {
        local rc=0 file
        for file in $GPU_TEST_FILES; do
            # shellcheck disable=SC2086
            "$PY" -m pytest -m gpu "$file" -q -rfEs -p no:cacheprovider \
                --junitxml="$OUT/junit-gpu-$(basename "$file" .py).xml" ${GPU_CHECK_PYTEST_ARGS:-} || rc=1
        done
        return $rc
    }
    export -f gpu_tests
    export PY OUT GPU_TEST_FILES
    run_section tests bash -c gpu_tests
    if (( RAN )); then
        "$PY" - "$OUT"/junit-gpu-*.xml <<'EOF' | tee -a "$SUMMARY"
import os
import sys
import xml.etree.ElementTree as ET
paths = [p for p in sys.argv[1:] if os.path.exists(p)]
if not paths:
    print("  tests: no junit XML written (see tests.log)")
    sys.exit(1)
count = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
bad = []
for path in paths:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    for k in count:
        count[k] += sum(int(s.get(k, 0)) for s in suites)
    bad += [c for c in root.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
print(f"  tests: {passed} passed, {count['failures']} failed, {count['errors']} errors, {count['skipped']} skipped")
for case in bad[:20]:
    node = case.find("failure") if case.find("failure") is not None else case.find("error")
    print(f"  FAILED {case.get('name')}: {(node.get('message') or '').splitlines()[0][:160] if node.get('message') else ''}")
if len(bad) > 20:
    print(f"  ... and {len(bad) - 20} more (junit-gpu-*.xml)")
sys.exit(1 if count["failures"] or count["errors"] else 0)
EOF
        (( PIPESTATUS[0] != 0 )) && failed=1
    fi
fi

echo
echo "== gpu_check summary ($(( SECONDS - START )) s, dry run: $DRY, results in $OUT)"
cat "$SUMMARY"
for json in "$OUT"/*.json; do
    [[ -f "$json" ]] || continue
    count=$(grep -c '"fullname"' "$json")
    echo "  wrote $(basename "$json")$( (( count )) && echo " ($count benchmarks)")"
done
echo "total: $(( SECONDS - START )) s; $([[ $failed == 0 ]] && echo 'no section failed' || echo 'SOME SECTIONS FAILED')"
exit $failed
