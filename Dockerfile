# The wakeproxy container image.
#
#   docker build -t wakeproxy .      anywhere with a registry: base python:3.13-slim-trixie, packages from PyPI
#   scripts/image                    here, without a registry: a Debian trixie base made with mmdebstrap
#                                    (--build-arg BASE=wakeproxy-base:trixie-…) and the wheels shipped in
#                                    the build context as .image-wheels/ (pip then never goes online)
#
#   docker run -d --name wakeproxy -p 80:80 -p 443:443 \
#       -v /var/run/docker.sock:/var/run/docker.sock -v wakeproxy-state:/var/lib/wakeproxy wakeproxy
#
# The supervisor runs as root (it needs the Docker socket and binds 80/443); its serving workers drop to
# the account `wakeproxy` (uid/gid 10001) themselves, so there is no USER here. The configuration is
# /etc/wakeproxy/wakeproxy.yaml (WAKEPROXY_CONFIG): mount your own over it, or set WAKEPROXY_* variables.
#
# Works with the legacy builder (no BuildKit features). Stages: `deps` holds the third-party packages (its
# layer changes only with deploy/image-requirements.txt, pyproject.toml or the wheels), `app` builds the
# project into a staging root, and the image takes just the venv and those files: no /src, no wheels,
# no pip cache, no compiler.
ARG BASE=python:3.13-slim-trixie

# --- deps: /opt/wakeproxy, a venv with the pinned third-party packages ---------------------------------
FROM ${BASE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
# `.image-wheel[s]` matches nothing in a plain checkout: then the folder is simply not copied (the other
# sources always exist, so the COPY itself never fails). A folder's contents land in /src/deps/ directly.
COPY pyproject.toml deploy/image-requirements.txt deploy/pyproject-requirements.py .image-wheel[s] /src/deps/
RUN set -eu; \
    cd /src/deps; \
    if ls ./*.whl >/dev/null 2>&1; then \
        echo "deps: from the wheels in the build context (offline)"; set -- --no-index --find-links /src/deps; \
    else \
        echo "deps: from PyPI"; set --; \
    fi; \
    python3.13 pyproject-requirements.py deps pyproject.toml > project-requirements.txt; \
    python3.13 -m venv /opt/wakeproxy; \
    /opt/wakeproxy/bin/pip install "$@" -c image-requirements.txt \
        -r image-requirements.txt -r project-requirements.txt; \
    /opt/wakeproxy/bin/pip check

# --- app: the project, built from the sources and installed into /staging (its files only) -------------
FROM deps AS app
COPY pyproject.toml README.md /src/
COPY addons /src/addons
RUN set -eu; \
    if ls /src/deps/*.whl >/dev/null 2>&1; then set -- --no-index --find-links /src/deps; else set --; fi; \
    /opt/wakeproxy/bin/pip install "$@" --no-deps --no-warn-script-location --root /staging /src

# --- the image ------------------------------------------------------------------------------------------
FROM ${BASE}
ENV PATH=/opt/wakeproxy/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    WAKEPROXY_CONFIG=/etc/wakeproxy/wakeproxy.yaml \
    WAKEPROXY_USER=wakeproxy
# The workers' account: a system account with no home and no login shell (SYS_*_MAX raised: 10001 is above
# the default system range). Without useradd (package passwd, absent from some minimal roots) by hand.
RUN set -eu; \
    nologin=/usr/sbin/nologin; [ -x "$nologin" ] || nologin=/bin/false; \
    if command -v useradd >/dev/null 2>&1; then \
        groupadd --system -K SYS_GID_MAX=10001 --gid 10001 wakeproxy; \
        useradd --system -K SYS_UID_MAX=10001 --no-log-init --uid 10001 --gid 10001 \
            --no-create-home --home-dir /nonexistent --shell "$nologin" --comment wakeproxy wakeproxy; \
    else \
        echo "wakeproxy:x:10001:" >> /etc/group; \
        echo "wakeproxy:x:10001:10001:wakeproxy:/nonexistent:$nologin" >> /etc/passwd; \
        if [ -f /etc/gshadow ]; then echo "wakeproxy:!::" >> /etc/gshadow; fi; \
        if [ -f /etc/shadow ]; then echo "wakeproxy:!:::::::" >> /etc/shadow; fi; \
    fi; \
    install -d -m 0755 /etc/wakeproxy /var/lib/wakeproxy
COPY --from=deps /opt/wakeproxy /opt/wakeproxy
COPY config/wakeproxy.yaml /etc/wakeproxy/wakeproxy.yaml
COPY --from=app /staging/ /
RUN PIP_DISABLE_PIP_VERSION_CHECK=1 pip check && wakeproxy --version
# Last, after every RUN: a build argument in scope is part of each RUN's cache key.
ARG REVISION=""
ARG SOURCE=""
LABEL org.opencontainers.image.title="wakeproxy" \
      org.opencontainers.image.description="Reverse proxy for Docker hosts: routes by Host from container labels, wakes sleeping sandboxes on request (mitmproxy addons)" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}"
VOLUME /var/lib/wakeproxy
EXPOSE 80 443
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["wakeproxy", "health"]
ENTRYPOINT ["wakeproxy"]
CMD []
