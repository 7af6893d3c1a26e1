#!/usr/bin/env bash
# Side-by-side benchmark of `vhdtool mount` (fuse-mount) against vhdimount (libvhdi), as issue 6
# asks: sequential read of the whole virtual disk through DIR/disk vs vhdimount's vhdi1 (by
# `dd bs=1M`, and for the VHDX also by `cat`, which reads in st_blksize units as `cp` does), on
# the same fully allocated 1 GiB dynamic VHD and VHDX, runs interleaved A B A B, ROUNDS rounds,
# medians and spread (min..max); then fio random 4 KiB read IOPS through both mounts (1 and 4
# jobs: the 4-job number shows what the one mutex around the Disk costs). Beside them, the same
# sequential reads of a FUSE file system that answers from RAM (huge pages) and does nothing else
# (fuse-mount/examples/memory_fs.rs): what a daemon with no work to do gets through this kernel's
# FUSE (a spliced reply can beat it: the kernel then pins no daemon pages). Not a test: numbers
# vary on shared machines.
#
#   benches/fuse.sh [DIR] [ROUNDS] [FIO_SECONDS]
#   PIPE_MAX_SIZE=2097152 benches/fuse.sh ...   # as root: set fs.pipe-max-size for the run
#
# Mounts splice replies through a pipe; a 1 MiB reply needs a 2 MiB pipe, which a
# process gets with CAP_SYS_RESOURCE (root on most hosts) or when fs.pipe-max-size allows it.
# Otherwise the mount asks for reads of at most what its pipes carry (1016 KiB with the default
# 1 MiB limit). The script prints which case it measured.
#
# Needs root (or FUSE access), vhdimount, fusermount3, fio, python3. DIR default: target/bench-fuse.
# The image files are read once before measuring, so both mounts read from the page cache: what
# is compared is the FUSE file system, not the disk.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-target/bench-fuse}
rounds=${2:-5}
runtime=${3:-10}
size=$((1 << 30))
for t in vhdimount fusermount3 fio python3 dd; do
  command -v $t >/dev/null || { echo "needs $t" >&2; exit 1; }
done
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
cargo build --release -q -p vhdtool
cargo build --release -q -p fuse-mount --example memory_fs
vt=$PWD/target/release/vhdtool

raw=$dir/full.raw
if [ ! -f "$raw" ] || [ "$(stat -c %s "$raw")" != "$size" ]; then
  echo "writing a fully allocated 1 GiB raw file..."
  head -c "$size" /dev/urandom >"$raw"
fi
for f in vhd vhdx; do
  [ -f "$dir/full.$f" ] || "$vt" convert -O $f --type dynamic "$raw" "$dir/full.$f"
done

mounts=()
pipe_max_was=$(cat /proc/sys/fs/pipe-max-size)
if [ -n "${PIPE_MAX_SIZE:-}" ]; then
  echo "$PIPE_MAX_SIZE" >/proc/sys/fs/pipe-max-size
fi
cleanup() {
  echo "$pipe_max_was" >/proc/sys/fs/pipe-max-size 2>/dev/null || true
  for m in "${mounts[@]}"; do
    case $m in
      ours:*) "$vt" umount "${m#ours:}" 2>/dev/null || umount -l "${m#ours:}" 2>/dev/null || true ;;
      vhdi:* | mem:*) fusermount3 -u "${m#*:}" 2>/dev/null || umount -l "${m#*:}" 2>/dev/null || true ;;
    esac
  done
}
trap cleanup EXIT
for f in vhd vhdx; do
  # The image in the page cache as one sequential read leaves it (dropped first: how the cache
  # was filled before, by writes or page faults, changes its folio sizes and with them how
  # fast every reader of the file goes, by up to a third here).
  dd if="$dir/full.$f" iflag=nocache count=0 status=none
  cat "$dir/full.$f" >/dev/null
  mkdir -p "$dir/ours-$f" "$dir/vhdi-$f"
  "$vt" mount --read-only "$dir/full.$f" "$dir/ours-$f"
  mounts+=("ours:$dir/ours-$f")
  vhdimount "$dir/full.$f" "$dir/vhdi-$f" >/dev/null
  mounts+=("vhdi:$dir/vhdi-$f")
  while [ ! -f "$dir/vhdi-$f/vhdi1" ]; do sleep 0.1; done
  cmp -n $((64 << 20)) "$dir/ours-$f/disk" "$dir/vhdi-$f/vhdi1" || { echo "mounts differ!" >&2; exit 1; }
done

