#!/usr/bin/env bash
# The C kernels under AddressSanitizer and UndefinedBehaviorSanitizer: build weightpack/_native.c with both
# into build/sanitize/, load that build instead of the installed one (WEIGHTPACK_NATIVE_LIB), and run the
# kernels' and the coders' tests, the container fuzzer's sample and the cases it found. Any out-of-bounds access
# or undefined behaviour aborts.
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
exec python -m pytest -q -p no:cacheprovider tests/test_coding_native.py tests/test_fuzz.py tests/test_compat.py \
    tests/test_codecs_fields.py tests/test_codecs_bytes.py tests/test_coding_entropy.py tests/test_coding_binding.py \
    tests/test_container.py::test_stored_header_dtype_is_an_object tests/test_container.py::test_part_shape_of_floats \
    tests/test_container.py::test_lone_surrogate_names tests/test_container.py::test_file_names_too_long_for_a_file_system \
    tests/test_checkpoint.py::test_pack_rejects_a_safetensors_header_with_bad_types "$@"
