#!/usr/bin/env bash
# Side-by-side benchmark of `vhdtool serve` (crate nbd) against qemu-nbd serving the same VHDX
# and nbdkit serving the same bytes as a raw file (`nbdkit file`), as issue 16 asks: a 1 GiB
# dynamic VHDX of random data, every server on a Unix socket, read-only, the image files in the
# page cache (read once first). Measured, interleaved A B C A B C over ROUNDS rounds, medians
# and spread (min..max):
#   - random 4 KiB reads, QD32, by fio's nbd engine (libnbd), RUNTIME seconds each;
#   - sequential read of the whole disk by `nbdcopy URI null:` (its defaults: multi-conn, 4
#     connections where the server allows it, 64 requests of 256 KiB in flight each).
# Also `vhdtool serve` without --read-only ("ours-rw": one disk handle for every connection);
# the same data as a dynamic VHD ("ours-vhd" against "qemu-nbd-vhd", qemu's vpc driver); and
# over TCP loopback ("ours-tcp", "nbdkit-tcp") and TCP with TLS ("ours-tls", "nbdkit-tls":
# TLS 1.3, an EC P-256 certificate made here by openssl; the clients do not verify it).
# Goals: random reads >= 2x qemu-nbd and >= 0.9x nbdkit-on-raw; sequential >= 0.9x
# nbdkit-on-raw and never below qemu-nbd; the same on VHD, TCP and TLS against their peers.
# The TLS cost is ours-tls / ours-tcp. Not a test: numbers on shared machines vary.
#
#   benches/nbd.sh [DIR] [ROUNDS] [RUNTIME]
#
# Needs fio (with the nbd engine), nbdcopy (libnbd-bin), qemu-nbd (qemu-utils), nbdkit,
# openssl, python3. DIR default: target/bench-nbd. SERVERS="ours qemu-nbd …" runs a subset.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-target/bench-nbd}
rounds=${2:-5}
runtime=${3:-10}
size=$((1 << 30))
for t in fio nbdcopy qemu-nbd nbdkit openssl python3; do
  command -v $t >/dev/null || { echo "needs $t" >&2; exit 1; }
done
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
cargo build --release -q -p vhdtool
vt=$PWD/target/release/vhdtool

raw=$dir/full.raw
if [ ! -f "$raw" ] || [ "$(stat -c %s "$raw")" != "$size" ]; then
  echo "writing 1 GiB of random data..."
  head -c "$size" /dev/urandom >"$raw"
fi
vhdx=$dir/full.vhdx
[ -f "$vhdx" ] || "$vt" convert -O vhdx --type dynamic "$raw" "$vhdx"
vhd=$dir/full.vhd
[ -f "$vhd" ] || "$vt" convert -O vhd --type dynamic "$raw" "$vhd"
# TLS: a CA and a server certificate for localhost, where libnbd looks for them.
pki=$dir/pki
if [ ! -f "$pki/server-cert.pem" ]; then
  mkdir -p "$pki"
  (
    cd "$pki"
    ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
    printf '[srv]\nsubjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n' >ext.cnf
    openssl req -x509 "${ec[@]}" -keyout ca-key.pem -out ca-cert.pem -days 30 -subj /CN=bench-ca 2>/dev/null
    openssl req "${ec[@]}" -keyout server-key.pem -out server.csr -subj /CN=localhost 2>/dev/null
    openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
      -out server-cert.pem -days 30 -extfile ext.cnf -extensions srv 2>/dev/null
  )
fi
# A writable copy for ours-rw, so the read-only servers' image is never opened for writing.
rwvhdx=$dir/rw.vhdx
cp --reflink=auto "$vhdx" "$rwvhdx"

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

