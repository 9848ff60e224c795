#!/usr/bin/env bash
# Gantry's main job on one machine, as root, from a fresh Debian 12: a local
# cluster (three Raft-replicated controllers and four agents, each host a
# network namespace) deploys a real multi-service Compose file and shows
# where it runs and how its services find each other.
#
#   1. builds gantry (release) and the test images (offline, from Debian's
#      busybox-static);
#   2. `gantry dev cluster up --controllers 3 --agents 4` — real controller and
#      agent processes;
#   3. `gantry image load` — the images go to the controller, and every agent
#      fetches them from there when a task needs them;
#   4. `gantry deploy -f examples/compose.yaml --wait` — a 3-replica web
#      service with a health check and a published port, and a global client
#      that reaches it by name through its virtual IP;
#   5. `gantry cluster controllers`, `gantry service ps`, the clients' logs,
#      `gantry node ls`.
#
# The cluster stays up for you to play with (`gantry ps`, `gantry dev cluster
# kill n2`, ...); `gantry dev cluster down` removes everything it made.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/lib.sh

require_root
ensure_cargo
ensure_packages "${GANTRY_PACKAGES[@]}"

step() { printf '\n==> %s\n' "$*"; }

step "building gantry (release)"
cargo build --release --locked --bin gantry
G="$PWD/target/release/gantry"

work=$(mktemp -d /tmp/gantry-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT

step "building test images from Debian's busybox-static"
deploy/images/build-test-images.sh "$work/images" >/dev/null

step "gantry dev cluster up --controllers 3 --agents 4   (each host in its own network namespace)"
# A cluster left by an earlier run goes first, so the demo always starts clean.
"$G" dev cluster down >/dev/null 2>&1 || true
"$G" dev cluster up --controllers 3 --agents 4
"$G" dev cluster ls

step "gantry cluster controllers   (Raft: one leader, two followers)"
"$G" cluster controllers

step "gantry image load   (the controller keeps the images; agents fetch them from it)"
"$G" image load "$work/images/web.tar"
"$G" image load "$work/images/busybox.tar"

step "gantry deploy -f examples/compose.yaml --wait"
"$G" deploy -f examples/compose.yaml --wait --timeout 60s

step "gantry service ls"
"$G" service ls

step "gantry service ps examples_web   (spread by the scheduler, one per node)"
"$G" service ps examples_web

step "gantry node ls"
"$G" node ls

step "what the clients see: http://web/ answered by replicas on every node"
for _ in $(seq 1 50); do
  if "$G" service logs --tail 1 examples_client 2>/dev/null | grep -q 'hostname='; then break; fi
  sleep 0.2
done
"$G" service logs --tail 2 examples_client

cat <<'TXT'

Done. The cluster is still up; try:
  gantry ps                              every task, where it runs, its health
  gantry dev cluster kill n2             kill -9 n2's agent: n2 goes down within 3 s and
                                         its replica runs on the free node
  gantry dev cluster kill c1             kill -9 a controller: if it led, another takes
                                         over within a second; tasks keep running
  gantry service scale examples_web=2
  gantry exec examples_web -- hostname
  gantry dev cluster down                remove the cluster and everything it made
TXT
