#!/usr/bin/env bash
# Side-by-side benchmark of the block backend against fio (raw file, io_uring, O_DIRECT) and
# qemu-img bench, as issue 4 asks. Runs A/B interleaved, N rounds, prints medians, the spread
# (min..max) and the ratios. Not a test: numbers vary ±30 % on shared machines.
#
#   benches/backend.sh [DIR] [ROUNDS] [RUNTIME_SECONDS]
#
# DIR must be on a real file system (O_DIRECT); default: a directory under target/.
# Both fio and vhdtool bench hand each request to the kernel as soon as its slot frees (fio's
# iodepth_batch_submit=1 default, vhdtool's --batch 1 default), and so, as strace shows, does
# qemu-img bench: one io_uring_enter per request. Yet qemu-img 10's sequential 4 KiB reads reach
# the disk merged (/sys/block/*/stat: 3,174 reads and 96,838 merges for 100,000 requests; fio's
# and vhdtool's one-at-a-time reads: no merges), which is why its CPU per request is low.
# Sequential reads are also measured with `--batch 32` (= iodepth): the requests whose slots one
# reap frees go to the engine together, which sends runs of adjacent reads as one readv (at
# most 64 transfers, 1 MiB); that is how the virtio-blk device hands over a guest's
# notification.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-target/bench-backend}
rounds=${2:-5}
runtime=${3:-5}
size=$((2 << 30))
mkdir -p "$dir"
cargo build --release -q -p vhdtool
vt=$PWD/target/release/vhdtool
for t in fio qemu-img python3; do command -v $t >/dev/null || { echo "needs $t" >&2; exit 1; }; done

raw=$dir/full.raw
if [ ! -f "$raw" ] || [ "$(stat -c %s "$raw")" != "$size" ]; then
  echo "writing a fully allocated 2 GiB raw file..."
  head -c "$size" /dev/urandom > "$raw"
fi
for f in vhd vhdx; do
  [ -f "$dir/full.$f" ] || "$vt" convert -O $f "$raw" "$dir/full.$f"
done

# The disk here is virtual: a file the host has cached reads several times faster than one it
# has not, which would decide the ratios by cache state. Read every file once, O_DIRECT, so all
# start equally warm.
for f in "$raw" "$dir/full.vhd" "$dir/full.vhdx"; do
  dd if="$f" of=/dev/null bs=4M iflag=direct status=none
done

json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
fio_run() { # rw file
  fio --name=b --filename="$2" --rw="$1" --bs=4k --iodepth=32 --ioengine=io_uring --direct=1 \
      --runtime="$runtime" --time_based --output-format=json 2>/dev/null |
    json "d['jobs'][0]['${3:-read}']['iops']"
}
vt_run() { # rw file
  "$vt" bench --rw "$1" --bs 4k --iodepth 32 --runtime "$runtime" --json "$2" | json "d['iops']"
}
qemu_seq() { # format file -> "iops cpu_us_per_req"
  local n=300000 out secs cpu
  out=$( { /usr/bin/time -f "CPU %U %S" qemu-img bench -f "$1" -t none -i io_uring -c $n -d 32 -s 4k -S 4k "$2"; } 2>&1)
  secs=$(echo "$out" | sed -n 's/.*completed in \([0-9.]*\) seconds.*/\1/p')
  cpu=$(echo "$out" | sed -n 's/^CPU //p')
  python3 -c "import sys; s=float('$secs'); u,k=map(float,'$cpu'.split()); print($n/s, (u+k)*1e6/$n)"
}
vt_seq_cpu() { # file [batch] -> "iops cpu_us_per_req"
  local out cpu iops reqs
  out=$( { /usr/bin/time -f "CPU %U %S" "$vt" bench --rw read --bs 4k --iodepth 32 --batch "${2:-1}" --runtime "$runtime" --json "$1"; } 2>&1)
  cpu=$(echo "$out" | sed -n 's/^CPU //p')
  iops=$(echo "$out" | grep -v '^CPU' | json "d['iops']")
  reqs=$(echo "$out" | grep -v '^CPU' | json "d['requests']")
  python3 -c "u,k=map(float,'$cpu'.split()); print($iops, (u+k)*1e6/$reqs)"
}

