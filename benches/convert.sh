#!/usr/bin/env bash
# benches/convert.sh — vhdtool convert side by side with qemu-img convert and cp + sync.
#
# Source: a 2 GiB raw file holding 512 MiB of random data in 64 MiB runs, once with holes
# between the runs ("holes") and once with written zeros there ("zeros", where zero detection
# matters). Directions: raw->vhdx, raw->vhd, vhdx->raw. Peers:
#   qemu-img convert -t writeback      (also flushes its output before exiting)
#   cp --sparse=always SRC DST && sync DST   (the page-cache copy limit, made durable)
# Each case runs ROUNDS times, interleaved (the order rotating every round), page cache
# warm, outputs deleted and the file system synced before each run; the median is printed with the ratios the issue sets:
# vhdtool/qemu-img <= 1.00 and vhdtool/(cp+sync) <= 1.25. Then the peak RSS of vhdtool convert
# (/usr/bin/time -v) and, without a peer, the throughput of dynamic VHD -> raw and of a 3-deep
# differencing chain -> raw.
#
# Usage: benches/convert.sh [WORKDIR]   (needs qemu-img, GNU time; builds vhdtool --release)
# Environment: ROUNDS (default 5), SIZE_MIB (default 2048), VHDTOOL (a prebuilt binary).
set -euo pipefail

ROUNDS=${ROUNDS:-5}
SIZE_MIB=${SIZE_MIB:-2048}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$(mktemp -d "${TMPDIR:-/tmp}/vhdkit-convert-bench.XXXXXX")}
mkdir -p "$WORK"
if [[ -z "${VHDTOOL:-}" ]]; then
    cargo build --quiet --release -p vhdtool --manifest-path "$ROOT/Cargo.toml"
    VHDTOOL="$ROOT/target/release/vhdtool"
fi
command -v qemu-img >/dev/null || { echo "qemu-img is needed" >&2; exit 1; }
[[ -x /usr/bin/time ]] || { echo "GNU time (/usr/bin/time) is needed" >&2; exit 1; }
trap 'rm -f "$WORK"/out.* "$WORK"/chain*.vhd' EXIT

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
spread() { sort -g | awk 'NR==1 {lo=$1} {hi=$1} END {printf "%.2f..%.2f", lo, hi}'; }

# Sources.
make_source() { # $1 = holes|zeros
    local f="$WORK/src-$1.raw"
    [[ -f "$f" ]] && return
    rm -f "$f"
    truncate -s "${SIZE_MIB}M" "$f"
    local runs=8 gap=$(( (SIZE_MIB - 512) / 8 ))
    for i in $(seq 0 $((runs - 1))); do
        local at=$(( i * (64 + gap) ))
        head -c 64M /dev/urandom | dd of="$f" bs=1M seek="$at" conv=notrunc status=none
        if [[ $1 == zeros && $i -lt $((runs - 1)) ]]; then
            dd if=/dev/zero of="$f" bs=1M seek=$((at + 64)) count="$gap" conv=notrunc status=none
        fi
    done
    if [[ $1 == zeros ]]; then
        local last=$(( 7 * (64 + gap) + 64 ))
        [[ $last -lt $SIZE_MIB ]] && dd if=/dev/zero of="$f" bs=1M seek="$last" count=$((SIZE_MIB - last)) conv=notrunc status=none
    fi
    sync "$f"
}
make_source holes
make_source zeros
for k in holes zeros; do
    [[ -f "$WORK/src-$k.vhdx" ]] || "$VHDTOOL" convert -O vhdx "$WORK/src-$k.raw" "$WORK/src-$k.vhdx"
    cat "$WORK/src-$k.raw" "$WORK/src-$k.vhdx" >/dev/null   # warm the page cache
done

# Every timed run starts on a quiet disk: the previous output is deleted and the file system
# synced first. (Deleting 512 MiB just written, on a file system mounted with `discard` as this
# one is, sends discards that otherwise land in the next run and decide its time.)
quiesce() {
    rm -f "$WORK"/out.*
    sync -f "$WORK" 2>/dev/null || sync
    sleep 0.3
}

# One timed run: prints seconds. $1 = tool, $2 = source, $3 = direction
run_once() {
    local tool=$1 src=$2 dir=$3 out="$WORK/out.$1" t0 t1
    quiesce
    case "$tool:$dir" in
        vhdtool:raw-vhdx)  t0=$(now); "$VHDTOOL" convert -O vhdx "$src" "$out"; t1=$(now) ;;
        vhdtool:raw-vhd)   t0=$(now); "$VHDTOOL" convert -O vhd "$src" "$out"; t1=$(now) ;;
        vhdtool:vhdx-raw)  t0=$(now); "$VHDTOOL" convert -O raw "$src" "$out"; t1=$(now) ;;
        qemu:raw-vhdx)     t0=$(now); qemu-img convert -t writeback -f raw -O vhdx "$src" "$out"; t1=$(now) ;;
        qemu:raw-vhd)      t0=$(now); qemu-img convert -t writeback -f raw -O vpc "$src" "$out"; t1=$(now) ;;
        qemu:vhdx-raw)     t0=$(now); qemu-img convert -t writeback -f vhdx -O raw "$src" "$out"; t1=$(now) ;;
        cp:*)              t0=$(now); cp --sparse=always "$src" "$out" && sync "$out"; t1=$(now) ;;
    esac
    quiesce
    echo "$t1 - $t0" | bc -l
}

