#!/usr/bin/env bash
# make images: build the stack's images from the working tree, one at a time, and print their sizes
# against the budgets (docs/ops.md). Exit status: 3 when the images were built but a budget is exceeded
# (or the workers do not share the torch layer); another non-zero status when a build failed.
#
#   base images   python:3.11-slim, redis:7-alpine, prom/prometheus:latest from the registry when it
#                 answers; else, or with OFFLINE=1, the stand-ins of deploy/base-images.sh (built when
#                 missing), also tagged under those names when the names are free, so that
#                 docker-compose.yml runs unchanged. XRAYFM_BASE_IMAGE overrides the Python base.
#   torch base    xrayfm/torch-base:<torch version>, from the wheelhouse (deploy/wheelhouse.sh); skipped,
#                 with no wheelhouse, when an image built from the same Dockerfile, pins and Python base exists.
#                 Building it needs about XRAYFM_BUILD_ROOM_GB (25) GB free under Docker's data folder (the
#                 wheelhouse sent as build context, then unpacked); the services alone about 5 GB. With less,
#                 the untagged images of earlier xrayfm builds are removed first, saying how much is free.
#   services      xrayfm/{gateway,frontend,inference,training,router}:${XRAYFM_TAG:-local}, the names compose
#                 uses (inference: the torch-free CPU worker, services/inference/Dockerfile.cpu), the torch
#                 inference worker of docker-compose.gpu.yml, xrayfm/inference-torch (services/inference/Dockerfile),
#                 and the PACS of the `pacs` profile, xrayfm/orthanc (Debian's Orthanc on the Python base).
#   cleanup       images of earlier builds that this one replaced or no longer uses (untagged, labelled
#                 xrayfm.stage or xrayfm.image, not in this run's build log build/images.log) are removed,
#                 so that repeated builds do not fill the disk; a container still using one keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
export DOCKER_CLI_HINTS=false
TAG=${XRAYFM_TAG:-local}
MB=1000000  # docker's unit in `docker images`
BUDGET_GATEWAY=400 BUDGET_FRONTEND=600 BUDGET_WORKER_EXTRA=600 BUDGET_ORTHANC=310 BUDGET_ROUTER=460
BUDGET_INFERENCE=500  # the torch-free CPU inference worker
say() { printf '[images] %s\n' "$*" >&2; }
exists() { docker image inspect "$1" >/dev/null 2>&1; }
label() { docker image inspect -f "{{index .Config.Labels \"$2\"}}" "$1" 2>/dev/null || true; }
standin() { [[ "$(label "$1" org.opencontainers.image.description)" == *"stand-in built from Debian"* ]]; }

docker info >/dev/null 2>&1 || { say "no Docker engine answers (docs/ops.md: start dockerd)"; exit 2; }

mkdir -p build
LOG=build/images.log  # every docker build of this run, in full: the image IDs it used decide the cleanup
: >"$LOG"
dbuild() {  # docker build ARGS..., its output appended to $LOG; on failure its tail is shown
  if ! docker build "$@" >>"$LOG" 2>&1; then
    tail -n 40 "$LOG" >&2
    say "docker build failed (the whole output: $LOG)"
    exit 1
  fi
}
stale() {  # dangling images of earlier xrayfm builds that this run's builds did not use
  { docker images -q --no-trunc --filter dangling=true --filter label=xrayfm.stage
    docker images -q --no-trunc --filter dangling=true --filter label=xrayfm.image; } | cut -d: -f2 | cut -c1-12 |
    sort -u | comm -23 - <(grep -oE '^ ---> [0-9a-f]{12}$' "$LOG" | cut -c7- | sort -u)
}
remove_stale() {  # removes stale images (children before parents, hence passes); prints how many went
  local removed=0 ids pass
  for pass in 1 2 3; do
    ids=$(stale)
    [ -n "$ids" ] || break
    for id in $ids; do docker rmi "$id" >/dev/null 2>&1 && removed=$((removed + 1)); done
  done
  echo "$removed"
}
# Room to build: with less free space under Docker's data folder than a build needs, the untagged images
# of earlier xrayfm builds go first. Not checked when that folder is on another host (DOCKER_HOST).
free_gb() { df -P -BG "$1" 2>/dev/null | awk 'NR == 2 { sub("G", "", $4); print $4 }'; }
make_room() {  # NEED_GB WHAT
  local root free
  root=$(docker info -f '{{.DockerRootDir}}' 2>/dev/null || true)
  free=$(free_gb "$root")
  if [ -n "$free" ] && [ "$free" -lt "$1" ]; then
    say "$free GB free under $root, $2 needs about $1 GB: removing the untagged images of earlier xrayfm builds"
    say "removed $(remove_stale) images; now $(free_gb "$root") GB free (\`docker system df\` shows what holds the rest)"
  fi
}

