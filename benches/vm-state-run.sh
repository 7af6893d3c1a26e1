#!/usr/bin/env bash
# The measuring half of benches/vm-state.sh (read that first). Runs with bash, directly or in
# the nested harness's L1, with: W = folder of the files (vmlinuz, initrd.cpio, qemu-fw/),
# V = vhdtool, QEMU = qemu-system-x86_64, ROUNDS, SIZES (guest memory sizes, e.g. "256M 1G").
# Prints one "R: <key> <value>" line per measurement; the driver takes medians.
#
# Per round and size, vhdtool then QEMU (A B), on a guest ticking every 20 ms:
#  checkpoint  a running guest's state to a folder/file, the guest going on (vhdtool vm
#              checkpoint; QEMU migrate to "exec:cat > FILE" then cont), command to done
#  size        the state's allocated KiB (vhdtool: memory.img is sparse; QEMU: the stream)
#  restore     start of the VMM to the guest's first tick (vhdtool boot --restore; QEMU
#              -incoming "exec:cat FILE")
#  pause/total live migration over TCP loopback with a 50 ms downtime target, as each reports
#              it (vhdtool: "guest paused"; QEMU: query-migrate downtime and total-time)
# QEMU runs on a raw disk: its vhdx driver blocks migration (printed once as qemu_vhdx_migrate).
set -u
# Each background VMM in a process group of its own, so a stuck one can be killed whole.
set -m
cd "$W"
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up 2>/dev/null
port=4700
now() { echo "$EPOCHREALTIME"; }
ms() { awk -v a="$2" -v b="$1" 'BEGIN { printf "%.1f", (a - b) * 1000 }'; }
stamp() { while IFS= read -r l; do echo "$EPOCHREALTIME $l"; done; }
# wait_line FILE PATTERN [TENTHS]: until a line matches (default 60 s).
wait_line() {
    local i=0
    while ! grep -q -- "$2" "$1" 2>/dev/null; do
        i=$((i + 1))
        if [ $i -gt "${3:-600}" ]; then
            echo "R: FAIL waiting for '$2' in $1"
            sed 's/^/R: FAIL log: /' "$1" | tail -n 20
            return 1
        fi
        sleep 0.1
    done
}
# first_tick_ms LOG START: ms from START to the first stamped TICK line.
first_tick_ms() {
    wait_line "$1" TICK 1200 || { echo -; return; }
    ms "$2" "$(grep -m1 TICK "$1" | cut -d' ' -f1)"
}
# qmp PORT JSON: sends one command on a fresh QMP connection, prints its reply line.
qmp() {
    local line
    exec 9<>"/dev/tcp/127.0.0.1/$1" || return 1
    read -r -t 10 line <&9
    echo '{"execute":"qmp_capabilities"}' >&9
    while read -r -t 10 line <&9; do case $line in *'"return"'*|*'"error"'*) break ;; esac; done
    echo "$2" >&9
    while read -r -t 60 line <&9; do case $line in *'"return"'*|*'"error"'*) echo "$line"; break ;; esac; done
    exec 9>&-
}
# qmp_wait_migration PORT: polls query-migrate until it ends; prints the last reply.
qmp_wait_migration() {
    local r i=0
    while [ $i -lt 600 ]; do
        r=$(qmp "$1" '{"execute":"query-migrate"}')
        case $r in *'"completed"'*|*'"failed"'*|*'"cancelled"'*) echo "$r"; return ;; esac
        i=$((i + 1))
        sleep 0.05
    done
    echo "$r"
}
json_num() { echo "$1" | grep -o "\"$2\": *[0-9]*" | head -n1 | grep -o '[0-9]*$'; }
qemu_cmd() { # MEM DISK FORMAT QMPPORT [extra...]
    local mem=$1 disk=$2 fmt=$3 q=$4
    shift 4
    echo $QEMU -accel kvm -cpu host -M pc -m "$mem" -smp 1 -nodefaults -no-user-config \
        -display none -serial stdio -L "$W/qemu-fw" -kernel "$W/vmlinuz" -initrd "$W/initrd.cpio" \
        -append "'console=ttyS0 quiet'" -qmp "tcp:127.0.0.1:$q,server=on,wait=off" \
        -drive "file=$disk,format=$fmt,if=virtio,cache=none,aio=threads" "$@"
}
vt_boot() { # MEM DISK SOCKET LOG
    ( $V boot --kernel "$W/vmlinuz" --initrd "$W/initrd.cpio" --memory "$1" --cpus 1 \
        --transport mmio --disk "$2" --api-socket "$3" --cmdline quiet </dev/null 2>&1 | stamp >"$4" ) &
}
stop_vt() { $V vm shutdown --timeout 0 --api-socket "$1" >/dev/null 2>&1; }
kill_qemu() { qmp "$1" '{"execute":"quit"}' >/dev/null 2>&1; }
# reap: waits (at most 30 s) for the background VMMs to end, then kills what is left.
reap() {
    local i=0
    while [ -n "$(jobs -pr)" ] && [ $i -lt 300 ]; do
        i=$((i + 1))
        sleep 0.1
    done
    if [ -n "$(jobs -pr)" ]; then
        echo "R: note a VMM did not stop when asked: killed"
        for j in $(jobs -pr); do kill -9 -- "-$j" 2>/dev/null; done
    fi
    wait
}

