#!/usr/bin/env bash
# Guest-side benchmarks of `vhdtool boot` (issues 5 and 20), vhdtool against QEMU in one run:
#
#  boot  VMM start to the guest's first userspace line (Debian cloud kernel, `quiet`, busybox
#        initramfs, 1 vCPU, 512 MiB): vhdtool --transport mmio and pci, QEMU (-M pc, SeaBIOS)
#  fio1  4 KiB random read, QD32, io_uring + O_DIRECT in the guest on /dev/vda for RUNTIME
#        seconds, 2 vCPUs: vhdtool's virtio-blk over virtio-mmio and over virtio-pci with MSI-X
#        (io_uring engine), QEMU's virtio-blk-pci with aio=io_uring,cache=none, same image
#  fio4  the same with 4 vCPUs and 4 jobs (one pinned per vCPU, QD32 each), so that every
#        job has a queue of the disk (and an io_uring engine in vhdtool) of its own
#
# What each figure means and the order of the runs: benches/vmm-run.sh, which this runs where
# this host's KVM boots a stock kernel, and elsewhere (the kvm_pvm software hypervisor) in the
# nested harness's L1 (tests/examples/nested_run.rs, Linux under QEMU TCG with nested KVM),
# vhdtool and QEMU side by side there: nested figures are context (every exit goes through
# TCG), the ratios are what compare. Targets on hardware KVM: boot <= 150 ms to userspace,
# fio vhdtool/QEMU >= 1.0; the transport that does at least as well is the default.
#
#   benches/vmm.sh [FORMAT raw|vhd|vhdx] [ROUNDS] [RUNTIME_SECONDS]
#
# Needs: qemu-system-x86_64, fio, busybox-static, cpio, bash, apt-get (the kernel package is
# fetched as the end-to-end tests do). VHDTOOL overrides the release build of vhdtool,
# VMM_BENCH_TIMEOUT the limit of one VM run (default 300 s). Prints medians, spreads
# (min..max) and the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
format=${1:-vhdx}
rounds=${2:-3}
runtime=${3:-10}
dir=$PWD/target/bench-vmm
files=$dir/files
rm -rf "$files" && mkdir -p "$files"
case $format in raw) qfmt=raw ;; vhd) qfmt=vpc ;; vhdx) qfmt=vhdx ;; *) echo "format: raw, vhd or vhdx" >&2; exit 2 ;; esac
for t in qemu-system-x86_64 fio cpio apt-get dpkg-deb ldd bash; do
  command -v $t >/dev/null || { echo "needs $t" >&2; exit 1; }
done
if [ -n "${VHDTOOL:-}" ]; then vt=$VHDTOOL; else
  cargo build --release -q -p vhdtool
  vt=$PWD/target/release/vhdtool
fi
cargo build -q -p vhdkit-tests --example nested_run
nr=$PWD/target/debug/examples/nested_run
IFS=$'\t' read -r vmlinuz mods < <("$nr" --kernel)
cp "$vmlinuz" "$files/vmlinuz"

# Guest initramfs: busybox, fio with its libraries, virtio modules for both transports.
root=$dir/initrd
rm -rf "$root" && mkdir -p "$root"/{bin,dev,proc,sys,mods}
cp /bin/busybox "$root/bin/"
fio_bin=$(command -v fio)
mkdir -p "$root$(dirname "$fio_bin")" && cp "$fio_bin" "$root$fio_bin"
for lib in $(ldd "$fio_bin" | grep -o '/[^ ]*'); do
  mkdir -p "$root$(dirname "$lib")" && cp -L "$lib" "$root$lib"
done
for m in virtio_ring virtio virtio_mmio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
  cp "$(find "$mods" -name "$m.ko" | head -n1)" "$root/mods/"
done
cat > "$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mount -t proc proc /proc
echo "BENCH: userspace at $(cut -d' ' -f1 /proc/uptime)"
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mode=$(sed -n 's/.*bench=\([a-z]*\).*/\1/p' /proc/cmdline)
runtime=$(sed -n 's/.*runtime=\([0-9]*\).*/\1/p' /proc/cmdline)
if [ "$mode" = fio ]; then
  for m in virtio_ring virtio virtio_mmio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
    insmod /mods/$m.ko 2>/dev/null
  done
  i=0; while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
  jobs=$(sed -n 's/.*jobs=\([0-9]*\).*/\1/p' /proc/cmdline)
  # One job per vCPU, each pinned to its own (and so to its own queue of the disk).
  iops=$(fio --name=r --filename=/dev/vda --rw=randread --bs=4k --iodepth=32 --ioengine=io_uring \
    --direct=1 --runtime="$runtime" --time_based --numjobs="${jobs:-1}" --group_reporting \
    --cpus_allowed=0-$((${jobs:-1} - 1)) --cpus_allowed_policy=split \
    --output-format=terse --terse-version=3 | cut -d';' -f8)
  echo "BENCH: iops $iops"
