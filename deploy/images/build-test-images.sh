#!/usr/bin/env bash
# Builds Gantry's test images from Debian's busybox-static, offline and
# byte-for-byte reproducibly (sorted tar entries, mtime 0, uid/gid 0, gzip -n).
#
# Usage: deploy/images/build-test-images.sh OUTDIR
#
# Writes, for each image NAME in {busybox, web}:
#   OUTDIR/NAME/       an OCI image layout (oci-layout, index.json, blobs/sha256/…)
#   OUTDIR/NAME.tar    the same layout as an OCI archive (what `skopeo copy oci-archive:` reads)
# The index names each image twice, as containerd and BuildKit exports do:
#   io.containerd.image.name          = the full reference, e.g. gantry.test/busybox:latest
#   org.opencontainers.image.ref.name = the tag, latest (so `skopeo inspect oci:OUTDIR/NAME:latest` works)
#
# gantry.test/busybox:latest — one layer:
#   /bin/busybox (the static binary from busybox-static) and a symlink to it
#   for every applet at the path busybox itself reports (`busybox --list-full`);
#   /etc/passwd and /etc/group with root (0), nobody (65534) and user (1000);
#   /etc/hostname, /etc/hosts, /etc/resolv.conf placeholders the runtime may bind over;
#   /tmp (1777), /root (0700), /home/user, and empty /proc /sys /dev /run /var mount points.
#   Config: Cmd ["sh"], Env PATH, WorkingDir /.
#
# gantry.test/web:latest — the busybox layer plus one layer:
#   /www/cgi-bin/index.cgi, served for `/`, answers `hostname=<hostname> ip=<ip,ip,…>`
#   (the container's global IPv4 addresses, `none` without any), so load-balancing
#   tests can tell which replica answered; /www/health answers `ok`.
#   Config: Cmd ["httpd", "-f", "-v", "-p", "80", "-h", "/www"], ExposedPorts 80/tcp,
#   and a label gantry.healthcheck naming a Docker-style HEALTHCHECK test.
#
# The output is checked with `skopeo inspect` when skopeo is installed.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi

export LC_ALL=C
export TZ=UTC
umask 022

OUT=$(realpath -m "$1")
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# Any static busybox will do (BUSYBOX=path to choose one); Debian's
# busybox-static is installed when there is none.
BUSYBOX=${BUSYBOX:-/bin/busybox}
if ! { [[ -x $BUSYBOX ]] && ! ldd "$BUSYBOX" >/dev/null 2>&1; }; then
    echo "installing busybox-static" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends busybox-static >&2
    BUSYBOX=/bin/busybox
fi
[[ -x $BUSYBOX ]] || { echo "$BUSYBOX is missing after installing busybox-static" >&2; exit 1; }

ARCH=$(dpkg --print-architecture)
EPOCH=1970-01-01T00:00:00Z
PATH_ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# Deterministic tar of a directory's contents: explicit sorted entry list
# (names without a leading ./, as Docker's layers have), fixed mtime and owner.
det_tar() { # SRC_DIR OUT_TAR
    local src=$1 out=$2
    (cd "$src" && find . -mindepth 1 -printf '%P\n' | sort) >"$WORK/list"
    tar --create --file="$out" --directory="$src" --no-recursion --files-from="$WORK/list" \
        --format=gnu --mtime=@0 --owner=0 --group=0 --numeric-owner
}

sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }

# Stores FILE as a blob of LAYOUT and prints its digest (sha256:…).
put_blob() { # LAYOUT FILE
    local layout=$1 file=$2 digest
    digest=$(sha "$file")
    mkdir -p "$layout/blobs/sha256"
    cp "$file" "$layout/blobs/sha256/$digest"
    echo "sha256:$digest"
}

# Packs DIR as a gzip layer: writes WORK/NAME.tar(.gz), prints "DIFF_ID DIGEST SIZE".
make_layer() { # DIR NAME
    local dir=$1 name=$2
    det_tar "$dir" "$WORK/$name.tar"
    gzip -n -9 -c "$WORK/$name.tar" >"$WORK/$name.tar.gz"
    echo "sha256:$(sha "$WORK/$name.tar") sha256:$(sha "$WORK/$name.tar.gz") $(size "$WORK/$name.tar.gz")"
}

# ---- busybox layer ----
ROOT=$WORK/busybox-root
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,etc,root,home/user,tmp,proc,sys,dev,run,var/tmp,var/log}
cp "$BUSYBOX" "$ROOT/bin/busybox"
chmod 0755 "$ROOT/bin/busybox"
while read -r applet; do
    [[ $applet == bin/busybox ]] && continue
    mkdir -p "$ROOT/$(dirname "$applet")"
    ln -sfn /bin/busybox "$ROOT/$applet"
