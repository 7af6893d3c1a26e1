#!/usr/bin/env bash
# benches/compact.sh — `vhdtool compact --fs` against today's route to give back deleted space.
#
# Image: a dynamic VHDX (BLOCK, default 2M) of SIZE_MIB (default 8192) holding ext4 on the whole
# disk (WSL's layout), WRITE_MIB (default 4096) of random files written through a loop mount
# and synced, then DELETE_MIB (default 3072) of them deleted. Each round copies that image
# (cp --sparse=always, not timed) and times one of:
#   zero-fill:  vhdtool mount; losetup DIR/disk; mount; dd zeros into a file until the file
#               system is full; sync; rm it; umount; losetup -d; vhdtool umount;
#               vhdtool compact (full)             — the usual recipe, no guest needed
#   fs:         vhdtool compact --fs               — reads the ext4 block bitmaps
# Rounds are interleaved (the order alternating). Printed: median seconds and spread, the
# ratio zero-fill/fs (the issue asks >= 10), the file size after each route, and the largest
# size the zero-fill route reached on the way (compact --fs never grows the file).
#
# Usage: benches/compact.sh [WORKDIR]   (root: loop devices, mounts; builds vhdtool --release)
# Environment: ROUNDS (default 5), SIZE_MIB, WRITE_MIB, DELETE_MIB, BLOCK, VHDTOOL.
set -euo pipefail

ROUNDS=${ROUNDS:-5}
SIZE_MIB=${SIZE_MIB:-8192}
WRITE_MIB=${WRITE_MIB:-4096}
DELETE_MIB=${DELETE_MIB:-3072}
BLOCK=${BLOCK:-2M}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$(mktemp -d "${TMPDIR:-/tmp}/vhdkit-compact-bench.XXXXXX")}
mkdir -p "$WORK"
if [[ -z "${VHDTOOL:-}" ]]; then
    cargo build --quiet --release -p vhdtool --manifest-path "$ROOT/Cargo.toml"
    VHDTOOL="$ROOT/target/release/vhdtool"
fi
for t in losetup mount mkfs.ext4; do
    command -v "$t" >/dev/null || { echo "$t is needed" >&2; exit 1; }
done

LOOP=""
cleanup() {
    mountpoint -q "$WORK/mnt" 2>/dev/null && umount "$WORK/mnt"
    [[ -n "$LOOP" ]] && losetup -d "$LOOP" 2>/dev/null
    mountpoint -q "$WORK/fuse" 2>/dev/null && "$VHDTOOL" umount "$WORK/fuse"
    rm -f "$WORK/work.vhdx"
}
trap cleanup EXIT

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
spread() { sort -g | awk 'NR==1 {lo=$1} {hi=$1} END {printf "%.2f..%.2f", lo, hi}'; }
mib() { echo $(( $(stat -c %s "$1") >> 20 )); }

# The image, made once per WORKDIR.
BASE="$WORK/base.vhdx"
if [[ ! -f "$BASE" ]]; then
    raw="$WORK/base.raw"
    rm -f "$raw"
    truncate -s "${SIZE_MIB}M" "$raw"
    mkfs.ext4 -q "$raw"
    LOOP=$(losetup -f --show "$raw")
    mkdir -p "$WORK/mnt"
    mount "$LOOP" "$WORK/mnt"
    n=$(( WRITE_MIB / 64 ))
    del=$(( DELETE_MIB / 64 ))
    for i in $(seq 1 "$n"); do
        head -c 64M /dev/urandom > "$WORK/mnt/f$i"
    done
    sync
    # Delete every file but one in each group, spread over the disk, until DELETE_MIB is gone.
    k=0
    for i in $(seq 1 "$n"); do
        if (( k < del && (i * del) / n != ((i - 1) * del) / n )); then
            rm "$WORK/mnt/f$i"
            k=$((k + 1))
        fi
    done
    sync
    umount "$WORK/mnt"
    losetup -d "$LOOP"
    LOOP=""
    "$VHDTOOL" convert -O vhdx --block-size "$BLOCK" "$raw" "$BASE"
    rm -f "$raw"
fi
echo "image: $(mib "$BASE") MiB file, ${SIZE_MIB} MiB disk, ${WRITE_MIB} MiB written, ${DELETE_MIB} MiB deleted, blocks $BLOCK"

zero_fill() { # prints seconds; leaves the final and the peak size in $WORK/sizes
    local t0 t1 peak
    mkdir -p "$WORK/fuse" "$WORK/mnt"
    t0=$(now)
    "$VHDTOOL" mount "$WORK/work.vhdx" "$WORK/fuse"
    LOOP=$(losetup -f --show "$WORK/fuse/disk")
    mount "$LOOP" "$WORK/mnt"
    dd if=/dev/zero of="$WORK/mnt/fill" bs=1M status=none 2>/dev/null || true
    sync -f "$WORK/mnt/fill"
    peak=$(mib "$WORK/work.vhdx")
    rm "$WORK/mnt/fill"
    umount "$WORK/mnt"
    losetup -d "$LOOP"
    LOOP=""
    "$VHDTOOL" umount "$WORK/fuse"
    "$VHDTOOL" compact "$WORK/work.vhdx" >/dev/null
    t1=$(now)
    echo "$(mib "$WORK/work.vhdx") $peak" > "$WORK/sizes"
    echo "$t1 - $t0" | bc -l
}

fs_compact() {
    local t0 t1
    t0=$(now)
    "$VHDTOOL" compact --fs "$WORK/work.vhdx" >/dev/null
    t1=$(now)
    echo "$(mib "$WORK/work.vhdx") $(mib "$WORK/work.vhdx")" > "$WORK/sizes"
    echo "$t1 - $t0" | bc -l
}

declare -A times sizes
for r in $(seq 1 "$ROUNDS"); do
    order="zero_fill fs_compact"
    (( r % 2 == 0 )) && order="fs_compact zero_fill"
    for route in $order; do
        rm -f "$WORK/work.vhdx"
        cp --sparse=always "$BASE" "$WORK/work.vhdx"
        sync -f "$WORK/work.vhdx"
        s=$($route)
        times[$route]+="$s "
        sizes[$route]=$(cat "$WORK/sizes")
    done
done

zf=$(echo ${times[zero_fill]} | tr ' ' '\n' | median)
fc=$(echo ${times[fs_compact]} | tr ' ' '\n' | median)
printf "%-10s %8.2f s  (%s)  size after %s MiB, largest on the way %s MiB\n" zero-fill "$zf" \
    "$(echo ${times[zero_fill]} | tr ' ' '\n' | spread)" ${sizes[zero_fill]}
printf "%-10s %8.2f s  (%s)  size after %s MiB, largest on the way %s MiB\n" "--fs" "$fc" \
    "$(echo ${times[fs_compact]} | tr ' ' '\n' | spread)" ${sizes[fs_compact]}
printf "ratio zero-fill / --fs: %.1f (issue: >= 10)\n" "$(echo "$zf / $fc" | bc -l)"
