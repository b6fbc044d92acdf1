# python:3.11-slim-compatible, from Debian bookworm's packages (deploy/base-images.sh builds and tags it).
# Like the official image: `python`, `python3`, `pip` on PATH and usable as root (no PEP 668 marker), venv,
# LANG=C.UTF-8, CMD python3. Unlike it: Debian's Python 3.11.2 in /usr/bin, and the host's CA bundle.
ARG ROOTFS=xrayfm-offline/debian:bookworm
FROM ${ROOTFS}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3.11 python3.11-venv python3-pip python-is-python3 ca-certificates tzdata netbase \
 && cp /etc/ssl/host-ca-bundle.crt /etc/ssl/certs/ca-certificates.crt \
 && rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED \
 && ln -sf /usr/bin/pip3 /usr/local/bin/pip \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log
ENV LANG=C.UTF-8 PIP_CERT=/etc/ssl/host-ca-bundle.crt
LABEL org.opencontainers.image.description="python:3.11-slim-compatible stand-in built from Debian packages (xrayfm deploy/base-images.sh)"
CMD ["python3"]
