# redis:7-compatible, from Debian bookworm's redis-server (7.0) (deploy/base-images.sh builds and tags it).
# Like the official image: `redis-server` and `redis-cli` on PATH, runs as the redis user in /data (a
# volume), port 6379, protected mode off unless the command line turns it on, no config file needed.
ARG ROOTFS=xrayfm-offline/debian:bookworm
FROM ${ROOTFS}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log \
 && mkdir -p /data && chown redis:redis /data
COPY redis-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
WORKDIR /data
VOLUME /data
USER redis
EXPOSE 6379
LABEL org.opencontainers.image.description="redis:7-compatible stand-in built from Debian packages (xrayfm deploy/base-images.sh)"
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server"]
