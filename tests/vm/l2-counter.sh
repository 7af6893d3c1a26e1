#!/bin/busybox sh
# /init of the guest of the VM lifecycle test (tests/tests/vm_lifecycle.rs): prints
# "COUNTER n uptime" five times a second and writes n to the first sector of /dev/vda (fsync'd);
# powers off when the ACPI power button is pressed. "GUEST:" lines report the rest.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "GUEST: boot at $(cut -d' ' -f1 /proc/uptime)"
for m in virtio_ring virtio virtio_mmio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci \
    virtio_blk button evdev; do
    insmod /mods/$m.ko || echo "GUEST: FAIL insmod $m"
done
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ "$i" -gt 600 ] && echo "GUEST: FAIL no /dev/vda"
    sleep 0.05
done
counter() {
    n=0
    while [ ! -e /tmp/stop ]; do
        n=$((n + 1))
        echo "COUNTER $n $(cut -d' ' -f1 /proc/uptime)"
        echo "$n" | dd of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null
        sleep 0.2
    done
}
counter &
ev=
while [ -z "$ev" ]; do
    for e in /sys/class/input/event*; do
        grep -q "Power Button" "$e/device/name" 2>/dev/null && ev=/dev/input/${e##*/}
    done
    [ -z "$ev" ] && sleep 0.1
done
echo "GUEST: power button at $ev"
dd if="$ev" of=/dev/null bs=24 count=1 2>/dev/null
touch /tmp/stop
wait $!
echo "GUEST: power button pressed, last counter $(dd if=/dev/vda bs=512 count=1 2>/dev/null | head -n1)"
sync
poweroff -f