done < <("$BUSYBOX" --list-full | sort)
cat >"$ROOT/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
user:x:1000:1000:user:/home/user:/bin/sh
EOF
cat >"$ROOT/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
user:x:1000:
EOF
echo localhost >"$ROOT/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$ROOT/etc/hosts"
: >"$ROOT/etc/resolv.conf"
chmod 0644 "$ROOT"/etc/*
chmod 1777 "$ROOT/tmp" "$ROOT/var/tmp"
chmod 0700 "$ROOT/root"

read -r BB_DIFF BB_DIGEST BB_SIZE < <(make_layer "$ROOT" busybox-layer)

# ---- web layer ----
WEB=$WORK/web-root
mkdir -p "$WEB/www/cgi-bin"
cat >"$WEB/www/cgi-bin/index.cgi" <<'EOF'
#!/bin/sh
# Says which container answered: its hostname and global IPv4 addresses.
ips=$(ip -o -4 addr show scope global 2>/dev/null | awk '{ split($4, a, "/"); printf "%s%s", sep, a[1]; sep = "," }')
printf 'Content-Type: text/plain\r\n\r\n'
printf 'hostname=%s ip=%s\n' "$(hostname)" "${ips:-none}"
EOF
chmod 0755 "$WEB/www/cgi-bin/index.cgi"
echo ok >"$WEB/www/health"
chmod 0644 "$WEB/www/health"

read -r WEB_DIFF WEB_DIGEST WEB_SIZE < <(make_layer "$WEB" web-layer)

# Writes an image layout OUT/NAME and OUT/NAME.tar.
# Layers are given as "DIFF_ID DIGEST SIZE FILE" lines on stdin; CONFIG_JSON is the
# image's `config` object; REF the full reference.
write_image() { # NAME REF CONFIG_JSON CREATED_BY...
    local name=$1 ref=$2 config=$3
    shift 3
    local layout=$WORK/layout-$name
    rm -rf "$layout"
    mkdir -p "$layout/blobs/sha256"
    local diff_ids='[]' layers='[]' history='[]' diff digest sz file
    for created_by in "$@"; do
        read -r diff digest sz file
        put_blob "$layout" "$file" >/dev/null
        diff_ids=$(jq -c --arg d "$diff" '. + [$d]' <<<"$diff_ids")
        layers=$(jq -c --arg d "$digest" --argjson s "$sz" \
            '. + [{mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: $d, size: $s}]' <<<"$layers")
        history=$(jq -c --arg c "$created_by" --arg t "$EPOCH" '. + [{created: $t, created_by: $c}]' <<<"$history")
    done
    jq -c -n --arg t "$EPOCH" --arg arch "$ARCH" --argjson config "$config" \
        --argjson diff_ids "$diff_ids" --argjson history "$history" \
        '{created: $t, architecture: $arch, os: "linux", config: $config,
          rootfs: {type: "layers", diff_ids: $diff_ids}, history: $history}' >"$WORK/$name-config.json"
    local config_digest
    config_digest=$(put_blob "$layout" "$WORK/$name-config.json")
    jq -c -n --arg cd "$config_digest" --argjson cs "$(size "$WORK/$name-config.json")" \
        --argjson layers "$layers" \
        '{schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
          config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $cd, size: $cs},
          layers: $layers}' >"$WORK/$name-manifest.json"
    local manifest_digest
    manifest_digest=$(put_blob "$layout" "$WORK/$name-manifest.json")
    jq -c -n --arg md "$manifest_digest" --argjson ms "$(size "$WORK/$name-manifest.json")" \
        --arg arch "$ARCH" --arg ref "$ref" --arg tag "${ref##*:}" \
        '{schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json",
          manifests: [{mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $md, size: $ms,
                       platform: {architecture: $arch, os: "linux"},
                       annotations: {"io.containerd.image.name": $ref,
                                     "org.opencontainers.image.ref.name": $tag}}]}' >"$layout/index.json"
    echo '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"
    chmod -R u=rwX,go=rX "$layout"
    det_tar "$layout" "$WORK/$name.tar"
    rm -rf "${OUT:?}/$name" "$OUT/$name.tar"
    cp -r "$layout" "$OUT/$name"
    cp "$WORK/$name.tar" "$OUT/$name.tar"
    echo "$ref: $OUT/$name ($manifest_digest)" >&2
}

BB_CONFIG=$(jq -c -n --arg path "$PATH_ENV" '{Env: [$path], Cmd: ["sh"], WorkingDir: "/"}')
write_image busybox gantry.test/busybox:latest "$BB_CONFIG" \
    "busybox-static $("$BUSYBOX" | head -1 | cut -d' ' -f2) with applet symlinks, /etc, /tmp" \
    <<<"$BB_DIFF $BB_DIGEST $BB_SIZE $WORK/busybox-layer.tar.gz"

WEB_CONFIG=$(jq -c -n --arg path "$PATH_ENV" '{
    Env: [$path],
    Cmd: ["httpd", "-f", "-v", "-p", "80", "-h", "/www"],
    WorkingDir: "/www",
    ExposedPorts: {"80/tcp": {}},
    StopSignal: "SIGTERM",
    Labels: {"gantry.healthcheck": "CMD-SHELL timeout 2 wget -q -O /dev/null http://127.0.0.1/health || exit 1"}
}')
write_image web gantry.test/web:latest "$WEB_CONFIG" \
    "busybox-static with applet symlinks, /etc, /tmp" \
    "httpd serving /www: cgi-bin/index.cgi reports hostname and ip" \
    <<<"$BB_DIFF $BB_DIGEST $BB_SIZE $WORK/busybox-layer.tar.gz
$WEB_DIFF $WEB_DIGEST $WEB_SIZE $WORK/web-layer.tar.gz"

if command -v skopeo >/dev/null; then
    for name in busybox web; do
        skopeo inspect --raw "oci:$OUT/$name:latest" >/dev/null
        skopeo inspect "oci-archive:$OUT/$name.tar:latest" | jq -e '.Layers | length > 0' >/dev/null
    done
    echo "validated with skopeo" >&2
fi
