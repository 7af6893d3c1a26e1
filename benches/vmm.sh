#!/usr/bin/env bash
# Guest-side benchmarks of `vhdtool boot` (issue 5), for a machine with hardware KVM:
#
#  boot  time from starting the VMM to the guest's first userspace line (Debian cloud kernel,
#        `quiet`, busybox initramfs, 1 vCPU, 512 MiB), vhdtool boot vs QEMU (-M pc, SeaBIOS)
#  fio   4 KiB random read, QD32, io_uring + O_DIRECT in the guest on /dev/vda for RUNTIME
#        seconds, through vhdtool's virtio-blk (virtio-mmio, io_uring engine) vs the same guest
#        under QEMU with virtio-blk-pci, aio=io_uring,cache=none, on the same image
#
# A/B interleaved for ROUNDS rounds; prints medians, spread (min..max) and the ratios. Targets
# from the issue: boot <= 150 ms to init; fio vhdtool/QEMU >= 1.0. Not a test.
#
#   benches/vmm.sh [FORMAT raw|vhd|vhdx] [ROUNDS] [RUNTIME_SECONDS]
#
# Needs: qemu-system-x86_64, fio, busybox-static, cpio, apt-get (the kernel package is fetched
# into target/vmm-e2e/ as the end-to-end test does). Refuses to run where /dev/kvm is the PVM
# software hypervisor (/sys/module/kvm_pvm: the stock kernel cannot boot there, and nested
# numbers mean nothing) unless VMM_BENCH_FORCE=1. QEMU_CPU overrides QEMU's `-cpu host`,
# VMM_BENCH_QEMU_ACCEL its `-accel kvm`, VHDTOOL the release build of vhdtool, VMM_BENCH_TIMEOUT
# the 300 s limit of one VM run, VMM_BENCH_TRANSPORT vhdtool's `--transport` (mmio; pci for
# virtio-pci with MSI-X: run both to decide the default transport).
set -euo pipefail
cd "$(dirname "$0")/.."
format=${1:-vhdx}
rounds=${2:-3}
runtime=${3:-10}
dir=target/bench-vmm
mkdir -p "$dir"
case $format in raw) qfmt=raw ;; vhd) qfmt=vpc ;; vhdx) qfmt=vhdx ;; *) echo "format: raw, vhd or vhdx" >&2; exit 2 ;; esac
for t in qemu-system-x86_64 fio cpio apt-get dpkg-deb ldd; do
  command -v $t >/dev/null || { echo "needs $t" >&2; exit 1; }
done
if [ -e /sys/module/kvm_pvm ] && [ "${VMM_BENCH_FORCE:-}" != 1 ]; then
  echo "/dev/kvm is kvm_pvm here (software PVM): no meaningful numbers; run on hardware KVM" >&2
  exit 1
fi
if [ -n "${VHDTOOL:-}" ]; then vt=$VHDTOOL; else
  cargo build --release -q -p vhdtool
  vt=$PWD/target/release/vhdtool
fi

# The Debian cloud kernel (same cache as tests/tests/boot.rs).
kdir=target/vmm-e2e/kernel
if [ ! -f $kdir/.complete ]; then
  rm -rf $kdir && mkdir -p $kdir/deb
  pkg=$(apt-cache depends linux-image-cloud-amd64 | sed -n 's/^ *Depends: \(linux-image-.*\)/\1/p' | head -n1)
  (cd $kdir/deb && apt-get download -q "$pkg")
  dpkg-deb -x $kdir/deb/*.deb $kdir/root && rm -rf $kdir/deb
  echo "$pkg" > $kdir/.complete
fi
vmlinuz=$(ls $kdir/root/boot/vmlinuz-*)
mods=$kdir/root/lib/modules/${vmlinuz##*/vmlinuz-}

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
  iops=$(fio --name=r --filename=/dev/vda --rw=randread --bs=4k --iodepth=32 --ioengine=io_uring \
    --direct=1 --runtime="$runtime" --time_based --output-format=terse --terse-version=3 | cut -d';' -f8)
  echo "BENCH: iops $iops"
fi
reboot -f
EOF
chmod +x "$root/init"
initrd=$dir/initrd.cpio
(cd "$root" && find . | cpio -o -H newc --quiet) > "$initrd"

