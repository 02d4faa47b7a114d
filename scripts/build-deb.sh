#!/usr/bin/env bash
# Builds the Debian package, target/debian/splice-relay_VERSION-1_ARCH.deb,
# and prints its path as the last line of output.
#
#   scripts/build-deb.sh
#
# Installs cargo-deb first if it is missing (cargo install cargo-deb
# --locked, a couple of minutes). Then: the release binary (cargo build
# --release), the man page and shell completions generated from the clap
# definition into target/assets/ (examples/package-assets.rs), the man page
# gzipped (gzip -9n), and `cargo deb --no-build`, which packages what
# [package.metadata.deb] in Cargo.toml lists. Runs as any user; installing
# the package needs root: apt install ./target/debian/splice-relay_*.deb
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deb --version >/dev/null 2>&1; then
  echo "build-deb.sh: cargo-deb is missing: installing it (cargo install cargo-deb --locked)" >&2
  cargo install cargo-deb --locked
fi

# Cargo.toml's assets name target/assets/ in this directory (cargo-deb maps
# only target/release/ to the real target directory, e.g. CARGO_TARGET_DIR).
assets=target/assets

cargo build --release --bin splice-relay
rm -rf "$assets"
cargo run --quiet --example package-assets -- "$assets" >/dev/null
gzip -9n "$assets/splice-relay.1"

deb=$(cargo deb --no-build --strip --quiet)
echo "$deb"