# 1. Base images: official ones when the registry answers, else the offline stand-ins.
OFFICIAL_PYTHON=python:3.11-slim OFFICIAL_REDIS=${XRAYFM_REDIS_IMAGE:-redis:7-alpine}
OFFICIAL_PROMETHEUS=${XRAYFM_PROMETHEUS_IMAGE:-prom/prometheus:latest}
offline=${OFFLINE:-0}
if [ "$offline" != 1 ]; then
  for image in "$OFFICIAL_PYTHON" "$OFFICIAL_REDIS" "$OFFICIAL_PROMETHEUS"; do
    if exists "$image" && ! standin "$image"; then continue; fi
    if exists "$image" && standin "$image"; then offline=1; break; fi
    say "pulling $image"
    if ! timeout "${PULL_TIMEOUT:-120}" docker pull -q "$image" >/dev/null 2>&1; then
      say "the registry does not answer for $image: using the offline base images (deploy/base-images.sh)"
      offline=1
      break
    fi
  done
fi
if [ "$offline" = 1 ]; then
  for pair in "xrayfm-offline/python:3.11-slim $OFFICIAL_PYTHON" "xrayfm-offline/redis:7 $OFFICIAL_REDIS" \
    "xrayfm-offline/prometheus:latest $OFFICIAL_PROMETHEUS"; do
    set -- $pair
    exists "$1" || deploy/base-images.sh
    if ! exists "$2" || standin "$2"; then
      docker tag "$1" "$2"
    else
      say "keeping the registry's $2 (not replaced by the stand-in $1)"
    fi
  done
fi
BASE_IMAGE=${XRAYFM_BASE_IMAGE:-$OFFICIAL_PYTHON}
say "Python base: $BASE_IMAGE$(standin "$BASE_IMAGE" && echo ' (offline stand-in)')"

# 2. The torch base. Up to date, with no wheelhouse needed, when an image exists built from this Dockerfile
# on this Python base with wheels at pins requirements/constraints.txt still holds (its xrayfm.pins label);
# else built from the wheelhouse (deploy/wheelhouse.sh).
CONSTRAINTS=requirements/constraints.txt
TORCH_VERSION=$(sed -nE 's/^torch==([^ ]+)$/\1/p' "$CONSTRAINTS")
TORCH_BASE=xrayfm/torch-base:$TORCH_VERSION
WHEELHOUSE=build/wheelhouse/torch
base_id=$(docker image inspect -f '{{.Id}}' "$BASE_IMAGE")
dockerfile_key=$(sha256sum <services/base/Dockerfile | cut -c1-16)
torch_base_current() {
  exists "$TORCH_BASE" && [ "$(label "$TORCH_BASE" xrayfm.base-id)" = "$base_id" ] &&
    [ "$(label "$TORCH_BASE" xrayfm.dockerfile)" = "$dockerfile_key" ] || return 1
  local pins pin
  pins=$(label "$TORCH_BASE" xrayfm.pins)
  [ -n "$pins" ] || return 1
  for pin in $pins; do grep -qxF "$pin" "$CONSTRAINTS" || return 1; done
}
timer=$SECONDS
if torch_base_current; then
  say "$TORCH_BASE is up to date (same Dockerfile and Python base, its pins still in $CONSTRAINTS)"
  make_room 5 "building the services"
else
  make_room "${XRAYFM_BUILD_ROOM_GB:-25}" "building the torch base"
  deploy/wheelhouse.sh
  say "building $TORCH_BASE from $WHEELHOUSE ($(du -sh "$WHEELHOUSE" | cut -f1) of wheels)"
  dbuild --build-arg BASE_IMAGE="$BASE_IMAGE" --label xrayfm.image=torch-base \
    --label xrayfm.dockerfile="$dockerfile_key" --label xrayfm.base-id="$base_id" \
    --label xrayfm.pins="$(tr '\n' ' ' <"$WHEELHOUSE/constraints.txt")" \
    -f services/base/Dockerfile -t "$TORCH_BASE" "$WHEELHOUSE"
  # Its build stage (the wheels and the unpacked venv, ~9 GB) is no cache worth keeping: a build with the
  # same pins is skipped above.
  docker image prune -f --filter 'label=xrayfm.stage=torch-base build' >/dev/null
