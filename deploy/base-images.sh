#!/usr/bin/env bash
# Offline base images for hosts that cannot reach an image registry (make base-images; docs/ops.md).
#
# Builds, from Debian bookworm's packages only (debootstrap --variant=minbase, then `docker import`):
#   xrayfm-offline/debian:bookworm     the bare rootfs (host CA bundle, apt and pip configuration inside)
#   xrayfm-offline/python:3.11-slim    python:3.11-slim-compatible (Debian's Python 3.11, pip, venv)
#   xrayfm-offline/redis:7             redis:7-compatible (redis-server, redis-cli, protected mode off, /data)
#   xrayfm-offline/prometheus:latest   prom/prometheus-compatible (entrypoint, flags, user and paths)
# The packages come from the Debian mirror apt uses on this host (DEBIAN_MIRROR overrides it). The host's
# CA bundle (PIP_CERT, else the system bundle) is copied in, PIP_CERT points at it inside the images, and
# the host's pip index settings are kept when they are http(s) URLs. Re-running rebuilds only what changed:
# the rootfs is reused while it is younger than BASE_MAX_AGE_DAYS (7) unless FORCE=1.
set -euo pipefail
cd "$(dirname "$0")/.."

SUITE=bookworm
TAG_ROOTFS=xrayfm-offline/debian:$SUITE
TAG_PYTHON=xrayfm-offline/python:3.11-slim
TAG_REDIS=xrayfm-offline/redis:7
TAG_PROMETHEUS=xrayfm-offline/prometheus:latest
WORK=${BASE_WORK_DIR:-build/base-images}
CA_BUNDLE=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
say() { printf '[base-images] %s\n' "$*" >&2; }

command -v docker >/dev/null || { say "docker is missing (apt-get install docker.io)"; exit 2; }
docker info >/dev/null 2>&1 || { say "no Docker engine answers (start dockerd)"; exit 2; }

mirror() {  # the Debian mirror apt uses for $SUITE here: deb822 sources first, then sources.list
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk -v suite="$SUITE" '
      /^[[:space:]]*$/ { if (uri && ok) { print uri; exit } uri=""; ok=0; next }
      /^URIs:/ { uri=$2 } /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) ok=1 }
      END { if (uri && ok) print uri }' "$f" | head -1
  done | grep . | head -1 && return
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk -v suite="$SUITE" '$1 == "deb" && $0 ~ " " suite " " { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' "$f"
  done | grep . | head -1 && return
  echo http://deb.debian.org/debian
}

