# condo's container image. Build it with `scripts/build-image [TAG]` (default condo:dev), offline.
#
# The build context is a folder that holds `wheels/` and `haproxy/` (below): condo's wheel and its pinned
# dependencies, built on the host (`pip wheel -w CONTEXT/wheels .`), because nothing inside a build
# here reaches a package index. BASE is any Debian-like image with python3 (the wheels' minor
# version, 3.11) and its venv module; scripts/build-image makes condo-base:bookworm with
# debootstrap. Written for the legacy builder: no heredocs, no --mount.
#
# Registry credentials: mount a Docker config.json and point CONDO_DOCKER_CONFIG at it.
#
# Run it with the engine's socket and a spec directory mounted:
#   docker run -d --name condo -e CONDO_HOST=$(hostname) \
#     -v /var/run/docker.sock:/var/run/docker.sock -v /srv/condo:/var/lib/condo condo:dev
# Give CONDO_HOST a stable name: without one condo names itself after the container's hostname,
# which a new container does not share, so it would not adopt the workloads of the old one.
ARG BASE=condo-base:bookworm

# --- stage 1: a virtualenv in /opt/condo, installed from the wheels ----------------------------
FROM ${BASE} AS install
COPY wheels/ /wheels/
# edn_format writes its PLY parser tables (parsetab.py) into site-packages on its first parse;
# without them every parse rebuilds the tables, ~11x slower. Write them here, check they exist and
# compile them. pip and setuptools are removed afterwards: nothing installs at run time.
RUN python3 -m venv /opt/condo \
 && /opt/condo/bin/pip install --quiet --no-cache-dir --no-index --find-links /wheels \
      condo-supervisor \
 && /opt/condo/bin/python -c 'import edn_format; edn_format.loads("{:a 1}")' \
 && /opt/condo/bin/python -c 'import edn_format, pathlib; \
assert (pathlib.Path(edn_format.__file__).parent / "parsetab.py").is_file(), "no PLY tables"' \
 && /opt/condo/bin/python -m compileall -q /opt/condo/lib \
 && /opt/condo/bin/python -m pip uninstall --quiet --yes pip setuptools \
 && /opt/condo/bin/condo --version

# --- stage 2: the runtime, only /opt/condo on top of the base --------------------------------
FROM ${BASE}
COPY --from=install /opt/condo /opt/condo
# HAProxy and nft for `:proxy` (the host's Debian binaries and the libraries the base lacks,
# copied into the context by scripts/build-image): condo in a container runs HAProxy as a
# container of this image, and with host networking and CAP_NET_ADMIN writes its NAT table.
COPY haproxy/ /
RUN haproxy -v | head -n1 && nft --version

# PATH is spelled out rather than extended with $PATH: an imported base may have none set.
#
# The defaults of `condo run /var/lib/condo --state /var/lib/condo/state.json --server 0.0.0.0:80`
# are environment variables, not CMD arguments, because a command-line option beats its
# CONDO_<OPTION> variable: with `--server` in CMD, `-e CONDO_SERVER=...` would be ignored. So every
# option, these two included, stays settable with `docker run -e CONDO_<OPTION>=...`.
ENV PATH=/opt/condo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    CONDO_STATE=/var/lib/condo/state.json \
    CONDO_SERVER=0.0.0.0:80

# The spec files (*.edn) and the state file.
VOLUME /var/lib/condo
EXPOSE 80

# GET /healthz on the address CONDO_SERVER names (0.0.0.0 and :: are probed on loopback; a bare
# PORT means 127.0.0.1, as in `condo run`). python3, because the base has no curl or wget. With
# CONDO_SERVER=off there is no API to ask: the check passes (use --no-healthcheck to drop it).
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request as u; s = os.environ.get('CONDO_SERVER', '0.0.0.0:80').strip(); h, _, p = s.rpartition(':'); h = h.strip('[]'); h = {'': '127.0.0.1', '0.0.0.0': '127.0.0.1', '::': '::1'}.get(h, h); s.lower() in ('off', 'none', '') or u.urlopen('http://%s:%s/healthz' % ('[%s]' % h if ':' in h else h, p), timeout=2)"]

ENTRYPOINT ["condo"]
CMD ["run", "/var/lib/condo"]

ARG VERSION=unknown
ARG REVISION=unknown
LABEL org.opencontainers.image.title="condo" \
      org.opencontainers.image.description="A simple, idempotent supervisor for Docker containers, on Trio." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="EPL-1.0"
