#!/bin/busybox sh
# /init of the guest booted by `vhdtool boot` in the end-to-end test (tests/tests/boot.rs).
# Disks: /dev/vda = GPT VHDX with an ext4 partition holding /known.bin, /dev/vdb = differencing
# VHD child, /dev/vdc = raw image given read-only. /expected.sha256 and /pattern.bin come with
# this initramfs. Every result is a line starting with "E2E:"; the host checks them and then
# the images. Ends with `reboot -f` (i8042 reset), which makes vhdtool exit 0.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "E2E: userspace at $(cut -d' ' -f1 /proc/uptime) s"

fail() {
    echo "E2E: FAIL $*"
    sync
    reboot -f
}

for m in virtio_ring virtio virtio_mmio virtio_blk; do
    insmod /mods/$m.ko || fail "insmod $m"
done
i=0
while [ ! -b /dev/vda1 ] || [ ! -b /dev/vdb ] || [ ! -b /dev/vdc ]; do
    i=$((i + 1))
    [ "$i" -gt 600 ] && fail "disks did not appear: $(ls /dev | tr '\n' ' ')"
    sleep 0.05
done
echo "E2E: disks at $(cut -d' ' -f1 /proc/uptime) s"
echo "E2E: cpus=$(grep -c ^processor /proc/cpuinfo)"
# One virtqueue per vCPU: blk-mq shows one hardware queue directory per virtqueue.
echo "E2E: vda queues=$(ls /sys/block/vda/mq | wc -l)"
echo "E2E: irqs $(grep -E 'virtio|ttyS' /proc/interrupts | tr -s ' ' | tr '\n' ';')"

mkdir -p /mnt
mount -t ext4 /dev/vda1 /mnt || fail "mount /dev/vda1"
got=$(sha256sum /mnt/known.bin | cut -d' ' -f1)
want=$(cut -d' ' -f1 /expected.sha256)
[ "$got" = "$want" ] || fail "known.bin hash $got, expected $want"
echo "E2E: hash ok"
echo "written by the guest through virtio-blk" > /mnt/guest.txt || fail "write guest.txt"
sync
umount /mnt || fail "umount"

# The child of the differencing VHD: the parent's first sector shows through, then a pattern
# goes to 2 MiB.
head -c 6 /dev/vdb | grep -q PARENT || fail "parent data not visible through the child"
dd if=/pattern.bin of=/dev/vdb bs=4096 seek=512 conv=fsync 2>/dev/null || fail "write pattern"
echo 3 > /proc/sys/vm/drop_caches
[ "$(dd if=/dev/vdb bs=4096 skip=512 count=16 2>/dev/null | sha256sum | cut -d' ' -f1)" = \
  "$(sha256sum /pattern.bin | cut -d' ' -f1)" ] || fail "pattern read back differs"
echo "E2E: pattern ok"

# The read-only disk: the device is read-only and writes fail.
[ "$(cat /sys/block/vdc/ro)" = 1 ] || fail "vdc is not read-only"
if dd if=/pattern.bin of=/dev/vdc bs=4096 count=1 conv=fsync 2>/dev/null; then
    fail "a write to the read-only disk succeeded"
fi
echo "E2E: ro ok"
sync
echo "E2E: done at $(cut -d' ' -f1 /proc/uptime) s"
# e2e_poweroff on the command line: end through ACPI S5 instead (vhdtool says "powered off").
if grep -q e2e_poweroff /proc/cmdline; then
    poweroff -f
fi
reboot -f
