#!/usr/bin/env bash
# Compile every Triton kernel for Hopper (sm_90) without a GPU, under the project's Triton (.venv) and
# under Triton 3.6 (the version of the torch 2.11 GPU machines), with the specialization of a real
# launch at the paper's shapes (tools/compile_check.py). Exits non-zero if either check fails.
#
#   bash tools/compile_check.sh [compile_check.py options, e.g. --allow-spills]
#
# Triton 3.6 lives in a throwaway venv, .venv-triton36, created once (cached): only the triton wheel
# is installed there; torch and everything else come from .venv through a .pth file that appends
# .venv's site-packages after its own, so triton 3.6 wins. Environment:
#   COMPILE_CHECK_DTYPES   dtypes to check (default bf16: what training runs; bf16,fp16,fp32 = all)
#   COMPILE_CHECK_TRITON36 0 skips the Triton 3.6 check (e.g. offline without the wheel)
#   VENV                   the project's venv (default .venv); TRITON36_VENV (default .venv-triton36)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VENV:-.venv}
T36=${TRITON36_VENV:-.venv-triton36}
TRITON36=3.6.0
DTYPES=${COMPILE_CHECK_DTYPES:-bf16}
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "compile_check: $PY not found (run make test first)"; exit 2; }
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

pythons=("$PY")
if [ "${COMPILE_CHECK_TRITON36:-1}" != 0 ]; then
    base_site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    stamp="triton==$TRITON36 base=$base_site"
    if [ "$(cat "$T36/.stamp" 2>/dev/null)" != "$stamp" ]; then
        echo "compile_check: creating $T36 (triton==$TRITON36 only; torch and the rest from $VENV)"
        start=$(date +%s)
        rm -rf "$T36"
        if "$PY" -m venv --without-pip "$T36" &&
           "$PY" -m pip --python "$T36/bin/python" install --quiet --no-deps "triton==$TRITON36"; then
            site=$("$T36/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
            # addsitedir (not a bare path) so that .venv's own .pth files (the editable install) run too.
            echo "import site; site.addsitedir('$base_site')" > "$site/zz_base_venv.pth"
            echo "$stamp" > "$T36/.stamp"
            echo "compile_check: $T36 ready in $(( $(date +%s) - start )) s"
        else
            rm -rf "$T36"
            echo "compile_check: could not install triton==$TRITON36 (no network or package index?);"
            echo "  set COMPILE_CHECK_TRITON36=0 to check only the project's Triton"
            exit 2
        fi
    fi
    pythons+=("$T36/bin/python")
fi

# The checks are CPU-bound and independent: run them side by side, print each log whole.
logs=()
pids=()
for py in "${pythons[@]}"; do
    log=$(mktemp)
    logs+=("$log")
    "$py" tools/compile_check.py --dtypes "$DTYPES" "$@" > "$log" 2>&1 &
    pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || status=1
    echo "== ${pythons[$i]}"
    cat "${logs[$i]}"
    rm -f "${logs[$i]}"
done
exit $status
