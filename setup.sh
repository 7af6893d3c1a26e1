#!/usr/bin/env bash
# Set up a Debian/Ubuntu machine for vhdkit:
#   1. the system packages the tests use (.ci/apt-packages.txt), via apt-get as root or sudo;
#      skipped when they are all installed already, or with a warning when neither works;
#   2. `cargo install --path cli --locked`, which puts `vhdtool` into ~/.cargo/bin.
# Afterwards: `vhdtool convert disk.raw disk.vhd`, and ./test.sh runs every test.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

mapfile -t packages < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' .ci/apt-packages.txt)
missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "==> system packages already installed"
elif ! command -v apt-get >/dev/null; then
    echo "warning: no apt-get; install these yourself: ${missing[*]}" >&2
else
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null; then
            sudo=(sudo)
        else
            echo "warning: not root and no sudo; install these yourself: ${missing[*]}" >&2
            sudo=(skip)
        fi
    fi
    if [ "${sudo[0]:-}" != "skip" ]; then
        echo "==> installing ${missing[*]}"
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
fi

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