fi
reboot -f
EOF
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet) > "$files/initrd.cpio"

# The image: 1 GiB of random data (fully allocated in every format).
img=$dir/bench.$format
if [ ! -f "$img" ]; then
  head -c $((1 << 30)) /dev/urandom > $dir/bench.raw.tmp
  if [ "$format" = raw ]; then mv $dir/bench.raw.tmp "$img"
  else "$vt" convert -O "$format" $dir/bench.raw.tmp "$img" && rm $dir/bench.raw.tmp; fi
fi

cp "$img" "$files/"
# QEMU's firmware, for -L (the nested L1 has no /usr/share).
mkdir -p "$files/qemu-fw"
cp /usr/share/seabios/bios-256k.bin /usr/share/qemu/linuxboot_dma.bin \
  /usr/share/qemu/kvmvapic.bin "$files/qemu-fw/"
cp benches/vmm-run.sh "$files/"

cat > "$dir/entry.sh" <<EOF
export W V QEMU=\${P_qemu_system_x86_64:-qemu-system-x86_64} IMG=bench.$format QFMT=$qfmt
export ROUNDS=1 RUNTIME=$runtime LIMIT=${VMM_BENCH_TIMEOUT:-300}
\${P_bash:-bash} "\$W/vmm-run.sh"
EOF
# One round per run of the script (one L1 boot, nested): an L1 that QEMU TCG wedges costs
# that round only, which is noted and left out. Only stdout holds results: it is the output
# of the run that counted, while stderr streams every try (the harness retries a run that a
# TCG fault spoiled).
: > "$dir/output.log"
: > "$dir/results"
for r in $(seq "$rounds"); do
  echo "round $r" >> "$dir/results"
  if VHDTOOL_BIN=$vt "$nr" --program "$(command -v qemu-system-x86_64)" --program "$(command -v bash)" \
    --file "$files/vmlinuz" --file "$files/initrd.cpio" --file "$files/qemu-fw" \
    --file "$files/bench.$format" --file "$files/vmm-run.sh" --scratch 6G "$files" "$dir/entry.sh" \
    > "$dir/round.log" 2>> "$dir/output.log" && grep -aq 'R: done' "$dir/round.log"; then
    grep -a 'R: ' "$dir/round.log" | sed 's/.*R: //' | grep -v '^round' >> "$dir/results"
  else
    { grep -a 'R: ' "$dir/round.log" | sed 's/.*R: //' | grep -v '^round' || true; } >> "$dir/results"
    echo "note round $r did not finish (see $dir/output.log)" >> "$dir/results"
  fi
  cat "$dir/round.log" >> "$dir/output.log"
done
if ! grep -q '^done' "$dir/results"; then
  echo "no round finished (see $dir/output.log):" >&2
  tail -n 30 "$dir/output.log" >&2
  exit 1
fi

median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) print "-"; else print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
spread() { sort -g | awk 'NR==1{lo=$1} {hi=$1} END {print lo".."hi}'; }
values() { awk -v k="$1" '$1 == k && $2 ~ /^[0-9.]+$/ {print $2}' "$dir/results"; }
ratio() { if [ "$1" = - ] || [ "$2" = - ]; then echo -; else awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; fi; }
where=direct
grep -q 'L1: ' "$dir/output.log" && where='nested L1, context only'
echo "format $format, $rounds rounds, fio ${runtime}s ($where)"
printf '%-10s %22s %22s %22s %8s %8s\n' figure "vhdtool mmio" "vhdtool pci" qemu pci/mmio pci/qemu
for f in boot_ms fio1_iops fio4_iops; do
  m=$(values "mmio_$f" | median); p=$(values "pci_$f" | median); q=$(values "qemu_$f" | median)
  printf '%-10s %22s %22s %22s %8s %8s\n' "$f" "$m ($(values "mmio_$f" | spread))" \
    "$p ($(values "pci_$f" | spread))" "$q ($(values "qemu_$f" | spread))" \
    "$(ratio "$p" "$m")" "$(ratio "$p" "$q")"
done
grep '^note' "$dir/results" | sort | uniq -c || true
