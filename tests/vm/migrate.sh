# The live migration test (tests/tests/vm_lifecycle.rs), run with $W = folder of the files
# (vmlinuz, initrd.cpio, the disk $D), $V = the vhdtool command and $TRANSPORT (pci or
# mmio). Two VMM processes over TCP loopback: the counter guest moves from the source (a.sock)
# to the target (b.sock) while it writes its disk; then a second migration, to a target
# killed half-way, must leave it running. Console lines are stamped with L1's uptime. "T:"
# lines are results for the host.
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
stamp() { while IFS= read -r l; do echo "$(now) $l"; done; }
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up

(
    $V boot --kernel $W/vmlinuz --initrd $W/initrd.cpio --memory 256M --cpus 2 \
        --transport $TRANSPORT --disk $W/$D --api-socket $W/a.sock --cmdline quiet </dev/null 2>&1
    echo "VMM rc=$?"
) | stamp >$W/src.log &
wait_for $W/src.log "GUEST: power button at" && wait_for $W/src.log "COUNTER 5 "
(
    $V boot --incoming tcp:127.0.0.1:4444 --api-socket $W/b.sock </dev/null 2>&1
    echo "VMM rc=$?"
) | stamp >$W/dst.log &
wait_for $W/dst.log "waiting for a migration"
t0=$(now)
reply=$($V vm migrate --api-socket $W/a.sock tcp:127.0.0.1:4444 2>&1)
echo "T: migrate rc=$? reply $reply"
echo "T: migrate took $t0 to $(now) s"
wait_for $W/src.log "VMM rc=" 600
echo "T: source $(grep -o 'VMM rc=[0-9]*' $W/src.log) last $(last $W/src.log)"
src_last=$(last $W/src.log)
wait_for $W/dst.log "COUNTER $((src_last + 10)) " 1200
echo "T: target first $(first $W/dst.log)"
echo "T: target status $($V vm status --json --api-socket $W/b.sock)"
grep -q "GUEST: boot" $W/dst.log && echo "T: FAIL the target booted the guest again"
# Gaps between consecutive counters, in L1 time and in guest uptime: the largest is the
# guest-visible pause, the median the normal period.
gaps=$(cat $W/src.log $W/dst.log | grep -o '^[0-9.]* COUNTER [0-9]* [0-9.]*' |
    awk '{print $3, $1, $4}' | sort -n |
    awk 'NR > 1 { print $2 - pw, $3 - pu } { pw = $2; pu = $3 }')
echo "T: largest counter gap wall $(echo "$gaps" | cut -d' ' -f1 | sort -n | tail -n1) s uptime $(echo "$gaps" | cut -d' ' -f2 | sort -n | tail -n1) s"
echo "T: median counter gap wall $(echo "$gaps" | cut -d' ' -f1 | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }') s"

# A migration to a target killed half-way: the guest runs on at b.
$V boot --incoming tcp:127.0.0.1:4445 --api-socket $W/c.sock </dev/null >$W/cut.log 2>&1 &
cpid=$!
wait_for $W/cut.log "waiting for a migration"
$V vm migrate --max-bandwidth 4 --api-socket $W/b.sock tcp:127.0.0.1:4445 >$W/cut-migrate.log 2>&1 &
mpid=$!
wait_for $W/cut.log "MiB of memory received"
kill -9 $cpid
wait $mpid
echo "T: cut migrate rc=$? $(tail -n1 $W/cut-migrate.log)"
before=$(last $W/dst.log)
sleep 3
echo "T: after the cut counter $before to $(last $W/dst.log)"
echo "T: after the cut status $($V vm status --json --api-socket $W/b.sock)"
$V vm shutdown --timeout 120 --api-socket $W/b.sock >/dev/null
wait_for $W/dst.log "VMM rc=" 600
echo "T: target $(grep -o 'VMM rc=[0-9]*' $W/dst.log) last $(last $W/dst.log)"
$V check $W/$D >/dev/null 2>&1
echo "T: image check rc=$? counter $($V read $W/$D --offset 0 --length 16 | head -n1)"
for n in src dst cut; do sed "s/^/L2-$n: /" $W/$n.log; done
