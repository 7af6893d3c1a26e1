#!/usr/bin/env bash
# VM state benchmarks (issue 17): checkpoint, restore and live migration of an idle guest,
# vhdtool against QEMU in the same run, at two guest memory sizes (checkpoint time and size
# should follow the memory the guest touched, not its size).
#
#   benches/vm-state.sh [ROUNDS] [SIZES]        (defaults: 5, "256M 1G")
#
# Guest: the Debian cloud kernel with a busybox initramfs printing "TICK n" every 20 ms.
# The measuring script is benches/vm-state-run.sh (what each figure means is described there).
# Where this host's KVM boots a stock kernel it runs directly; elsewhere (the kvm_pvm software
# hypervisor, no KVM) it runs in the nested harness's L1 (tests/examples/nested_run.rs: Linux
# under QEMU TCG with nested KVM), vhdtool and QEMU side by side there: those figures are
# context (each VM exit goes through TCG), the ratios are what compare. Goals on hardware KVM:
# pause <= 50 ms for an idle 1 GiB guest, restore to running <= 100 ms.
#
# Needs qemu-system-x86_64, bash, busybox-static, cpio, SeaBIOS (/usr/share/seabios). VHDTOOL
# overrides the release build of vhdtool. Prints medians, spreads (min..max) and the ratios
# vhdtool/QEMU (below 1 is better for time and size).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
sizes=${2:-256M 1G}
out=$PWD/target/bench-vm-state
files=$out/files
rm -rf "$out" && mkdir -p "$files"
for t in qemu-system-x86_64 bash cpio; do
  command -v $t >/dev/null || { echo "needs $t" >&2; exit 1; }
done
if [ -n "${VHDTOOL:-}" ]; then vt=$VHDTOOL; else
  cargo build --release -q -p vhdtool
  vt=$PWD/target/release/vhdtool
fi
cargo build -q -p vhdkit-tests --example nested_run
nr=$PWD/target/debug/examples/nested_run
IFS=$'\t' read -r vmlinuz mods < <("$nr" --kernel)
cp "$vmlinuz" "$files/vmlinuz"

# The ticking guest.
root=$out/initrd
mkdir -p "$root"/{bin,dev,proc,sys}
cp /bin/busybox "$root/bin/"
cat > "$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
n=0
while :; do
  n=$((n + 1))
  echo "TICK $n ."
  usleep 20000
done
EOF
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet) > "$files/initrd.cpio"

# QEMU's firmware, for -L (the nested L1 has no /usr/share).
mkdir -p "$files/qemu-fw"
cp /usr/share/seabios/bios-256k.bin /usr/share/qemu/linuxboot_dma.bin \
  /usr/share/qemu/kvmvapic.bin "$files/qemu-fw/"
cp benches/vm-state-run.sh "$files/"

cat > "$out/entry.sh" <<EOF
export W V QEMU=\${P_qemu_system_x86_64:-qemu-system-x86_64} ROUNDS=$rounds SIZES='$sizes'
\${P_bash:-bash} "\$W/vm-state-run.sh"
EOF
VHDTOOL_BIN=$vt "$nr" --program "$(command -v qemu-system-x86_64)" --program "$(command -v bash)" \
  --file "$files/vmlinuz" --file "$files/initrd.cpio" --file "$files/qemu-fw" \
  --file "$files/vm-state-run.sh" --scratch 4G "$files" "$out/entry.sh" > "$out/output.log"
grep -a 'R: ' "$out/output.log" | sed 's/.*R: //' > "$out/results"
if grep -q FAIL "$out/results" || ! grep -q '^done' "$out/results"; then
  echo "the run failed (see $out/output.log):" >&2
  grep FAIL "$out/results" >&2 || tail -n 30 "$out/output.log" >&2
  exit 1
fi

median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) print "-"; else print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
spread() { sort -g | awk 'NR==1{lo=$1} {hi=$1} END {print lo".."hi}'; }
values() { awk -v k="$1" '$1 == k && $2 ~ /^[0-9.]+$/ {print $2}' "$out/results"; }
ratio() { if [ "$1" = - ] || [ "$2" = - ]; then echo -; else awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; fi; }
echo "$rounds rounds, guest sizes $sizes ($(grep -q 'L1: ' "$out/output.log" && echo 'nested L1, context only' || echo 'direct'))"
printf '%-12s %-6s %22s %22s %7s\n' figure size vhdtool qemu ratio
for mem in $sizes; do
  for f in checkpoint_ms state_kib restore_ms pause_ms stopcopy_ms targetbuild_ms total_ms; do
    v=$(values "vhdtool_${f}_$mem" | median); q=$(values "qemu_${f}_$mem" | median)
    printf '%-12s %-6s %10s (%s) %10s (%s) %7s\n' "$f" "$mem" "$v" \
      "$(values "vhdtool_${f}_$mem" | spread)" "$q" "$(values "qemu_${f}_$mem" | spread)" "$(ratio "$v" "$q")"
  done
done
grep '^qemu_vhdx_migrate' "$out/results" | sed 's/^/QEMU with a VHDX disk: /' || true
grep '^note' "$out/results" | sort | uniq -c || true