printf '%-6s %-9s %9s %9s %9s %12s %12s\n' source direction vhdtool qemu-img cp+sync vs-qemu vs-cp
fail=0
for kind in holes zeros; do
    for dir in raw-vhdx raw-vhd vhdx-raw; do
        src="$WORK/src-$kind.raw"
        [[ $dir == vhdx-raw ]] && src="$WORK/src-$kind.vhdx"
        declare -a tv=() tq=() tc=()
        for r in $(seq 0 $((ROUNDS - 1))); do
            # The order rotates every round, so no tool always follows the same one.
            for k in 0 1 2; do
                case $(( (r + k) % 3 )) in
                    0) tv+=("$(run_once vhdtool "$src" "$dir")") ;;
                    1) tq+=("$(run_once qemu "$src" "$dir")") ;;
                    2) tc+=("$(run_once cp "$src" "$dir")") ;;
                esac
            done
        done
        mv=$(printf '%s\n' "${tv[@]}" | median)
        mq=$(printf '%s\n' "${tq[@]}" | median)
        mc=$(printf '%s\n' "${tc[@]}" | median)
        rq=$(echo "$mv / $mq" | bc -l)
        rc=$(echo "$mv / $mc" | bc -l)
        okq=$(echo "$rq <= 1.0" | bc -l); okc=$(echo "$rc <= 1.25" | bc -l)
        [[ $okq == 1 && $okc == 1 ]] || fail=1
        printf '%-6s %-9s %8.3fs %8.3fs %8.3fs %7.2fx %-4s %7.2fx %-4s\n' "$kind" "$dir" "$mv" "$mq" "$mc" \
            "$rq" "$([[ $okq == 1 ]] && echo ok || echo OVER)" "$rc" "$([[ $okc == 1 ]] && echo ok || echo OVER)"
        printf '%-16s %10s %10s %10s   (spread, s)\n' "" "$(printf '%s\n' "${tv[@]}" | spread)" \
            "$(printf '%s\n' "${tq[@]}" | spread)" "$(printf '%s\n' "${tc[@]}" | spread)"
    done
done

echo
echo "peak RSS of vhdtool convert (target <= 65536 KiB):"
for dir in raw-vhdx vhdx-raw; do
    src="$WORK/src-zeros.raw"; fmt=vhdx
    [[ $dir == vhdx-raw ]] && { src="$WORK/src-zeros.vhdx"; fmt=raw; }
    rm -f "$WORK/out.rss"
    rss=$(/usr/bin/time -v "$VHDTOOL" convert -O "$fmt" "$src" "$WORK/out.rss" 2>&1 | awk '/Maximum resident/ {print $6}')
    rm -f "$WORK/out.rss"
    printf '  %-9s %6s KiB %s\n' "$dir" "$rss" "$([[ $rss -le 65536 ]] && echo ok || { fail=1; echo OVER; })"
done

echo
echo "no peer (qemu-img cannot read these correctly): throughput over the virtual size"
src="$WORK/src-holes.raw"
rm -f "$WORK/chain0.vhd"
"$VHDTOOL" convert -O vhd "$src" "$WORK/chain0.vhd"
t=()
for _ in $(seq "$ROUNDS"); do t+=("$(run_once vhdtool "$WORK/chain0.vhd" vhdx-raw)"); done
m=$(printf '%s\n' "${t[@]}" | median)
printf '  dynamic VHD -> raw          %8.3fs  %7.0f MiB/s\n' "$m" "$(echo "$SIZE_MIB / $m" | bc -l)"
for i in 1 2; do
    rm -f "$WORK/chain$i.vhd"
    "$VHDTOOL" create --parent "$WORK/chain$((i - 1)).vhd" "$WORK/chain$i.vhd" >/dev/null
    head -c 64M /dev/urandom > "$WORK/out.patch"
    "$VHDTOOL" write "$WORK/chain$i.vhd" --offset "$(( i * 300 ))M" --input "$WORK/out.patch"
done
rm -f "$WORK/out.patch"
t=()
for _ in $(seq "$ROUNDS"); do t+=("$(run_once vhdtool "$WORK/chain2.vhd" vhdx-raw)"); done
m=$(printf '%s\n' "${t[@]}" | median)
printf '  3-deep VHD chain -> raw     %8.3fs  %7.0f MiB/s\n' "$m" "$(echo "$SIZE_MIB / $m" | bc -l)"
echo
[[ $fail == 0 ]] && echo "all targets met" || echo "some targets missed (see OVER)"
