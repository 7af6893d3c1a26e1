#!/bin/busybox sh
# /init of the guest of the virtio-pci test (tests/tests/virtio_pci.rs). The command line says
# which transport the VMM gives it: `e2e_transport=pci`, `e2e_transport=mmio`, or
# `e2e_transport=intx` (pci, the guest booted with `pci=nomsi`). With pci the guest must find
# the disk as a PCI virtio function (vendor 0x1af4, device 0x1042) using MSI-X, with intx the
# same function interrupting through its INTA# on an IO-APIC pin;
# it writes /pattern.bin at 1 MiB of /dev/vda, reads it back uncached, and times a read of the
# whole disk (printed, not judged). Results are "E2E:" lines; ends with `reboot -f`.
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
transport=$(sed -n 's/.*e2e_transport=\([a-z]*\).*/\1/p' /proc/cmdline)
echo "E2E: transport=$transport"
if [ "$transport" != mmio ]; then
    mods="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk"
else
    mods="virtio_ring virtio virtio_mmio virtio_blk"
fi
for m in $mods; do
    insmod /mods/$m.ko || fail "insmod $m"
done
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ "$i" -gt 600 ] && fail "no /dev/vda: $(ls /dev | tr '\n' ' ')"
    sleep 0.05
done
for d in /sys/bus/pci/devices/*; do
    [ -e "$d/vendor" ] || continue
    echo "E2E: pci $(basename $d) $(cat $d/vendor):$(cat $d/device) class=$(cat $d/class) driver=$(basename "$(readlink $d/driver)")"
done
if [ "$transport" != mmio ]; then
    # The disk's function: 1af4:1042 bound to virtio-pci, and its block device under it.
    found=
    for d in /sys/bus/pci/devices/*; do
        if [ "$(cat $d/vendor)" = 0x1af4 ] && [ "$(cat $d/device)" = 0x1042 ]; then
            found=$d
        fi
    done
    [ -n "$found" ] || fail "no 1af4:1042 PCI function"
    [ "$(basename "$(readlink $found/driver)")" = virtio-pci ] || fail "not bound to virtio-pci"
    ls -d $found/virtio*/block/vda >/dev/null 2>&1 || fail "vda is not under $found"
    echo "E2E: vda on pci $(basename $found)"
    if [ "$transport" = pci ]; then
        [ "$(cat $found/msi_bus 2>/dev/null)" != 0 ] || fail "MSI disabled on the bus"
        ls $found/msi_irqs >/dev/null 2>&1 || fail "no MSI-X vectors in $found/msi_irqs"
        echo "E2E: msi_irqs $(ls $found/msi_irqs | tr '\n' ' ')"
    else
        [ -z "$(ls $found/msi_irqs 2>/dev/null)" ] || fail "MSI-X vectors with pci=nomsi"
        irq=$(cat $found/irq)
        line=$(grep -E "^ *$irq:" /proc/interrupts | tr -s ' ')
        case $line in *IO-APIC*virtio*) ;; *) fail "IRQ $irq is not an IO-APIC virtio line: $line" ;; esac
        echo "E2E: intx irq $irq: $line"
    fi
fi
echo "E2E: vda queues=$(ls /sys/block/vda/mq | wc -l)"
grep -E 'virtio|MSI' /proc/interrupts | tr -s ' ' | sed 's/^/E2E: irq /'

dd if=/pattern.bin of=/dev/vda bs=4096 seek=256 conv=fsync 2>/dev/null || fail "write pattern"
echo 3 > /proc/sys/vm/drop_caches
[ "$(dd if=/dev/vda bs=4096 skip=256 count=16 2>/dev/null | sha256sum | cut -d' ' -f1)" = \
  "$(sha256sum /pattern.bin | cut -d' ' -f1)" ] || fail "pattern read back differs"
echo "E2E: pattern ok"
# Timings (printed, not judged): 64 KiB sequential reads of the whole disk, then 4 KiB reads
# (one request and one interrupt each), both O_DIRECT.
timed() {
    t0=$(cut -d' ' -f1 /proc/uptime)
    dd if=/dev/vda of=/dev/null iflag=direct "$@" 2>/dev/null || fail "dd $*"
    t1=$(cut -d' ' -f1 /proc/uptime)
    echo "E2E: timing transport=$transport dd $* from $t0 to $t1 s"
}
timed bs=65536
timed bs=4096 count=2048
sync
echo "E2E: done"
reboot -f
