#!/usr/bin/env bash
# Runs Gantry's whole test suite on a fresh Debian machine, as root: installs
# what the tests use (Debian packages; Rust crates through cargo), checks
# formatting and lints, builds the gantry binary, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/lib.sh

require_root
ensure_cargo
ensure_packages "${GANTRY_PACKAGES[@]}"

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> build gantry"
cargo build --locked --bin gantry
echo "==> cargo test"
# The end-to-end tests drive target/debug/gantry, built above.
cargo test --workspace --locked --no-fail-fast -- --test-threads=2