build_rootfs() {
  local rootfs=$WORK/rootfs mirror
  mirror=$(mirror)
  command -v debootstrap >/dev/null || { say "debootstrap is missing (apt-get install debootstrap)"; exit 2; }
  say "debootstrap --variant=minbase $SUITE from $mirror"
  if [ ! -f "$WORK/rootfs.done" ]; then  # a finished debootstrap is kept until the import succeeds
    rm -rf "$rootfs" && mkdir -p "$rootfs"
    debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
      || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
    touch "$WORK/rootfs.done"
  fi
  # apt sources: the mirror above for the suite and its updates; security from the host's sources when given.
  local security
  security=$( (sed -nE 's|^URIs:[[:space:]]*(https?://[^ ]*debian-security[^ ]*).*|\1|p' /etc/apt/sources.list.d/*.sources
    sed -nE 's|^deb[[:space:]]+(https?://[^ ]*debian-security[^ ]*).*|\1|p' /etc/apt/sources.list) 2>/dev/null | head -1 || true)
  {
    printf 'Types: deb\nURIs: %s\nSuites: %s %s-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$mirror" "$SUITE" "$SUITE"
    if [ -n "$security" ]; then
      printf '\nTypes: deb\nURIs: %s\nSuites: %s-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$security" "$SUITE"
    fi
  } >"$rootfs/etc/apt/sources.list.d/debian.sources"
  rm -f "$rootfs/etc/apt/sources.list"
  # The host's apt proxy settings, if any.
  for f in /etc/apt/apt.conf.d/*; do
    if grep -qis 'Acquire::.*proxy' "$f" 2>/dev/null; then cp "$f" "$rootfs/etc/apt/apt.conf.d/"; fi
  done
  # Small like Debian's own slim images: no docs, man pages or locales from later installs; no apt caches.
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/xrayfm-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
CFG
  printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' >"$rootfs/etc/apt/apt.conf.d/90xrayfm-no-recommends"
  printf 'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };\n' >"$rootfs/etc/apt/apt.conf.d/90xrayfm-clean"
  rm -rf "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
    "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* "$rootfs"/tmp/*
  find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  # The host's CA bundle (a TLS-inspecting proxy's CA included), where PIP_CERT will point inside the images.
  if [ -r "$CA_BUNDLE" ]; then
    cp "$CA_BUNDLE" "$rootfs/etc/ssl/host-ca-bundle.crt"
  else
    cp "$rootfs/etc/ssl/certs/ca-certificates.crt" "$rootfs/etc/ssl/host-ca-bundle.crt"
  fi
  cp "$rootfs/etc/ssl/host-ca-bundle.crt" "$rootfs/etc/ssl/certs/ca-certificates.crt"
  # pip: the bundle, plus the host's index settings when they are URLs a container can reach (not file://).
  {
    printf '[global]\ncert = /etc/ssl/host-ca-bundle.crt\n'
    if command -v pip >/dev/null || command -v pip3 >/dev/null; then
      "$(command -v pip || command -v pip3)" config list 2>/dev/null | sed -nE "s/^(global|install)\.(index-url|extra-index-url|trusted-host|timeout|default-timeout|retries)='(.*)'$/\2 \3/p" |
        while read -r key value; do
          kept=$(printf '%s\n' $value | grep -E '^https?://' | tr '\n' ' ' || true)
          if [ "$key" = trusted-host ] || [[ "$key" == *timeout || "$key" == retries ]]; then kept=$value; fi
          if [ -n "$kept" ]; then printf '%s = %s\n' "$key" "$kept"; fi
        done || true
    fi
  } >"$rootfs/etc/pip.conf"
  say "importing the rootfs as $TAG_ROOTFS ($(du -sh "$rootfs" | cut -f1))"
  tar -C "$rootfs" --numeric-owner -c . | docker import \
    --change 'ENV PIP_CERT=/etc/ssl/host-ca-bundle.crt LANG=C.UTF-8' \
    --change 'LABEL org.opencontainers.image.description="Debian bookworm minbase from the host mirror (xrayfm deploy/base-images.sh)"' \
    --change 'CMD ["bash"]' - "$TAG_ROOTFS" >/dev/null
  rm -rf "$rootfs" "$WORK/rootfs.done"
}

mkdir -p "$WORK"
created=$(docker image inspect -f '{{.Created}}' "$TAG_ROOTFS" 2>/dev/null || true)
if [ "${FORCE:-0}" = 1 ] || [ -z "$created" ] ||
  [ $(($(date +%s) - $(date -d "$created" +%s))) -gt $((${BASE_MAX_AGE_DAYS:-7} * 86400)) ]; then
  build_rootfs
else
  say "reusing $TAG_ROOTFS (created $created; FORCE=1 rebuilds it)"
fi

for name in python redis prometheus; do
  case $name in python) tag=$TAG_PYTHON ;; redis) tag=$TAG_REDIS ;; prometheus) tag=$TAG_PROMETHEUS ;; esac
  say "building $tag"
  docker build -q --build-arg ROOTFS="$TAG_ROOTFS" -t "$tag" -f "deploy/base/$name.Dockerfile" deploy/base >/dev/null
done
docker images --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' | grep '^xrayfm-offline/' >&2
