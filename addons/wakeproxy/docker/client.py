"""The one way the proxy makes a Docker SDK client: the config's URL, else DOCKER_HOST or the default
socket. The timeout is the caller's: a `docker stop` waits for the container's stop timeout."""

from __future__ import annotations

import docker

from wakeproxy.config import DockerConfig

LISTING_TIMEOUT = 30.0  # the view's listing, inspects and event stream
OPERATION_TIMEOUT = 60.0  # start/stop/pause: a stop waits up to idle.stop_timeout inside the call


def connect(config: DockerConfig, timeout: float) -> docker.DockerClient:
    if config.url:
        return docker.DockerClient(base_url=config.url, timeout=timeout)
    return docker.from_env(timeout=timeout)