# The image: 1 GiB of random data (fully allocated in every format).
img=$dir/bench.$format
if [ ! -f "$img" ]; then
  head -c $((1 << 30)) /dev/urandom > $dir/bench.raw.tmp
  if [ "$format" = raw ]; then mv $dir/bench.raw.tmp "$img"
  else "$vt" convert -O "$format" $dir/bench.raw.tmp "$img" && rm $dir/bench.raw.tmp; fi
fi

# run vhdtool|qemu MODE CPUS -> prints "<ms to BENCH: userspace> <iops>" ("-" if not seen)
run() {
  local cmd start line first=- iops=-
  if [ "$1" = vhdtool ]; then
    cmd=("$vt" boot --kernel "$vmlinuz" --initrd "$initrd" --memory 512M --cpus "$3"
      --transport "${VMM_BENCH_TRANSPORT:-mmio}"
      --disk "$img" --cmdline "quiet bench=$2 runtime=$runtime")
  else
    cmd=(qemu-system-x86_64 -accel "${VMM_BENCH_QEMU_ACCEL:-kvm}" -cpu "${QEMU_CPU:-host}" -M pc
      -m 512M -smp "$3" -nodefaults -no-user-config -display none -serial stdio -no-reboot
      -kernel "$vmlinuz" -initrd "$initrd"
      -append "console=ttyS0 reboot=k panic=-1 quiet bench=$2 runtime=$runtime"
      -drive "file=$img,format=$qfmt,if=none,id=d0,aio=io_uring,cache=none"
      -device virtio-blk-pci,drive=d0)
  fi
  start=$EPOCHREALTIME
  while IFS= read -r line; do
    case $line in
      *"BENCH: userspace"*)
        [ "$first" = - ] && first=$(awk -v a="$EPOCHREALTIME" -v b="$start" 'BEGIN {printf "%.0f", (a - b) * 1000}') ;;
      *"BENCH: iops"*) iops=${line##* } ;;
    esac
  done < <(timeout "${VMM_BENCH_TIMEOUT:-300}" "${cmd[@]}" 2>&1 </dev/null)
  echo "$first $iops"
}

declare -A res
add() { res[$1]="${res[$1]:-} $2"; }
for r in $(seq "$rounds"); do
  echo "round $r/$rounds"
  read -r ms _ < <(run vhdtool boot 1); add vhdtool_boot_ms "$ms"
  read -r ms _ < <(run qemu boot 1); add qemu_boot_ms "$ms"
  read -r _ iops < <(run vhdtool fio 2); add vhdtool_fio_iops "$iops"
  read -r _ iops < <(run qemu fio 2); add qemu_fio_iops "$iops"
done

median() { tr ' ' '\n' | { grep -v '^-*$' || true; } | sort -g | awk '{a[NR]=$1} END {if (NR==0) print "-"; else print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
spread() { tr ' ' '\n' | { grep -v '^-*$' || true; } | sort -g | awk 'NR==1{lo=$1} {hi=$1} END {print lo".."hi}'; }
echo
echo "vhdtool --transport ${VMM_BENCH_TRANSPORT:-mmio}, format $format, $rounds rounds, fio ${runtime}s (4 KiB randread QD32, io_uring, O_DIRECT)"
for k in vhdtool_boot_ms qemu_boot_ms vhdtool_fio_iops qemu_fio_iops; do
  printf '%-18s median %10s   spread %s\n' "$k" "$(echo ${res[$k]} | median)" "$(echo ${res[$k]} | spread)"
done
vb=$(echo ${res[vhdtool_boot_ms]} | median); qb=$(echo ${res[qemu_boot_ms]} | median)
vf=$(echo ${res[vhdtool_fio_iops]} | median); qf=$(echo ${res[qemu_fio_iops]} | median)
ratio() { if [ "$1" = - ] || [ "$2" = - ]; then echo -; else awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; fi; }
echo "boot: vhdtool ${vb} ms to userspace (target <= 150), QEMU ${qb} ms"
echo "fio:  vhdtool/QEMU = $(ratio "$vf" "$qf") (target >= 1.0)"
