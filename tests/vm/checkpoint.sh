# The checkpoint test (tests/tests/vm_lifecycle.rs), run with $W = folder of the files
# (vmlinuz, initrd.cpio, the disk $D), $V = the vhdtool command and $TRANSPORT (pci or
# mmio). Lines starting with "T:" are results for the host; the consoles are printed at the
# end with "L2-<name>: " in front.
last() { grep -o 'COUNTER [0-9]*' $1 | tail -n1 | cut -d' ' -f2; }
first() { grep -o 'COUNTER [0-9]* [0-9.]*' $1 | head -n1 | cut -d' ' -f2-; }
wait_for() {
    i=0
    while ! grep -q "$2" $1; do
        i=$((i + 1))
        [ "$i" -gt ${3:-3000} ] && {
            echo "T: FAIL timeout waiting for $2 in $1"
            sed "s/^/T: FAIL log: /" $1
            return 1
        }
        sleep 0.1
    done
}
now() { cut -d' ' -f1 /proc/uptime; }
bounded_wait() {
    i=0
    while kill -0 $1 2>/dev/null && [ "$i" -lt 600 ]; do
        i=$((i + 1))
        sleep 0.1
    done
    kill -0 $1 2>/dev/null && { echo "T: FAIL VMM $1 did not exit"; kill -9 $1; }
    wait $1
}
$V boot --kernel $W/vmlinuz --initrd $W/initrd.cpio --memory 256M --cpus 2 \
    --transport $TRANSPORT --disk $W/$D --api-socket $W/a.sock --cmdline quiet </dev/null >$W/run0.log 2>&1 &
pid=$!
wait_for $W/run0.log "GUEST: power button at" && wait_for $W/run0.log "COUNTER 5 "
pre=$(last $W/run0.log)
t0=$(now)
echo "T: checkpoint reply $($V vm checkpoint --api-socket $W/a.sock $W/ck 2>&1)"
echo "T: checkpoint took $t0 to $(now) s"
post=$(last $W/run0.log)
echo "T: counter around the checkpoint $pre $post"
sleep 3
echo "T: kept running to $(last $W/run0.log)"
echo "T: checkpoint files $(ls -ls $W/ck | tr -s ' ' | tr '\n' ';')"
kill -9 $pid
wait $pid
echo "T: killed at $(last $W/run0.log)"

# Two restores of the same checkpoint, at the same time.
for n in 1 2; do
    t=$(now)
    $V boot --restore $W/ck --api-socket $W/r$n.sock </dev/null >$W/run$n.log 2>&1 &
    eval "pid$n=\$!"
    wait_for $W/run$n.log "COUNTER" 600
    echo "T: restore$n first $(first $W/run$n.log) after $t to $(now) s"
done
sleep 3
for n in 1 2; do
    grep -q "GUEST: boot" $W/run$n.log && echo "T: FAIL restore$n booted again"
    echo "T: restore$n status $($V vm status --json --api-socket $W/r$n.sock)"
done
for n in 1 2; do
    $V vm shutdown --timeout 120 --api-socket $W/r$n.sock >/dev/null
    eval "bounded_wait \$pid$n"
    echo "T: restore$n vmm rc=$? last $(last $W/run$n.log)"
done
for img in $W/*.vhd $W/*.vhdx $W/*.avhdx; do
    [ -e $img ] || continue
    $V check $img >/dev/null 2>&1
    echo "T: image $(basename $img) check rc=$? counter $($V read $img --offset 0 --length 16 | head -n1)"
done

# Bad input: a truncated state, a changed frozen layer.
mkdir -p $W/bad
cp $W/ck/manifest.json $W/bad/
head -c 1000 $W/ck/vmstate.bin >$W/bad/vmstate.bin
echo "T: truncated $($V boot --restore $W/bad 2>&1 | tail -n1)"
dd if=/dev/zero bs=512 count=1 2>/dev/null | tr '\000' x | $V write $W/$D --offset 4096 --input -
echo "T: changed layer $($V boot --restore $W/ck 2>&1 | tail -n1)"
for n in 0 1 2; do sed "s/^/L2-run$n: /" $W/run$n.log; done
