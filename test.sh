#!/usr/bin/env bash
# Run every check and test of the workspace:
#   cargo fmt --all -- --check
#   cargo clippy --workspace --all-targets -- -D warnings
#   cargo test --workspace --no-fail-fast
# All three run even if an earlier one fails. The last line printed is the summary
# "N passed, N failed, N skipped", summed over cargo test's "test result:" lines (unit,
# integration and doc tests). A test that skipped (a missing tool or device: it records why in
# $VHDKIT_SKIP_LOG, see tests/src/lib.rs `skipped`) or is #[ignore]d counts as skipped, not
# passed, and the skipped tests are listed with their reasons above the summary. Exit status is
# non-zero if any step failed or any test failed.
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
export VHDKIT_SKIP_LOG
VHDKIT_SKIP_LOG="$(mktemp)"
trap 'rm -f "$log" "$VHDKIT_SKIP_LOG"' EXIT
echo "==> cargo test --workspace --no-fail-fast ${VHDKIT_TEST_ARGS:-}"
start=$SECONDS
# shellcheck disable=SC2086 # VHDKIT_TEST_ARGS is a list of words
cargo test --workspace --no-fail-fast ${VHDKIT_TEST_ARGS:-} 2>&1 | tee "$log"
test_rc=${PIPESTATUS[0]}
echo "==> test took $((SECONDS - start))s"
if [ "$test_rc" -ne 0 ]; then
    failed_steps+=("test")
fi

# Sum "test result: ok. 5 passed; 0 failed; 1 ignored; ..." (or "FAILED.") over all test
# binaries.
read -r passed failed ignored < <(
    sed 's/\x1b\[[0-9;]*m//g' "$log" | awk '
        /^test result: / {
            for (i = 2; i <= NF; i++) {
                if ($i ~ /^passed;?$/) p += $(i - 1)
                if ($i ~ /^failed;?$/) f += $(i - 1)
                if ($i ~ /^ignored;?$/) g += $(i - 1)
            }
        }
        END { print p + 0, f + 0, g + 0 }'
)
# Tests that passed after recording a skip: "binary::test<TAB>reason" lines, one test counted
# once however many reasons it gave; a test that failed anyway stays a failure.
skipped_list="$(
    sed 's/\x1b\[[0-9;]*m//g' "$log" | awk -F'\t' '
        NR == FNR { if ($0 ~ /^test .* \.\.\. FAILED$/) { sub(/^test /, ""); sub(/ \.\.\. FAILED$/, ""); bad[$0] = 1 }; next }
        {
            name = $1; sub(/^[^:]*::/, "", name)
            if (name in bad) next
            if (!($1 in why)) { order[++n] = $1; why[$1] = $2 }
            else if (index(why[$1], $2) == 0) why[$1] = why[$1] "; " $2
        }
        END { for (i = 1; i <= n; i++) print "  " order[i] ": " why[order[i]] }' - "$VHDKIT_SKIP_LOG"
)"
skipped=0
if [ -n "$skipped_list" ]; then
    skipped=$(printf '%s\n' "$skipped_list" | wc -l)
fi
passed=$((passed - skipped))
if [ "$ignored" -gt 0 ]; then
    echo "ignored tests ($ignored): see the \"... ignored\" lines above"
fi
skipped=$((skipped + ignored))
if [ -n "$skipped_list" ]; then
    echo "skipped tests (what they need is missing; CI=true makes these failures):"
    printf '%s\n' "$skipped_list"
fi
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
echo "$passed passed, $failed failed, $skipped skipped"
exit "$status"
