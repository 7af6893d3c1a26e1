#!/usr/bin/env bash
# The measuring half of benches/vmm.sh (read that first). Runs with bash, directly or in the
# nested harness's L1, with: W = folder of the files (vmlinuz, initrd.cpio, qemu-fw/, the
# image), V = vhdtool, QEMU = qemu-system-x86_64, IMG = the image's file name, QFMT = its QEMU
# format name, ROUNDS, RUNTIME (fio seconds), LIMIT (seconds one VM may run). In the nested
# harness's L1, QEMU's fio runs reset L1 under QEMU 7.2 as L0 (twice in two tries); under 10.0
# they ran in every round, so they run everywhere (a spoiled round is noted and left out).
# Prints one "R: <key> <value>" line per measurement ("-" when the guest printed none); the
# driver takes medians.
#
# Per round, in this order (A B C interleaved, so drift hits every variant alike):
#  boot   VMM start to the guest's first userspace line, 1 vCPU: vhdtool --transport mmio,
#         vhdtool --transport pci, QEMU
#  fio1   4 KiB random reads, QD32, one job, 2 vCPUs: the same three
#  fio4   4 KiB random reads, 4 jobs of QD32 each pinned one per vCPU, 4 vCPUs: every VMM
#         gives the disk one queue per vCPU (vhdtool: one io_uring engine per queue; QEMU:
#         virtio-blk-pci's num-queues default), so each job has a queue of its own
set -u
set -m
cd "$W"

# Sets ms to the milliseconds since $start (EPOCHREALTIME: microseconds after the dot), in
# the caller's shell: no subshell, so the look below forks nothing but grep and sleep.
elapsed() { ms=$(((${EPOCHREALTIME/./} - ${start/./}) / 1000)); }

# run_once VARIANT MODE CPUS JOBS -> "<ms to userspace> <iops>"
# Looks for the first userspace line every 10 ms until it appears, then once a second: a loop
# that forked `sleep` 100 times a second for the whole run took nested L1 (two emulated CPUs)
# enough CPU to cut vhdtool's fio figure by about two thirds and QEMU's by about a third.
run_once() {
    local log="$W/run.log" start first=- iops=- pid ms
    local extra="quiet bench=$2 runtime=$RUNTIME jobs=$4"
    # Emptied here, not only by the VM's redirection: the first look may come before the
    # background job opens the log, and must not find the previous run's lines.
    : >"$log"
    start=$EPOCHREALTIME
    case $1 in
        mmio | pci)
            $V boot --kernel "$W/vmlinuz" --initrd "$W/initrd.cpio" --memory 512M --cpus "$3" \
                --transport "$1" --disk "$W/$IMG" --cmdline "$extra" >"$log" 2>&1 </dev/null &
            ;;
        qemu)
            $QEMU -accel kvm -cpu host -M pc -m 512M -smp "$3" -nodefaults -no-user-config \
                -display none -serial stdio -no-reboot -L "$W/qemu-fw" \
                -kernel "$W/vmlinuz" -initrd "$W/initrd.cpio" \
                -append "console=ttyS0 reboot=k panic=-1 $extra" \
                -drive "file=$W/$IMG,format=$QFMT,if=none,id=d0,aio=io_uring,cache=none" \
                -device virtio-blk-pci,drive=d0 >"$log" 2>&1 </dev/null &
            ;;
    esac
    pid=$!
    # The VM ends itself (reboot -f).
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$first" = - ] && grep -q "BENCH: userspace" "$log" 2>/dev/null; then
            elapsed
            first=$ms
        fi
        elapsed
        if [ "$ms" -gt $((LIMIT * 1000)) ]; then
            echo "R: note $1 $2 cpus=$3 still running after ${LIMIT}s: killed" >&2
            kill -9 "$pid" 2>/dev/null
            break
        fi
        if [ "$first" = - ]; then sleep 0.01; else sleep 1; fi
    done
    wait "$pid" 2>/dev/null
    # A guest that printed and ended between two looks: stamp it now (an upper bound).
    if [ "$first" = - ] && grep -q "BENCH: userspace" "$log"; then elapsed && first=$ms; fi
    if grep -q "BENCH: iops" "$log"; then
        iops=$(sed -n 's/.*BENCH: iops \([0-9.]*\).*/\1/p' "$log" | head -n1)
    elif [ "$2" = fio ] && ! grep -q KVM_EXIT_SHUTDOWN "$log"; then
        echo "R: note $1 fio cpus=$3 printed no result:" >&2
        tail -n 5 "$log" | grep -v -e "detected stalls" -e "soft lockup" | sed 's/^/R: note   /' >&2
    fi
    echo "$first $iops"
}

# run VARIANT MODE CPUS JOBS: run_once, again (at most twice more) after QEMU TCG's nested-SVM
# fault reset a vCPU of the guest (what the harness in tests/tests/nested/mod.rs discards a
# run for; the note below avoids its words, so that one wedged VM costs one VM run here).
run() {
    local out try
    for try in 1 2 3; do
        out=$(run_once "$@")
        grep -q "KVM_EXIT_SHUTDOWN" "$W/run.log" || break
        echo "R: note $1 $2 cpus=$3 vCPU reset under TCG, run again" >&2
    done
    echo "$out"
}

for r in $(seq "$ROUNDS"); do
    echo "R: round $r"
    for v in mmio pci qemu; do
        out=$(run $v boot 1 1)   # no process substitution: L1 has no /dev/fd
        echo "R: ${v}_boot_ms ${out%% *}"
    done
    for v in mmio pci qemu; do
        out=$(run $v fio 2 1)
        echo "R: ${v}_fio1_iops ${out#* }"
    done
    for v in mmio pci qemu; do
        out=$(run $v fio 4 4)
        echo "R: ${v}_fio4_iops ${out#* }"
    done
done 2>&1
echo "R: done"
