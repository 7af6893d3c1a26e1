#!/bin/sh
# Rebuilds the seed inputs of every fuzz target into fuzz/corpus/<target>/seed-* (or into the
# directory given as $1): real images from the test image folder ($VHDKIT_TEST_IMAGES, default
# ../shared/vhd-test-images) and images created with the vhd/vhdx crates. See README.md.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/corpus}
cd "$here/.."
exec cargo run --quiet -p vhdkit-fuzz-targets --example make_seeds -- "$out"