declare -A res
add() { res[$1]="${res[$1]:-} $2"; }
for r in $(seq "$rounds"); do
  echo "round $r/$rounds"
  add fio_randread "$(fio_run randread "$raw")"
  add vhd_randread "$(vt_run randread "$dir/full.vhd")"
  add vhdx_randread "$(vt_run randread "$dir/full.vhdx")"
  add vhdx_randread_virtio "$("$vt" bench --rw randread --bs 4k --iodepth 32 --runtime "$runtime" --through virtio --json "$dir/full.vhdx" | json "d['iops']")"
  add fio_randread2 "$(fio_run randread "$raw")"
  read -r a b <<<"$(vt_seq_cpu "$dir/full.vhdx")"; add vhdx_seqread "$a"; add vhdx_seq_cpu_us "$b"
  read -r a b <<<"$(qemu_seq vhdx "$dir/full.vhdx")"; add qemu_vhdx_seqread "$a"; add qemu_vhdx_seq_cpu_us "$b"
  read -r a b <<<"$(vt_seq_cpu "$dir/full.vhdx" 32)"; add vhdx_seqread_batched "$a"; add vhdx_seq_batched_cpu_us "$b"
  read -r a b <<<"$(vt_seq_cpu "$dir/full.vhd")"; add vhd_seqread "$a"; add vhd_seq_cpu_us "$b"
  read -r a b <<<"$(qemu_seq vpc "$dir/full.vhd")"; add qemu_vhd_seqread "$a"; add qemu_vhd_seq_cpu_us "$b"
  read -r a b <<<"$(vt_seq_cpu "$dir/full.vhd" 32)"; add vhd_seqread_batched "$a"; add vhd_seq_batched_cpu_us "$b"
  add fio_seqread "$(fio_run read "$raw")"
  rm -f "$dir/fresh.vhdx"
  "$vt" create -f vhdx --block-size 2M "$dir/fresh.vhdx" 2G >/dev/null
  add vhdx_alloc_randwrite "$(vt_run randwrite "$dir/fresh.vhdx")"
  "$vt" check "$dir/fresh.vhdx" >/dev/null || { echo "fresh.vhdx does not check clean after the write benchmark" >&2; exit 1; }
  rm -f "$dir/fresh.raw"; truncate -s "$size" "$dir/fresh.raw"
  add fio_randwrite "$(fio_run randwrite "$dir/fresh.raw" write)"
done

python3 - "$(declare -p res)" <<'PY'
import re, statistics, sys
vals = {k: [float(x) for x in v.split()] for k, v in re.findall(r'\[(\w+)\]="([^"]*)"', sys.argv[1])}
fio_rr = vals['fio_randread'] + vals['fio_randread2']
def show(name, xs): print(f"{name:24} median {statistics.median(xs):10.2f}  spread {min(xs):.2f}..{max(xs):.2f}")
for k in sorted(vals): show(k, vals[k])
m = statistics.median
print()
print(f"VHD  4K randread QD32 / fio raw: {m(vals['vhd_randread'])/m(fio_rr):.2f}  (target >= 0.9)")
print(f"VHDX 4K randread QD32 / fio raw: {m(vals['vhdx_randread'])/m(fio_rr):.2f}  (target >= 0.9)")
print(f"VHDX 4K randread through virtio-blk / backend: {m(vals['vhdx_randread_virtio'])/m(vals['vhdx_randread']):.2f}  (target >= 0.85)")
print(f"VHDX 4K seq read QD32 / fio raw: {m(vals['vhdx_seqread'])/m(vals['fio_seqread']):.2f}")
print(f"VHDX 4K seq read IOPS / qemu-img bench: {m(vals['vhdx_seqread'])/m(vals['qemu_vhdx_seqread']):.2f}  (target >= 0.95)")
print(f"VHDX 4K seq read CPU per request / qemu-img bench: {m(vals['vhdx_seq_cpu_us'])/m(vals['qemu_vhdx_seq_cpu_us']):.2f}  (one request per system call, as qemu-img; target <= 0.8)")
print(f"VHDX 4K seq read CPU per request, --batch 32 / qemu-img bench: {m(vals['vhdx_seq_batched_cpu_us'])/m(vals['qemu_vhdx_seq_cpu_us']):.2f}  (issue 15: <= 0.7)")
print(f"VHD  4K seq read CPU per request / qemu-img bench: {m(vals['vhd_seq_cpu_us'])/m(vals['qemu_vhd_seq_cpu_us']):.2f}  (one request per system call)")
print(f"VHD  4K seq read CPU per request, --batch 32 / qemu-img bench: {m(vals['vhd_seq_batched_cpu_us'])/m(vals['qemu_vhd_seq_cpu_us']):.2f}  (issue 15: <= 0.7)")
print(f"VHDX allocating 4K randwrite / fio randwrite raw: {m(vals['vhdx_alloc_randwrite'])/m(vals['fio_randwrite']):.2f}  (target >= 0.5)")
PY
