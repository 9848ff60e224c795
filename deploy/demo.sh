#!/usr/bin/env bash
# Gantry's main job on one machine, as root, from a fresh Debian 12:
# builds gantry, builds the test images offline, imports them, and runs a
# small two-container application through Gantry's own engine — a web
# server with cgroup limits and a named volume, and a client container that
# joins its network namespace and fetches its page — then shows ps, stats,
# logs and exec, and cleans up.
#
# The multi-node version (a local cluster deploying a Compose file) arrives
# with the control-plane work; this script then becomes that.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/lib.sh

require_root
ensure_cargo
ensure_packages "${GANTRY_PACKAGES[@]}"

echo "==> building gantry (release)"
cargo build --release --locked --bin gantry
G="$PWD/target/release/gantry"

# A data directory of its own, so the demo never touches a real node's state.
export GANTRY_DATA_DIR="${GANTRY_DATA_DIR:-/var/lib/gantry-demo}"
work=$(mktemp -d /tmp/gantry-demo.XXXXXX)
cleanup() {
  "$G" container rm -f demo-web >/dev/null 2>&1 || true
  "$G" volume rm demo-data >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n==> %s\n' "$*"; }

step "building test images from Debian's busybox-static"
deploy/images/build-test-images.sh "$work/images" >/dev/null
"$G" image import "$work/images/busybox.tar"
"$G" image import "$work/images/web.tar"
"$G" image ls

step "gantry container run -d --name demo-web -m 64m --cpus 0.5 --pids-limit 64 -v demo-data:/data gantry.test/web"
"$G" container rm -f demo-web >/dev/null 2>&1 || true
"$G" container run -d --name demo-web -m 64m --cpus 0.5 --pids-limit 64 \
  -v demo-data:/data gantry.test/web
"$G" container ps

pid=$("$G" container inspect demo-web | jq -r '.[0].pid // .pid')
step "a client container in demo-web's network namespace fetches its page"
ok=0
for _ in $(seq 1 50); do
  if "$G" container run --rm --network "/proc/$pid/ns/net" gantry.test/busybox \
      timeout 3 wget -q -O - http://127.0.0.1/; then
    ok=1
    break
  fi
  sleep 0.1
done
[ "$ok" = 1 ] || { echo "the web container did not answer" >&2; exit 1; }

step "gantry container exec demo-web sh -c 'echo hello > /data/greeting; id; hostname'"
"$G" container exec demo-web sh -c 'echo hello > /data/greeting; id; hostname'

step "gantry container stats --no-stream"
"$G" container stats --no-stream demo-web

step "gantry container logs demo-web (httpd's access log)"
"$G" container logs demo-web | tail -n 5

step "stop (SIGTERM, then SIGKILL after the grace period) and remove; the volume stays"
"$G" container stop -t 2 demo-web
"$G" container rm demo-web
"$G" volume ls
echo
echo "Done. Gantry's engine ran both containers itself: namespaces, cgroups, overlayfs, a shim each."
