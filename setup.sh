#!/usr/bin/env bash
# Set up a Debian/Ubuntu machine for vhdkit:
#   1. the system packages the tests use (.ci/apt-packages.txt), by .ci/install-packages as root
#      or through sudo, skipped when every command the tests use is there already
#      (.ci/commands.txt); afterwards every one of them must be on PATH, or setup fails naming
#      what is missing;
#   2. the npm packages of the Azure tests (Azurite, @azure/storage-blob) into .ci/node, by
#      .ci/install-node-packages (no root needed);
#   3. `cargo install --path cli --locked`, which puts `vhdtool` into ~/.cargo/bin.
# Afterwards: `vhdtool convert disk.raw disk.vhd`, and ./test.sh runs every test.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

if ! .ci/install-packages --check >/dev/null 2>&1; then
    if ! command -v apt-get >/dev/null; then
        echo "error: no apt-get: install the packages of .ci/apt-packages.txt yourself" >&2
        .ci/install-packages --check || true
        exit 1
    fi
    if [ "$(id -u)" -eq 0 ]; then
        .ci/install-packages
    elif command -v sudo >/dev/null; then
        sudo .ci/install-packages
    else
        echo "error: not root and no sudo: run .ci/install-packages as root" >&2
        .ci/install-packages --check || true
        exit 1
    fi
else
    echo "==> system packages already installed"
fi

.ci/install-node-packages

if ! command -v cargo >/dev/null; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        PATH="$HOME/.cargo/bin:$PATH"
    else
        echo "error: cargo not found; install Rust (https://rustup.rs) and run ./setup.sh again" >&2
        exit 1
    fi
fi

echo "==> cargo install --path cli --locked"
cargo install --path cli --locked

bin_dir="${CARGO_INSTALL_ROOT:-${CARGO_HOME:-$HOME/.cargo}}/bin"
if ! command -v vhdtool >/dev/null; then
    echo "note: add $bin_dir to your PATH to run vhdtool" >&2
fi
echo "==> installed $bin_dir/vhdtool"