sock() { echo "$dir/$1.sock"; }
# TCP servers listen on fixed loopback ports.
declare -A port=([ours-tcp]=10891 [nbdkit-tcp]=10892 [ours-tls]=10893 [nbdkit-tls]=10894)
rm -f "$dir"/*.sock
tls=(--tls-cert "$pki/server-cert.pem" --tls-key "$pki/server-key.pem")
"$vt" serve --read-only --unix "$(sock ours)" "$vhdx" & pids+=($!)
"$vt" serve --unix "$(sock ours-rw)" "$rwvhdx" & pids+=($!)
"$vt" serve --read-only --unix "$(sock ours-vhd)" "$vhd" & pids+=($!)
"$vt" serve --read-only --listen "127.0.0.1:${port[ours-tcp]}" "$vhdx" & pids+=($!)
"$vt" serve --read-only --listen "127.0.0.1:${port[ours-tls]}" "${tls[@]}" "$vhdx" & pids+=($!)
qemu-nbd --read-only --format=vhdx --shared=8 --persistent --socket="$(sock qemu-nbd)" "$vhdx" & pids+=($!)
qemu-nbd --read-only --format=vpc --shared=8 --persistent --socket="$(sock qemu-nbd-vhd)" "$vhd" & pids+=($!)
nbdkit --foreground --readonly --unix "$(sock nbdkit-raw)" file "$raw" & pids+=($!)
nbdkit --foreground --readonly -i 127.0.0.1 -p "${port[nbdkit-tcp]}" file "$raw" & pids+=($!)
nbdkit --foreground --readonly -i 127.0.0.1 -p "${port[nbdkit-tls]}" --tls=require \
  --tls-certificates="$pki" file "$raw" & pids+=($!)
read -r -a servers <<<"${SERVERS:-ours qemu-nbd nbdkit-raw ours-rw ours-vhd qemu-nbd-vhd ours-tcp nbdkit-tcp ours-tls nbdkit-tls}"
uri() {
  case $1 in
    # fio's nbd engine refuses URIs naming local files (tls-certificates): the peer's
    # certificate is not verified, the cost measured is the encryption's.
    *-tls) echo "nbds://localhost:${port[$1]}/?tls-verify-peer=false" ;;
    *-tcp) echo "nbd://127.0.0.1:${port[$1]}/" ;;
    *) echo "nbd+unix:///?socket=$(sock "$1")" ;;
  esac
}
for s in "${servers[@]}"; do
  for _ in $(seq 100); do nbdinfo --size "$(uri "$s")" >/dev/null 2>&1 && break; sleep 0.1; done
  nbdinfo --size "$(uri "$s")" >/dev/null || { echo "$s did not start" >&2; exit 1; }
done

echo "warming the page cache..."
cat "$raw" "$vhdx" "$rwvhdx" "$vhd" >/dev/null

declare -A res
randread() { # server -> IOPS
  fio --name=randread --ioengine=nbd --uri="$(uri "$1")" --rw=randread --bs=4k --iodepth=32 \
    --size="$size" --time_based --runtime="$runtime" --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; t=sys.stdin.read(); print(round(json.loads(t[t.index("{"):])["jobs"][0]["read"]["iops"]))'
}
seqread() { # server -> MB/s
  local t0 t1
  t0=$(date +%s.%N)
  nbdcopy "$(uri "$1")" null:
  t1=$(date +%s.%N)
  python3 -c "print(round($size / 1e6 / ($t1 - $t0)))"
}

for r in $(seq "$rounds"); do
  # Rotate the order every round so no server always runs right after another.
  n=${#servers[@]}
  order=("${servers[@]:r%n}" "${servers[@]:0:r%n}")
  for s in "${order[@]}"; do
    res[rand:$s]+="$(randread "$s") "
    res[seq:$s]+="$(seqread "$s") "
  done
  echo "round $r done"
done

summary() { # key -> "median (min..max)"
  python3 -c "import statistics,sys
v=sorted(float(x) for x in sys.argv[1:])
print(f'{statistics.median(v):.0f} ({v[0]:.0f}..{v[-1]:.0f})')" ${res[$1]}
}
median() { python3 -c "import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))" ${res[$1]}; }
ratio() { python3 -c "print(f'{$(median "$1") / $(median "$2"):.2f}x')"; }

has() { [[ " ${servers[*]} " == *" $1 "* ]]; }
ratios() { # kind: every "ours vs peer (goal)" pair whose servers ran
  local line="" a b g
  while read -r a b g; do
    has "$a" && has "$b" && line+="  $a / $b: $(ratio "$1:$a" "$1:$b") (goal $g)"$'\n'
  done
  printf '%s' "$line"
}
echo
echo "random 4 KiB reads, QD32, fio nbd engine, IOPS, median (min..max) of $rounds:"
for s in "${servers[@]}"; do printf '  %-13s %s\n' "$s" "$(summary "rand:$s")"; done
ratios rand <<'EOF2'
ours qemu-nbd >=2x
ours nbdkit-raw >=0.9x
ours-vhd qemu-nbd-vhd >=2x
ours-tcp nbdkit-tcp >=0.9x
ours-tls nbdkit-tls >=0.9x
ours-tls ours-tcp (TLS cost, report)
EOF2
echo "sequential read of 1 GiB by nbdcopy to null:, MB/s, median (min..max) of $rounds:"
for s in "${servers[@]}"; do printf '  %-13s %s\n' "$s" "$(summary "seq:$s")"; done
ratios seq <<'EOF2'
ours nbdkit-raw >=0.9x
ours qemu-nbd >=1x
ours-vhd qemu-nbd-vhd >=1x
ours-tcp nbdkit-tcp >=0.9x
ours-tls nbdkit-tls >=0.9x
ours-tls ours-tcp (TLS cost, report)
EOF2
