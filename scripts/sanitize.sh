#!/usr/bin/env bash
# The C kernels under AddressSanitizer and UndefinedBehaviorSanitizer: build weightpack/_native.c with both
# into build/sanitize/, load that build instead of the installed one (WEIGHTPACK_NATIVE_LIB), and run the
# kernels' tests and the container fuzzer's sample. Any out-of-bounds access or undefined behaviour aborts.
# Needs .venv (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
out=build/sanitize
mkdir -p "$out"
gcc -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined -shared -fPIC \
    $(python3 -c 'import sysconfig; print("-I" + sysconfig.get_paths()["include"])') \
    weightpack/_native.c -o "$out/_native.so"
export WEIGHTPACK_NATIVE_LIB="$PWD/$out/_native.so"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
python - <<'PY'
from weightpack.coding import native
assert native.available(), "the sanitized build did not load"
PY
exec python -m pytest -q -p no:cacheprovider tests/test_native.py tests/test_fuzz.py tests/test_compat.py \
    tests/test_coding.py "$@"
