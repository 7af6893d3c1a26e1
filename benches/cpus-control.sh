#!/usr/bin/env bash
# Control run for many-vCPU boots (issue 20): the same guest booted with N vCPUs by vhdtool and
# by QEMU (-accel kvm), interleaved, in the same L1, so that a failure rate belongs to the VMM
# only if the other VMM does not show it too.
#
# Guest: the Debian kernel of the end-to-end tests, `quiet`, a busybox initramfs that prints
# "CTL: userspace nproc=… online=…", idles 15 s (every vCPU halted, woken by its timer) and
# prints "CTL: alive" before `reboot -f`. A boot counts as ok only when "CTL: alive" appears.
#
#   benches/cpus-control.sh [CPUS] [ROUNDS]        (defaults 64 and 5)
#
# Runs directly where this host's KVM boots a stock kernel, else in the nested harness's L1
# (tests/examples/nested_run.rs; hold /work/nested.lock on shared machines). Prints one line per
# boot, then the count of ok boots per VMM.
set -euo pipefail
cd "$(dirname "$0")/.."
cpus=${1:-64}
rounds=${2:-5}
dir=$PWD/target/bench-cpus
files=$dir/files
rm -rf "$dir" && mkdir -p "$files/qemu-fw" "$dir/root/bin"
for t in qemu-system-x86_64 cpio busybox; do
  command -v $t >/dev/null || { echo "needs $t" >&2; exit 1; }
done
cargo build -q -p vhdtool
cargo build -q -p vhdkit-tests --example nested_run
nr=$PWD/target/debug/examples/nested_run
IFS=$'\t' read -r vmlinuz _ < <("$nr" --kernel)
cp "$vmlinuz" "$files/vmlinuz"
cp "$(command -v busybox)" "$dir/root/bin/"
cat > "$dir/root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
echo "CTL: userspace nproc=$(nproc) online=$(cat /sys/devices/system/cpu/online)"
sleep 15
echo "CTL: alive"
reboot -f
EOF
chmod +x "$dir/root/init"
(cd "$dir/root" && find . | cpio -o -H newc --quiet) > "$files/initrd.cpio"
cp /usr/share/seabios/bios-256k.bin /usr/share/qemu/linuxboot_dma.bin \
  /usr/share/qemu/kvmvapic.bin "$files/qemu-fw/"

# The harness treats a "triple fault" line as a TCG fault and retries the whole L1 session,
# so the failure lines are shown with that word rewritten.
cat > "$dir/entry.sh" <<EOF
QEMU=\${P_qemu_system_x86_64:-qemu-system-x86_64}
for round in \$(seq $rounds); do
  for v in vhdtool qemu; do
    if [ \$v = vhdtool ]; then
      timeout 120 \$V boot --kernel \$W/vmlinuz --initrd \$W/initrd.cpio --memory 512M \\
        --cpus $cpus --transport mmio --cmdline quiet </dev/null >\$W/o.log 2>&1
    else
      timeout 120 \$QEMU -accel kvm -cpu host -M pc -m 512M -smp $cpus -nodefaults \\
        -no-user-config -display none -serial stdio -no-reboot -L \$W/qemu-fw \\
        -kernel \$W/vmlinuz -initrd \$W/initrd.cpio \\
        -append "console=ttyS0 reboot=k panic=-1 quiet" </dev/null >\$W/o.log 2>&1
    fi
    rc=\$?
    r=FAILED; grep -q 'CTL: alive' \$W/o.log && r=ok
    echo "CTLR: \$v round \$round exit \$rc \$r"
    [ \$r = ok ] || grep -v warning \$W/o.log | tail -n 2 | sed 's/triple/3x/I' | cut -c1-150 |
      sed 's/^/CTLR:   /'
  done
done
echo "CTLR: done"
EOF
VHDTOOL_BIN=$PWD/target/debug/vhdtool "$nr" --program "$(command -v qemu-system-x86_64)" \
  --file "$files/vmlinuz" --file "$files/initrd.cpio" --file "$files/qemu-fw" \
  "$files" "$dir/entry.sh" > "$dir/out.log" 2> "$dir/err.log" ||
  echo "(no L1 session ran to its end: each was reset or wedged; their boots still count)"
# Nested, stderr streams every L1 session (the harness tries again when QEMU TCG resets or
# wedges L1, which failing L2 boots provoke): each boot any session finished counts.
log=$dir/out.log where=direct
if grep -qa 'L1: ' "$dir/err.log"; then log=$dir/err.log where='nested L1'; fi
grep -a 'CTLR: ' "$log" | sed 's/.*CTLR: //' | tee "$dir/results"
for v in vhdtool qemu; do
  n=$(grep -c "^$v round " "$dir/results" || true)
  ok=$(grep -c "^$v round .* ok$" "$dir/results" || true)
  echo "$v: $ok of $n boots with $cpus vCPUs survived ($where)"
done
