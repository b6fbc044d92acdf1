#!/bin/sh
# Orthanc's password from the file compose mounts (ORTHANC_PASSWORD_FILE), into the environment variable
# that /etc/xrayfm/orthanc.json names (${ORTHANC_PASSWORD}): never in the image or `docker inspect`.
set -e
if [ -n "${ORTHANC_PASSWORD_FILE:-}" ]; then
  [ -r "$ORTHANC_PASSWORD_FILE" ] || { echo "orthanc-entrypoint: $ORTHANC_PASSWORD_FILE is not readable" >&2; exit 1; }
  ORTHANC_PASSWORD=$(tr -d '\r\n' <"$ORTHANC_PASSWORD_FILE")
  export ORTHANC_PASSWORD
fi
[ -n "${ORTHANC_PASSWORD:-}" ] || { echo "orthanc-entrypoint: no ORTHANC_PASSWORD(_FILE): refusing to start without one" >&2; exit 1; }
exec "$@"
