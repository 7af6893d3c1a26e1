#!/usr/bin/env bash
# benches/azure.sh — `vhdtool upload` against the documented Linux route to an Azure page blob,
# both into Azurite (issue 18).
#
# Image: a dynamic VHDX of SIZE_MIB (default 4096) holding DATA_MIB (default 512) of random data
# in 4 MiB runs spread evenly over the disk. Each round times one of:
#   upload:  vhdtool upload --force --parallel PARALLEL IMAGE URL
#   linux:   qemu-img convert -O vpc -o subformat=fixed,force_size IMAGE fixed.vhd, then the JS
#            SDK (@azure/storage-blob) uploads the whole file as a page blob (4 MiB pages, 8 in
#            flight, zeros included: what azcopy and the az CLI send)
# Rounds are interleaved (the order alternating). Printed: median seconds and spread of each,
# the ratio upload/linux (the issue asks <= 0.5), the page-range bytes of vhdtool's blob against
# the data (<= data + 5 %), vhdtool's peak RSS (<= 128 MiB), and upload throughput (data MiB/s)
# for --parallel 1, 2, 4, 8, 16 (median of 3 each).
#
# Usage: benches/azure.sh [WORKDIR]   (needs .ci/install-node-packages; builds vhdtool --release;
#        needs ~35 GB free in WORKDIR at the default size while it runs)
# Environment: ROUNDS (default 5), SIZE_MIB, DATA_MIB, PARALLEL (default 8), VHDTOOL.
set -euo pipefail

ROUNDS=${ROUNDS:-5}
SIZE_MIB=${SIZE_MIB:-4096}
DATA_MIB=${DATA_MIB:-512}
PARALLEL=${PARALLEL:-8}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$(mktemp -d "${TMPDIR:-/tmp}/vhdkit-azure-bench.XXXXXX")}
mkdir -p "$WORK"
if [[ -z "${VHDTOOL:-}" ]]; then
    cargo build --quiet --release -p vhdtool --manifest-path "$ROOT/Cargo.toml"
    VHDTOOL="$ROOT/target/release/vhdtool"
fi
NODE_MODULES="$ROOT/.ci/node/node_modules"
[[ -x "$NODE_MODULES/.bin/azurite-blob" ]] || { echo "run .ci/install-node-packages first" >&2; exit 1; }
for t in node qemu-img /usr/bin/time; do
    command -v "$t" >/dev/null || { echo "$t is needed" >&2; exit 1; }
done
export NODE_PATH="$NODE_MODULES"
sdk() { node "$ROOT/tests/azure/sdk.js" "$@"; }

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$WORK/azurite"
"$NODE_MODULES/.bin/azurite-blob" --blobHost 127.0.0.1 --blobPort "$PORT" \
    --location "$WORK/azurite" --silent --disableTelemetry >/dev/null 2>&1 &
AZURITE=$!
# Azurite keeps every Put Page in extent files it collects only slowly: the rounds at the
# default size leave ~30 GB there, so its folder goes at exit (the source image stays).
cleanup() {
    kill "$AZURITE" 2>/dev/null || true
    wait "$AZURITE" 2>/dev/null || true
    rm -rf "$WORK/fixed.vhd" "$WORK/azurite"
}
trap cleanup EXIT
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    sleep 0.1
done
EP="http://127.0.0.1:$PORT/devstoreaccount1"
sdk container "$EP" bench
URL_A=$(sdk sas "$EP" bench upload.vhd racwd 86400)
URL_B=$(sdk sas "$EP" bench linux.vhd racwd 86400)

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {printf "%.3f\n", (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
spread() { sort -g | awk 'NR==1 {lo=$1} {hi=$1} END {printf "%.2f..%.2f", lo, hi}'; }

IMG="$WORK/src.vhdx"
if [[ ! -f "$IMG" ]]; then
    "$VHDTOOL" create "$IMG" "${SIZE_MIB}M" >/dev/null
    head -c $((4 << 20)) /dev/urandom >"$WORK/run.bin"
    runs=$((DATA_MIB / 4))
    step=$((SIZE_MIB / runs))
    for i in $(seq 0 $((runs - 1))); do
        head -c $((4 << 20)) /dev/urandom >"$WORK/run.bin"
        "$VHDTOOL" write --offset "$((i * step))M" --input "$WORK/run.bin" "$IMG"
    done
    rm -f "$WORK/run.bin"
fi

run_upload() { /usr/bin/time -f %M -o "$WORK/rss" "$VHDTOOL" upload --force --parallel "$1" "$IMG" "$URL_A" 2>/dev/null; }
run_linux() {
    rm -f "$WORK/fixed.vhd"
    qemu-img convert -f vhdx -O vpc -o subformat=fixed,force_size "$IMG" "$WORK/fixed.vhd"
    sdk upload "$URL_B" "$WORK/fixed.vhd" # Put Blob replaces the previous round's blob
}

declare -a TA TB RSS
for r in $(seq "$ROUNDS"); do
    for route in $( ((r % 2)) && echo "upload linux" || echo "linux upload"); do
        if [[ $route == upload ]]; then
            t0=$(now); run_upload "$PARALLEL"; t1=$(now)
            TA+=("$(echo "$t1 - $t0" | bc)"); RSS+=("$(cat "$WORK/rss")")
        else
            t0=$(now); run_linux; t1=$(now)
            TB+=("$(echo "$t1 - $t0" | bc)")
        fi
    done
done
ma=$(printf '%s\n' "${TA[@]}" | median); mb=$(printf '%s\n' "${TB[@]}" | median)
echo "image: ${SIZE_MIB} MiB dynamic VHDX, ${DATA_MIB} MiB data; rounds: $ROUNDS (interleaved)"
echo "vhdtool upload --parallel $PARALLEL: median ${ma} s (spread $(printf '%s\n' "${TA[@]}" | spread))"
echo "qemu-img convert + SDK full upload:  median ${mb} s (spread $(printf '%s\n' "${TB[@]}" | spread))"
echo "ratio upload/linux: $(echo "scale=3; $ma / $mb" | bc)  (issue: <= 0.5)"
ranges=$(sdk ranges "$URL_A" | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{console.log(JSON.parse(s).reduce((a,[x,y])=>a+y-x,0))})')
data=$((DATA_MIB << 20))
echo "page-range bytes: $ranges for $data bytes of data ($(echo "scale=4; $ranges / $data" | bc)x; issue: <= 1.05x)"
echo "vhdtool peak RSS: $(printf '%s\n' "${RSS[@]}" | sort -n | tail -1) KiB (issue: <= 131072)"
for p in 1 2 4 8 16; do
    ts=()
    for _ in 1 2 3; do t0=$(now); run_upload "$p"; t1=$(now); ts+=("$(echo "$t1 - $t0" | bc)"); done
    m=$(printf '%s\n' "${ts[@]}" | median)
    echo "--parallel $p: median ${m} s, $(echo "scale=1; $DATA_MIB / $m" | bc) MiB/s of data (spread $(printf '%s\n' "${ts[@]}" | spread))"
done
