#!/usr/bin/env bash
# Regenerates cli/start-path.order: the functions a `gantry runtime run` of
# /bin/true executes (the parent, the init and its helpers), which the link
# places together at the start of gantry's text (see cli/build.rs for why).
#
# Usage, as root, from anywhere in the repository:
#   cli/start-path-order.sh [RUNS] [SAMPLINGS]     # defaults: 600 runs, 2 samplings
#
# How: build gantry without the order file (GANTRY_NO_SYMBOL_ORDER=1), run
# RUNS containers under `perf record` (cpu-clock at 50 kHz; perf follows the
# children, so the init and the helpers are sampled too), map every sampled
# address in gantry's text to its function with `nm` (the binary is static
# and non-PIE: addresses are the link's), and keep the union of SAMPLINGS
# such recordings (sampling misses some short functions). The names are
# written in the order of that link: grouping them keeps their neighbours of
# today together, which measured a smaller shim than any other order.
# Needs perf (linux-perf), runc (for `runc spec`) and Debian's busybox-static.
# Afterwards gantry is rebuilt with the new file; check the page faults of a
# run (`perf stat -e minor-faults`) and commit the file.
set -euo pipefail

RUNS=${1:-600}
SAMPLINGS=${2:-2}
REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$REPO"
for tool in perf runc nm; do
    command -v "$tool" >/dev/null || { echo "$tool is needed (apt-get install linux-perf runc binutils)" >&2; exit 1; }
done
[[ -x /bin/busybox ]] || { echo "/bin/busybox is needed (apt-get install busybox-static)" >&2; exit 1; }

WORK=$(mktemp -d)
cleanup() {
    # Containers left by an interrupted loop (each one's init), then the files.
    for dir in "$WORK"/root/*/; do
        [[ -d $dir ]] && target/release/gantry runtime --root "$WORK/root" delete --force "$(basename "$dir")" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "building gantry without the order file" >&2
GANTRY_NO_SYMBOL_ORDER=1 cargo build --release --bin gantry >&2
GANTRY=$REPO/target/release/gantry

# The bundle the start benchmark runs: busybox, /bin/true, cgroup limits.
mkdir -p "$WORK/bundle/rootfs/bin"
cp /bin/busybox "$WORK/bundle/rootfs/bin/busybox"
ln -s busybox "$WORK/bundle/rootfs/bin/true"
(cd "$WORK/bundle" && runc spec)
python3 - "$WORK/bundle/config.json" <<'EOF'
import json, sys
path = sys.argv[1]
spec = json.load(open(path))
spec["process"]["terminal"] = False
spec["process"]["args"] = ["/bin/true"]
spec["linux"]["resources"].update({
    "memory": {"limit": 256 << 20},
    "pids": {"limit": 512},
    "cpu": {"quota": 100000, "period": 100000},
})
json.dump(spec, open(path, "w"), indent=2)
EOF

for s in $(seq "$SAMPLINGS"); do
    echo "sampling $s of $SAMPLINGS: $RUNS runs" >&2
    perf record -q -F 50000 -e cpu-clock -o "$WORK/perf-$s.data" -- \
        sh -c 'for i in $(seq "$1"); do "$2" runtime --root "$3" run --bundle "$4" "order-$i" || exit 1; done' \
        sh "$RUNS" "$GANTRY" "$WORK/root" "$WORK/bundle" >/dev/null
    perf script -i "$WORK/perf-$s.data" -F ip,dso 2>/dev/null >"$WORK/samples-$s.txt"
done

nm -n --defined-only "$GANTRY" >"$WORK/nm.txt"
python3 - "$WORK" "$GANTRY" "$SAMPLINGS" >cli/start-path.order.new <<'EOF'
import bisect, os, sys
work, gantry, samplings = sys.argv[1], os.path.realpath(sys.argv[2]), int(sys.argv[3])
# Function symbols of the text, by address.
addrs, names = [], []
for line in open(os.path.join(work, "nm.txt")):
    parts = line.split()
    if len(parts) == 3 and parts[1] in "tTwW":
        addrs.append(int(parts[0], 16))
        names.append(parts[2])
hot = set()
for s in range(1, samplings + 1):
    for line in open(os.path.join(work, f"samples-{s}.txt")):
        parts = line.split()
        if len(parts) != 2 or os.path.realpath(parts[1].strip("()")) != gantry:
            continue
        i = bisect.bisect_right(addrs, int(parts[0], 16)) - 1
        if i >= 0:
            hot.add(i)
print("# The start path's hot functions, in the order of a link without this file:")
print("# placed first in gantry's text (lld --symbol-ordering-file; see cli/build.rs")
print("# for why and how to regenerate).")
seen = set()
for i in sorted(hot):
    if names[i] not in seen:
        seen.add(names[i])
        print(names[i])
EOF
mv cli/start-path.order.new cli/start-path.order
echo "cli/start-path.order: $(grep -vc '^#' cli/start-path.order) functions; rebuilding gantry with it" >&2
cargo build --release --bin gantry >&2
