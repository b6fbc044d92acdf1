#!/bin/sh
# Like the official image's entrypoint: options alone run redis-server; and protected mode is off by
# default (the official image compiles it so), placed first so that the command line can turn it on again.
set -e
case "$1" in -*) set -- redis-server "$@" ;; esac
if [ "$1" = redis-server ]; then
  shift
  case "$1" in
    *.conf) conf=$1; shift; set -- redis-server "$conf" --protected-mode no "$@" ;;
    *) set -- redis-server --protected-mode no "$@" ;;
  esac
fi
exec "$@"
