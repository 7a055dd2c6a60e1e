# The wakeproxy image plus the test extras that run inside it (pytest, hypothesis, httpx[http2],
# websockets: pyproject.toml's test extra less ruff, mypy, types-* and selenium), so the unit tests
# run on the image's mitmproxy and Python with the repository mounted:
#
#   scripts/image --test
#   docker run --rm -v "$PWD:/src:ro" -w /src -e PYTHONPATH=/src/addons \
#       wakeproxy:test python -m pytest -p no:cacheprovider tests/unit -q
#
# Or from a checkout, online:  docker build -f deploy/test.Dockerfile --build-arg IMAGE=wakeproxy .
# Offline, scripts/image ships the wheels that the image lacks as .image-wheels/ in the context.
ARG IMAGE=wakeproxy:latest
FROM ${IMAGE}
COPY pyproject.toml deploy/image-requirements.txt deploy/pyproject-requirements.py .image-wheel[s] /tmp/test-deps/
RUN set -eu; \
    cd /tmp/test-deps; \
    if ls ./*.whl >/dev/null 2>&1; then set -- --no-index --find-links /tmp/test-deps; else set --; fi; \
    python3.13 pyproject-requirements.py test pyproject.toml > test-requirements.txt; \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
        pip install --no-cache-dir "$@" -c image-requirements.txt -r test-requirements.txt; \
    PIP_DISABLE_PIP_VERSION_CHECK=1 pip check; \
    cd /; rm -rf /tmp/test-deps
WORKDIR /src
HEALTHCHECK NONE
# The image's WAKEPROXY_* settings are for the proxy, not for the tests (they would override the configs
# the tests write): every command runs without them.
ENTRYPOINT ["env", "-u", "WAKEPROXY_CONFIG", "-u", "WAKEPROXY_USER"]
CMD ["python", "-m", "pytest", "-p", "no:cacheprovider", "tests/unit", "-q"]
