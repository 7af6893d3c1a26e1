# The VM lifecycle test (tests/tests/vm_lifecycle.rs), run with $W = folder of the files
# (vmlinuz, initrd.cpio, disk.vhdx) and $V = the vhdtool command. Lines starting with "T:" are
# results for the host; the guest's console is printed at the end with "L2: " in front.
S=$W/api.sock
LOG=$W/console.log
last() { grep -o 'COUNTER [0-9]*' $LOG | tail -n1 | cut -d' ' -f2; }
wait_for() {
    i=0
    while ! grep -q "$1" $LOG; do
        i=$((i + 1))
        [ "$i" -gt 3000 ] && { echo "T: FAIL timeout waiting for $1"; return 1; }
        sleep 0.1
    done
}
rm -f $S
$V boot --kernel $W/vmlinuz --initrd $W/initrd.cpio --memory 256M --cpus 2 \
    --transport mmio --disk $W/disk.vhdx --api-socket $S --cmdline quiet </dev/null >$LOG 2>&1 &
pid=$!
wait_for "GUEST: power button at" && wait_for "COUNTER 3 "
echo "T: status $($V vm status --json --api-socket $S)"
$V vm pause --api-socket $S && echo "T: pause ok"
echo "T: state $($V vm status --json --api-socket $S | grep -o '"state":"[a-z-]*"')"
c1=$(last)
sleep 3
c2=$(last)
echo "T: paused from $c1 to $c2"
$V vm resume --api-socket $S && echo "T: resume ok"
sleep 3
echo "T: resumed at $(last)"
t0=$(cut -d' ' -f1 /proc/uptime)
$V vm shutdown --timeout 120 --api-socket $S
echo "T: shutdown rc=$? from $t0 to $(cut -d' ' -f1 /proc/uptime)"
# Bounded: a VMM that does not exit is reported with its threads' states, then killed.
i=0
while kill -0 $pid 2>/dev/null && [ "$i" -lt 600 ]; do
    i=$((i + 1))
    sleep 0.1
done
if kill -0 $pid 2>/dev/null; then
    for t in /proc/$pid/task/*; do
        echo "T: FAIL VMM thread $(cat $t/comm) still in $(cat $t/wchan)"
    done
    kill -9 $pid
fi
wait $pid
echo "T: vmm rc=$?"
[ -e $S ] && echo "T: FAIL socket left behind"
echo "T: last counter printed $(last)"
$V check $W/disk.vhdx >/dev/null 2>&1
echo "T: check rc=$?"
sed 's/^/L2: /' $LOG