once=
for r in $(seq "$ROUNDS"); do
    for mem in $SIZES; do
        echo "round $r size $mem" >&2
        rm -rf "$W"/ck "$W"/*.vhdx "$W"/*.avhdx "$W"/*.log "$W"/*.sock "$W"/q.state "$W"/q.raw
        # vhdtool: checkpoint (the guest goes on), migration, restore of the checkpoint.
        $V create --type dynamic "$W/d.vhdx" 64M >/dev/null
        vt_boot "$mem" "$W/d.vhdx" "$W/a.sock" "$W/a.log"
        wait_line "$W/a.log" "TICK 50 " || continue
        t0=$(now)
        $V vm checkpoint --api-socket "$W/a.sock" "$W/ck" >/dev/null
        echo "R: vhdtool_checkpoint_ms_$mem $(ms "$t0" "$(now)")"
        echo "R: vhdtool_state_kib_$mem $(du -sk "$W/ck" | cut -f1)"
        port=$((port + 1))
        ( $V boot --incoming "tcp:127.0.0.1:$port" --api-socket "$W/b.sock" </dev/null 2>&1 |
            stamp >"$W/b.log" ) &
        wait_line "$W/b.log" "waiting for a migration"
        if reply=$($V vm migrate --downtime-ms 50 --api-socket "$W/a.sock" "tcp:127.0.0.1:$port" 2>&1); then
            echo "R: vhdtool_pause_ms_$mem $(echo "$reply" | sed -n 's/.*guest paused \([0-9.]*\) ms.*/\1/p')"
            echo "R: vhdtool_total_ms_$mem $(echo "$reply" | sed -n 's/.*total \([0-9.]*\) ms.*/\1/p')"
            echo "R: vhdtool_stopcopy_ms_$mem $(echo "$reply" | sed -n 's/.*stop and copy \([0-9.]*\) ms.*/\1/p')"
            echo "R: vhdtool_targetbuild_ms_$mem $(echo "$reply" | sed -n 's/.*target build \([0-9.]*\) ms.*/\1/p')"
            wait_line "$W/b.log" TICK
        else
            echo "R: FAIL vhdtool migrate: $reply"
            pkill -f "incoming tcp:127.0.0.1:$port"
        fi
        stop_vt "$W/a.sock"
        stop_vt "$W/b.sock"
        reap
        t0=$(now)
        ( $V boot --restore "$W/ck" --api-socket "$W/r.sock" </dev/null 2>&1 | stamp >"$W/r.log" ) &
        echo "R: vhdtool_restore_ms_$mem $(first_tick_ms "$W/r.log" "$t0")"
        stop_vt "$W/r.sock"
        reap

        # QEMU, raw disk: save to a file (the guest goes on), migration, restore of the file.
        truncate -s 64M "$W/q.raw"
        if [ -z "$once" ]; then
            once=1
            eval "$(qemu_cmd "$mem" "$W/d.vhdx" vhdx 4600)" </dev/null >"$W/v.log" 2>&1 &
            wait_line "$W/v.log" "TICK 5 " && {
                rep=$(qmp 4600 '{"execute":"migrate","arguments":{"uri":"exec:cat >/dev/null"}}')
                echo "R: qemu_vhdx_migrate $rep"
            }
            kill_qemu 4600
            reap
        fi
        eval "$(qemu_cmd "$mem" "$W/q.raw" raw 4601)" </dev/null 2>&1 | stamp >"$W/qa.log" &
        wait_line "$W/qa.log" "TICK 50 " || continue
        t0=$(now)
        qmp 4601 "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"exec:cat >$W/q.state\"}}" >/dev/null
        qmp_wait_migration 4601 >/dev/null
        qmp 4601 '{"execute":"cont"}' >/dev/null
        echo "R: qemu_checkpoint_ms_$mem $(ms "$t0" "$(now)")"
        echo "R: qemu_state_kib_$mem $(du -sk "$W/q.state" | cut -f1)"
        eval "$(qemu_cmd "$mem" "$W/q.raw" raw 4602 -incoming "tcp:127.0.0.1:4603")" </dev/null 2>&1 |
            stamp >"$W/qb.log" &
        # Its incoming port takes the first connection: wait for its QMP instead.
        i=0
        until qmp 4602 '{"execute":"query-status"}' 2>/dev/null | grep -q inmigrate; do
            i=$((i + 1))
            [ $i -gt 600 ] && break
            sleep 0.1
        done
        qmp 4601 '{"execute":"migrate-set-parameters","arguments":{"downtime-limit":50}}' >/dev/null
        qmp 4601 '{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:4603"}}' >/dev/null
        rep=$(qmp_wait_migration 4601)
        case $rep in
            *'"completed"'*)
                echo "R: qemu_pause_ms_$mem $(json_num "$rep" downtime)"
                echo "R: qemu_total_ms_$mem $(json_num "$rep" total-time)" ;;
            *) echo "R: note QEMU migration did not complete: $rep" ;;
        esac
        kill_qemu 4601
        kill_qemu 4602
        reap
        t0=$(now)
        eval "$(qemu_cmd "$mem" "$W/q.raw" raw 4604 -incoming "'exec:cat $W/q.state'")" </dev/null 2>&1 |
            stamp >"$W/qr.log" &
        echo "R: qemu_restore_ms_$mem $(first_tick_ms "$W/qr.log" "$t0")"
        kill_qemu 4604
        reap
    done
done
echo "R: done"
