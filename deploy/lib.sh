# Shared by the deploy/ scripts: find the Rust toolchain and install Debian packages.
# Sourced, not run.

# Puts cargo on PATH (rustup installs it under ~/.cargo/bin) or says what to do.
ensure_cargo() {
  if ! command -v cargo >/dev/null 2>&1 && [ -x "${HOME}/.cargo/bin/cargo" ]; then
    export PATH="${HOME}/.cargo/bin:${PATH}"
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: Gantry needs Rust >= 1.90 (install it with rustup)" >&2
    exit 1
  fi
}

# Installs the named Debian packages that are missing, running apt-get update once.
ensure_packages() {
  local missing=()
  local pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# Everything the tests, the demo and the benchmarks use from Debian.
GANTRY_PACKAGES=(iproute2 busybox-static runc crun docker-registry skopeo umoci nftables jq)

require_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "$0 must run as root (containers need namespaces, mounts and cgroups)" >&2
    exit 1
  fi
}
