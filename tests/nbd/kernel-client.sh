# Run by L1 (tests/tests/nbd_kernel.rs) with $W = /work and $V = vhdtool, $NBDC = nbd-client,
# $MKE2FS = mke2fs: Linux's own NBD client (nbd.ko, configured by nbd-client over netlink, two
# connections) on `vhdtool serve --listen` over TCP loopback. ext4 is made, filled, trimmed
# and unmounted on /dev/nbd0; the host then checks the image. Lines "T: key value" are results.
set -u
fail() { echo "T: FAIL $*"; exit 1; }
insmod $W/nbd.ko nbds_max=2 || fail "insmod nbd"
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
$V serve --name disk --listen 127.0.0.1:10809 $W/disk.vhdx 2> $W/serve.log &
serve=$!
i=0
until $NBDC -l 127.0.0.1 10809 2>/dev/null | grep -q '^disk'; do
    i=$((i + 1))
    [ "$i" -gt 100 ] && { cat $W/serve.log; fail "serve does not answer"; }
    sleep 0.2
done
$NBDC 127.0.0.1 10809 /dev/nbd0 -N disk -C 2 -b 4096 || fail "nbd-client connect"
echo "T: size $(blockdev --getsize64 /dev/nbd0)"
echo "T: discard $(cat /sys/block/nbd0/queue/discard_max_bytes)"
# The pattern the host wrote at 1 MiB reads back through the kernel.
echo "T: pattern $(dd if=/dev/nbd0 bs=65536 skip=16 count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
MKE2FS_CONFIG=$W/mke2fs.conf $MKE2FS -q -F -t ext4 -b 4096 -E nodiscard /dev/nbd0 || fail mkfs
mkdir -p /mnt && mount -t ext4 -o discard /dev/nbd0 /mnt || fail mount
for f in 1 2 3 4 5 6; do
    dd if=/dev/urandom of=/mnt/f$f bs=1M count=6 2>/dev/null || fail "write f$f"
done
sync
rm /mnt/f2 /mnt/f4 /mnt/f6
fstrim -v /mnt || fail fstrim
for f in 1 3 5; do echo "T: sum f$f $(sha256sum /mnt/f$f | cut -d' ' -f1)"; done
umount /mnt || fail umount
$NBDC -d /dev/nbd0 || fail "nbd-client disconnect"
kill -TERM $serve
wait $serve
echo "T: serve exit $?"
cat $W/serve.log
