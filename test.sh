#!/usr/bin/env bash
# Run every check and test of the workspace:
#   cargo fmt --all -- --check
#   cargo clippy --workspace --all-targets -- -D warnings
#   cargo test --workspace --no-fail-fast
# All three run even if an earlier one fails. The last line printed is the summary
# "N passed, N failed", summed over cargo test's "test result:" lines (unit, integration and doc
# tests). Exit status is non-zero if any step failed or any test failed.
#
# Environment:
#   VHDKIT_TEST_IMAGES          real test images (default: <repo>/../shared/vhd-test-images)
#   CI=true                     also sets VHDKIT_REQUIRE_TEST_IMAGES=1: image tests fail, not skip
#   VHDKIT_TEST_ARGS            extra arguments for cargo test (e.g. "--release")
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

# Absolute, because each test process runs in its own package's directory.
export VHDKIT_TEST_IMAGES="${VHDKIT_TEST_IMAGES:-$ROOT/../shared/vhd-test-images}"
if [ "${CI:-}" = "true" ] || [ "${CI:-}" = "1" ]; then
    export VHDKIT_REQUIRE_TEST_IMAGES=1
fi

failed_steps=()

step() { # step NAME CMD...
    local name="$1"
    shift
    echo "==> $*"
    local start=$SECONDS
    if ! "$@"; then
        failed_steps+=("$name")
    fi
    echo "==> $name took $((SECONDS - start))s"
}

step fmt cargo fmt --all -- --check
step clippy cargo clippy --workspace --all-targets -- -D warnings

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
echo "==> cargo test --workspace --no-fail-fast ${VHDKIT_TEST_ARGS:-}"
start=$SECONDS
# shellcheck disable=SC2086 # VHDKIT_TEST_ARGS is a list of words
cargo test --workspace --no-fail-fast ${VHDKIT_TEST_ARGS:-} 2>&1 | tee "$log"
test_rc=${PIPESTATUS[0]}
echo "==> test took $((SECONDS - start))s"
if [ "$test_rc" -ne 0 ]; then
    failed_steps+=("test")
fi

# Sum "test result: ok. 5 passed; 0 failed; ..." (or "FAILED.") over all test binaries.
read -r passed failed < <(
    sed 's/\x1b\[[0-9;]*m//g' "$log" | awk '
        /^test result: / {
            for (i = 2; i <= NF; i++) {
                if ($i ~ /^passed;?$/) p += $(i - 1)
                if ($i ~ /^failed;?$/) f += $(i - 1)
            }
        }
        END { print p + 0, f + 0 }'
)
if [ "$test_rc" -ne 0 ] && [ "$failed" -eq 0 ]; then
    echo "cargo test failed (exit $test_rc) without a failing test: build error or crashed test" \
        "binary; counted as 1 failure"
    failed=1
fi

status=0
if [ "${#failed_steps[@]}" -gt 0 ] || [ "$failed" -gt 0 ]; then
    status=1
    echo "FAILED steps: ${failed_steps[*]:-none} (failed tests: $failed)"
fi
echo "$passed passed, $failed failed"
exit "$status"
