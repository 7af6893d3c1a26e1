#!/bin/busybox sh
# /init of the guest of the disk hotplug test (tests/tests/disk_hotplug.rs): boots with one
# disk over virtio-pci, then serves `e2e_rounds=N` rounds: a disk appears (ACPI hotplug:
# acpiphp scans the slot, virtio-blk binds), the guest writes /pattern.bin at 1 MiB of it and
# reads it back (or, read-only, checks that a write fails), says so, and waits for the disk to
# go (the VMM asks for the eject; acpiphp unbinds it and runs _EJ0). Results are "E2E:" lines;
# ends with `reboot -f`.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
fail() {
    echo "E2E: FAIL $*"
    sync
    reboot -f
}
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
    insmod /mods/$m.ko || fail "insmod $m"
done
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ "$i" -gt 600 ] && fail "no /dev/vda"
    sleep 0.05
done
rounds=$(sed -n 's/.*e2e_rounds=\([0-9]*\).*/\1/p' /proc/cmdline)
[ -n "$rounds" ] || fail "no e2e_rounds= on the command line"
echo "E2E: acpiphp slots $(ls /sys/bus/pci/slots | tr '\n' ' ')"
echo "E2E: ready for $rounds rounds"
want=$(sha256sum /pattern.bin | cut -d' ' -f1)
n=0
while [ "$n" -lt "$rounds" ]; do
    n=$((n + 1))
    dev=
    i=0
    while [ -z "$dev" ]; do
        for b in /sys/block/vd*; do
            [ "$(basename $b)" != vda ] && [ -b "/dev/$(basename $b)" ] && dev=$(basename $b)
        done
        if [ -z "$dev" ]; then
            i=$((i + 1))
            [ "$i" -gt 6000 ] && fail "round $n: no hot-added disk"
            sleep 0.05
        fi
    done
    pci=$(readlink -f /sys/block/$dev | sed -n 's,.*/\(0000:00:[0-9a-f.]*\)/virtio.*,\1,p')
    if [ "$(cat /sys/block/$dev/ro)" = 1 ]; then
        dd if=/dev/$dev of=/dev/null bs=4096 count=16 2>/dev/null || fail "round $n: read $dev"
        if dd if=/pattern.bin of=/dev/$dev bs=4096 seek=256 conv=fsync 2>/dev/null; then
            fail "round $n: a write to read-only $dev succeeded"
        fi
        echo "E2E: round $n $dev on $pci read-only ok"
    else
        dd if=/pattern.bin of=/dev/$dev bs=4096 seek=256 conv=fsync 2>/dev/null ||
            fail "round $n: write $dev"
        echo 3 > /proc/sys/vm/drop_caches
        got=$(dd if=/dev/$dev bs=4096 skip=256 count=16 2>/dev/null | sha256sum | cut -d' ' -f1)
        [ "$got" = "$want" ] || fail "round $n: pattern read back from $dev differs"
        echo "E2E: round $n $dev on $pci written"
    fi
    [ -n "$pci" ] || fail "round $n: $dev is not on a PCI function"
    # acpiphp unbinds the function (the disk goes), removes it from the bus, then runs _EJ0.
    i=0
    while [ -e /sys/block/$dev ] || [ -e "/sys/bus/pci/devices/$pci" ]; do
        i=$((i + 1))
        [ "$i" -gt 6000 ] && fail "round $n: $dev or $pci never went away"
        sleep 0.05
    done
    echo "E2E: round $n $dev gone"
done
# The boot disk still works.
dd if=/dev/vda of=/dev/null bs=4096 count=16 2>/dev/null || fail "read vda"
echo "E2E: done"
sync
# Time for the last `vm status` of the test's script.
sleep 10
reboot -f
