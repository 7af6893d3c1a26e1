#!/bin/sh
# Rebuilds the seed inputs of every fuzz target into fuzz/corpus/<target>/seed-* (or into the
# directory given as $1): real images from the test image folder ($VHDKIT_TEST_IMAGES, default
# ../shared/vhd-test-images) and images created with the vhd/vhdx crates. See README.md.
# `./seeds.sh <dir> virtio_blk` rebuilds only the virtio_blk seeds (driver sessions, no images).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/corpus}
case $out in /*) ;; *) out=$PWD/$out ;; esac
[ $# -gt 0 ] && shift
cd "$here/.."
exec cargo run --quiet -p vhdkit-fuzz-targets --example make_seeds -- "$out" "$@"
