#!/usr/bin/env bash
# Side-by-side benchmark of `vhdtool serve` (crate nbd) against qemu-nbd serving the same VHDX
# and nbdkit serving the same bytes as a raw file (`nbdkit file`), as issue 16 asks: a 1 GiB
# dynamic VHDX of random data, every server on a Unix socket, read-only, the image files in the
# page cache (read once first). Measured, interleaved A B C A B C over ROUNDS rounds, medians
# and spread (min..max):
#   - random 4 KiB reads, QD32, by fio's nbd engine (libnbd), RUNTIME seconds each;
#   - sequential read of the whole disk by `nbdcopy URI null:` (its defaults: multi-conn, 4
#     connections where the server allows it, 64 requests of 256 KiB in flight each).
# Also `vhdtool serve` without --read-only ("ours-rw": one disk handle for every connection).
# Goals: random reads >= 2x qemu-nbd and >= 0.9x nbdkit-on-raw; sequential >= 0.9x
# nbdkit-on-raw and never below qemu-nbd. Not a test: numbers on shared machines vary.
#
#   benches/nbd.sh [DIR] [ROUNDS] [RUNTIME]
#
# Needs fio (with the nbd engine), nbdcopy (libnbd-bin), qemu-nbd (qemu-utils), nbdkit,
# python3. DIR default: target/bench-nbd.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-target/bench-nbd}
rounds=${2:-5}
runtime=${3:-10}
size=$((1 << 30))
for t in fio nbdcopy qemu-nbd nbdkit python3; do
  command -v $t >/dev/null || { echo "needs $t" >&2; exit 1; }
done
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
cargo build --release -q -p vhdtool
vt=$PWD/target/release/vhdtool

raw=$dir/full.raw
if [ ! -f "$raw" ] || [ "$(stat -c %s "$raw")" != "$size" ]; then
  echo "writing 1 GiB of random data..."
  head -c "$size" /dev/urandom >"$raw"
fi
vhdx=$dir/full.vhdx
[ -f "$vhdx" ] || "$vt" convert -O vhdx --type dynamic "$raw" "$vhdx"
# A writable copy for ours-rw, so the read-only servers' image is never opened for writing.
rwvhdx=$dir/rw.vhdx
cp --reflink=auto "$vhdx" "$rwvhdx"

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

sock() { echo "$dir/$1.sock"; }
rm -f "$dir"/*.sock
"$vt" serve --read-only --unix "$(sock ours)" "$vhdx" & pids+=($!)
"$vt" serve --unix "$(sock ours-rw)" "$rwvhdx" & pids+=($!)
qemu-nbd --read-only --format=vhdx --shared=8 --persistent --socket="$(sock qemu-nbd)" "$vhdx" & pids+=($!)
nbdkit --foreground --readonly --unix "$(sock nbdkit-raw)" file "$raw" & pids+=($!)
servers=(ours qemu-nbd nbdkit-raw ours-rw)
for s in "${servers[@]}"; do
  for _ in $(seq 100); do [ -S "$(sock "$s")" ] && break; sleep 0.1; done
  [ -S "$(sock "$s")" ] || { echo "$s did not start" >&2; exit 1; }
done
uri() { echo "nbd+unix:///?socket=$(sock "$1")"; }

echo "warming the page cache..."
cat "$raw" "$vhdx" "$rwvhdx" >/dev/null

declare -A res
randread() { # server -> IOPS
  fio --name=randread --ioengine=nbd --uri="$(uri "$1")" --rw=randread --bs=4k --iodepth=32 \
    --size="$size" --time_based --runtime="$runtime" --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; t=sys.stdin.read(); print(round(json.loads(t[t.index("{"):])["jobs"][0]["read"]["iops"]))'
}
seqread() { # server -> MB/s
  local t0 t1
  t0=$(date +%s.%N)
  nbdcopy "$(uri "$1")" null:
  t1=$(date +%s.%N)
  python3 -c "print(round($size / 1e6 / ($t1 - $t0)))"
}

for r in $(seq "$rounds"); do
  # Rotate the order every round so no server always runs right after another.
  order=("${servers[@]:r%4}" "${servers[@]:0:r%4}")
  for s in "${order[@]}"; do
    res[rand:$s]+="$(randread "$s") "
    res[seq:$s]+="$(seqread "$s") "
  done
  echo "round $r done"
done

summary() { # key -> "median (min..max)"
  python3 -c "import statistics,sys
v=sorted(float(x) for x in sys.argv[1:])
print(f'{statistics.median(v):.0f} ({v[0]:.0f}..{v[-1]:.0f})')" ${res[$1]}
}
median() { python3 -c "import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))" ${res[$1]}; }
ratio() { python3 -c "print(f'{$(median "$1") / $(median "$2"):.2f}x')"; }

echo
echo "random 4 KiB reads, QD32, fio nbd engine, IOPS, median (min..max) of $rounds:"
for s in "${servers[@]}"; do printf '  %-11s %s\n' "$s" "$(summary "rand:$s")"; done
echo "  ours / qemu-nbd: $(ratio rand:ours rand:qemu-nbd) (goal >= 2x)   ours / nbdkit-raw: $(ratio rand:ours rand:nbdkit-raw) (goal >= 0.9x)"
echo "sequential read of 1 GiB by nbdcopy to null:, MB/s, median (min..max) of $rounds:"
for s in "${servers[@]}"; do printf '  %-11s %s\n' "$s" "$(summary "seq:$s")"; done
echo "  ours / nbdkit-raw: $(ratio seq:ours seq:nbdkit-raw) (goal >= 0.9x)   ours / qemu-nbd: $(ratio seq:ours seq:qemu-nbd) (goal >= 1x)"