# The reference: a FUSE file system that answers every read from a buffer in its memory and does
# nothing else (fuse-mount/examples/memory_fs.rs), with the same largest request as our mount.
max_read=$(grep " $dir/ours-vhdx " /proc/mounts | grep -o 'max_read=[0-9]*' | cut -d= -f2)
mkdir -p "$dir/mem"
"$PWD/target/release/examples/memory_fs" "$dir/mem" "$size" "$max_read" &
mounts+=("mem:$dir/mem")
for _ in $(seq 300); do [ -f "$dir/mem/mem" ] && break; sleep 0.1; done
[ -f "$dir/mem/mem" ] || { echo "memory_fs did not mount on $dir/mem" >&2; exit 1; }

seq_read() { # reader file -> MB/s (whole file; the file's page cache dropped first).
  # Readers: dd with 1 MiB reads, and cat, which reads in the file's st_blksize (as cp does).
  dd if="$2" iflag=nocache count=0 status=none 2>/dev/null || true
  local t0 t1
  t0=$(date +%s.%N)
  case $1 in
    dd) dd if="$2" of=/dev/null bs=1M status=none ;;
    cat) cat "$2" >/dev/null ;;
  esac
  t1=$(date +%s.%N)
  python3 -c "print(round($size / 1e6 / ($t1 - $t0), 1))"
}
fio_iops() { # file jobs -> IOPS of 4 KiB random reads
  fio --name=r --filename="$1" --rw=randread --bs=4k --ioengine=psync --direct=1 --numjobs="$2" \
    --group_reporting --runtime="$runtime" --time_based --output-format=json 2>/dev/null |
    python3 -c "import json,sys; print(round(json.load(sys.stdin)['jobs'][0]['read']['iops']))"
}

declare -A res
add() { res[$1]="${res[$1]:-} $2"; }
for r in $(seq "$rounds"); do
  echo "round $r/$rounds"
  for f in vhd vhdx; do
    for rd in dd cat; do
      [ "$f/$rd" = vhd/cat ] && continue # vhdimount's VHD at ~40 MB/s: once (dd) is enough
      [ "$f" = vhdx ] && add "${rd}_mem" "$(seq_read $rd "$dir/mem/mem")"
      # Which mount reads first alternates every round (A B, B A, ...).
      if ((r % 2)); then
        add "${rd}_ours_$f" "$(seq_read $rd "$dir/ours-$f/disk")"
        add "${rd}_vhdi_$f" "$(seq_read $rd "$dir/vhdi-$f/vhdi1")"
      else
        add "${rd}_vhdi_$f" "$(seq_read $rd "$dir/vhdi-$f/vhdi1")"
        add "${rd}_ours_$f" "$(seq_read $rd "$dir/ours-$f/disk")"
      fi
    done
  done
done
for f in vhd vhdx; do
  for j in 1 4; do
    add "rand${j}_ours_$f" "$(fio_iops "$dir/ours-$f/disk" $j)"
    add "rand${j}_vhdi_$f" "$(fio_iops "$dir/vhdi-$f/vhdi1" $j)"
  done
done

summary() { # key -> "median (min..max)"
  python3 -c "
import statistics, sys
v = sorted(float(x) for x in sys.argv[1:])
print(f'{statistics.median(v):.0f} ({v[0]:.0f}..{v[-1]:.0f})')" ${res[$1]}
}
median() { python3 -c "import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))" ${res[$1]}; }
ratio() { python3 -c "print(f'{$(median "$1") / $(median "$2"):.1f}x')"; }

echo
echo "fs.pipe-max-size $(cat /proc/sys/fs/pipe-max-size); vhdtool mount max_read $max_read"
echo "sequential read of 1 GiB, MB/s, median (min..max) of $rounds, interleaved:"
for k in dd/vhd dd/vhdx cat/vhdx; do
  rd=${k%/*} f=${k#*/}
  printf '  %-5s %-4s vhdtool mount %-22s vhdimount %-22s ratio %s\n' "$f" "$rd" \
    "$(summary ${rd}_ours_$f)" "$(summary ${rd}_vhdi_$f)" "$(ratio ${rd}_ours_$f ${rd}_vhdi_$f)"
done
printf '  reference: a FUSE daemon answering from RAM (huge pages), same max_read: dd %s, cat %s\n' \
  "$(summary dd_mem)" "$(summary cat_mem)"
echo "random 4 KiB reads (fio psync, O_DIRECT, ${runtime}s), IOPS:"
for f in vhd vhdx; do
  for j in 1 4; do
    printf '  %-5s %d job(s): vhdtool mount %-8s vhdimount %-8s ratio %s\n' "$f" $j \
      "$(summary rand${j}_ours_$f)" "$(summary rand${j}_vhdi_$f)" \
      "$(ratio rand${j}_ours_$f rand${j}_vhdi_$f)"
  done
done
