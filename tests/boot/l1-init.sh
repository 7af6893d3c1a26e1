#!/bin/busybox sh
# /init of the L1 Linux of the nested end-to-end test (tests/tests/boot.rs): runs under
# `qemu-system-x86_64 -accel tcg -cpu qemu64,+svm,+npt`, loads kvm-amd (nested paging), mounts
# the scratch ext4 disk (/dev/vda: vhdtool, its libraries, the L2 kernel and initramfs, the
# images) and runs `vhdtool boot` there. L2's console comes out on this console, each line
# prefixed with L1's uptime. Lines starting with "L1:" are for the host.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev

finish() {
    sync
    umount /work 2>/dev/null
    sync
    echo "L1: end"
    reboot -f
}

for m in irqbypass kvm kvm-amd virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev \
    virtio_pci virtio_blk; do
    insmod /mods/$m.ko || { echo "L1: FAIL insmod $m"; finish; }
done
i=0
while [ ! -b /dev/vda ] || [ ! -c /dev/kvm ]; do
    i=$((i + 1))
    [ "$i" -gt 1200 ] && { echo "L1: FAIL no /dev/vda or /dev/kvm"; finish; }
    sleep 0.05
done
echo "L1: kvm-amd nested=$(cat /sys/module/kvm_amd/parameters/nested) npt=$(cat /sys/module/kvm_amd/parameters/npt)"
mkdir -p /work
mount -t ext4 /dev/vda /work || { echo "L1: FAIL mount scratch disk"; finish; }
cd /work || finish
echo "L1: vhdtool boot starts at $(cut -d' ' -f1 /proc/uptime)"
set -o pipefail
# run.sh (written by the test) execs vhdtool boot with the test's arguments.
sh /work/run.sh 2>&1 |
    while IFS= read -r line; do echo "[L1 $(cut -d' ' -f1 /proc/uptime)] $line"; done
rc=$?
echo "L1: vhdtool exit status $rc at $(cut -d' ' -f1 /proc/uptime)"
finish