fi
say "torch base: $((SECONDS - timer)) s"

# 3. The services, one at a time (the workers' shared dependency layer is built by the first, reused by the
# second), then the PACS (its build context is deploy/orthanc).
for build in gateway:gateway/Dockerfile frontend:frontend/Dockerfile router:router/Dockerfile \
  inference:inference/Dockerfile.cpu inference-torch:inference/Dockerfile training:training/Dockerfile; do
  image=${build%%:*} timer=$SECONDS
  dbuild --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg TORCH_BASE_IMAGE="$TORCH_BASE" \
    --label xrayfm.image="$image" -f "services/${build#*:}" -t "xrayfm/$image:$TAG" .
  say "xrayfm/$image:$TAG: $((SECONDS - timer)) s"
done
timer=$SECONDS
dbuild --build-arg BASE_IMAGE="$BASE_IMAGE" --label xrayfm.image=orthanc -f deploy/orthanc/Dockerfile \
  -t "xrayfm/orthanc:$TAG" deploy/orthanc
say "xrayfm/orthanc:$TAG: $((SECONDS - timer)) s"

# 4. Sizes against the budgets. A worker's own budget counts what it adds to the torch base image it
# shares with the other worker (the Python base + the torch layer): its dependencies and code.
size() { docker image inspect -f '{{.Size}}' "$1"; }
layers() { docker image inspect -f '{{range .RootFS.Layers}}{{println .}}{{end}}' "$1" | grep .; }
torch_layer=$(docker history --no-trunc --human=false --format '{{.Size}}\t{{.CreatedBy}}' "$TORCH_BASE" |
  awk -F'\t' '$2 ~ /COPY (--from=build \/opt\/venv|dir:[^ ]* in \/opt\/venv)/ { print $1; exit }')
torch_digest=$(layers "$TORCH_BASE" | tail -1)
base_size=$(size "$TORCH_BASE")
status=0
report() {  # name size budget note
  local verdict=ok
  if [ "$2" -gt "$3" ]; then verdict="OVER BUDGET"; status=3; fi
  printf '  %-26s %6d MB   budget %6d MB  %-11s %s\n' "$1" $(($2 / MB)) $(($3 / MB)) "$verdict" "${4:-}"
}
echo "image sizes (as docker images shows them, 1 MB = 10^6 bytes):"
report "xrayfm/gateway:$TAG" "$(size xrayfm/gateway:"$TAG")" $((BUDGET_GATEWAY * MB))
report "xrayfm/frontend:$TAG" "$(size xrayfm/frontend:"$TAG")" $((BUDGET_FRONTEND * MB))
report "xrayfm/router:$TAG" "$(size xrayfm/router:"$TAG")" $((BUDGET_ROUTER * MB)) "torch-free (pacs profile)"
report "xrayfm/inference:$TAG" "$(size xrayfm/inference:"$TAG")" $((BUDGET_INFERENCE * MB)) "torch-free (ONNX Runtime, CPU)"
report "xrayfm/orthanc:$TAG" "$(size xrayfm/orthanc:"$TAG")" $((BUDGET_ORTHANC * MB)) "Debian's Orthanc (pacs profile)"
for worker in inference-torch training; do
  worker_size=$(size xrayfm/$worker:"$TAG")
  report "xrayfm/$worker:$TAG" "$worker_size" $((base_size + BUDGET_WORKER_EXTRA * MB)) \
    "= torch base + $(((worker_size - base_size) / MB)) MB (torch layer alone + $(((worker_size - torch_layer) / MB)) MB)"
done
printf '  %-26s %6d MB   the Python base %d MB + the torch layer %d MB\n' "$TORCH_BASE" $((base_size / MB)) \
  $(((base_size - torch_layer) / MB)) $((torch_layer / MB))
shared=$(comm -12 <(layers xrayfm/inference-torch:"$TAG" | sort) <(layers xrayfm/training:"$TAG" | sort))
if grep -qx "$torch_digest" <<<"$shared"; then
  echo "  the workers share the torch layer ${torch_digest:7:12} and $(($(wc -l <<<"$shared") - 1)) other layers (stored once)"
else
  echo "  the workers do NOT share the torch layer"
  status=3
fi

# 5. Cleanup: images of earlier builds that this one replaced or did not use.
say "removed $(remove_stale) images of earlier builds that this one replaced or did not use"
exit $status
