# prom/prometheus-compatible, from Debian bookworm's prometheus (2.42) (deploy/base-images.sh builds it).
# Like the official image: ENTRYPOINT /bin/prometheus with the same default flags, config at
# /etc/prometheus/prometheus.yml, data in /prometheus (a volume), user nobody, port 9090.
ARG ROOTFS=xrayfm-offline/debian:bookworm
FROM ${ROOTFS}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log \
 && find /usr/share/javascript/moment-timezone -mindepth 1 ! -name moment-timezone-with-data.min.js -exec rm -rf {} + \
 && mkdir -p /prometheus \
 && chown -R nobody:nogroup /prometheus /etc/prometheus
WORKDIR /prometheus
VOLUME /prometheus
USER nobody
EXPOSE 9090
LABEL org.opencontainers.image.description="prom/prometheus-compatible stand-in built from Debian packages (xrayfm deploy/base-images.sh)"
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
