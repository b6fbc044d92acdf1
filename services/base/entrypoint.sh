#!/bin/sh
# Entrypoint of the xrayfm service images. With XRAYFM_REDIS_PASSWORD_FILE naming a readable file (compose
# mounts the password its init step generated or took from .env), the password goes into the Redis URLs
# that have none (redis://host:port/db -> redis://:PASSWORD@host:port/db), so it never sits in the
# container's configuration (`docker inspect`). The password must be URL-safe (the generated one is hex).
set -e
if [ -n "${XRAYFM_REDIS_PASSWORD_FILE:-}" ]; then
  if [ ! -r "$XRAYFM_REDIS_PASSWORD_FILE" ]; then
    echo "xrayfm-entrypoint: XRAYFM_REDIS_PASSWORD_FILE=$XRAYFM_REDIS_PASSWORD_FILE is not readable" >&2
    exit 1
  fi
  password=$(tr -d '\r\n' <"$XRAYFM_REDIS_PASSWORD_FILE")
  for var in XRAYFM_REDIS_URL XRAYFM_TRAINING_REDIS_URL; do
    eval "url=\${$var:-}"
    case "$url" in
      redis://*@* | rediss://*@* | "") ;;
      redis://*) export "$var=redis://:$password@${url#redis://}" ;;
      rediss://*) export "$var=rediss://:$password@${url#rediss://}" ;;
    esac
  done
  unset password url
fi
exec "$@"
