"""Swarm services behind the proxy, on a real single-node Swarm (issue 16).

The engine is made a Swarm manager only if it is in no swarm (`swarm init --advertise-addr
127.0.0.1`, listening on 127.0.0.1 only), and leaves it again at the end only then. The proxy runs
as its own image in a container on an attachable overlay made for this run, with its ports
published on 127.0.0.1: only it, inside the overlay's network namespace, ever contacts a task IP.
This process talks to 127.0.0.1 and the Docker socket only — conftest's route guard refuses
anything else (an overlay IP has no local route: a packet to it would leave the machine).

Services are made from the tests' FROM-scratch busybox image (the Python backend, the host's
Python mounted read-only), with `--init` so that a scale-down takes ~3 s rather than 13 s.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.types
import httpx
import pytest
import yaml
from container_harness import ProxyContainer, RecordedProxyContainer
from harness import OffMachineConnection, wait_for

NS = 1_000_000_000


@pytest.fixture(scope="module")
def swarm(docker_client) -> Iterator[None]:
    state = docker_client.info().get("Swarm") or {}
    created = False
    if state.get("LocalNodeState") == "inactive":
        docker_client.swarm.init(advertise_addr="127.0.0.1", listen_addr="127.0.0.1:2377")
        created = True
    elif not state.get("ControlAvailable"):
        pytest.skip("the engine is a Swarm worker: these tests need a manager (or no swarm)")
    try:
        yield
    finally:
        if created:
            docker_client.swarm.leave(force=True)


@pytest.fixture(scope="module")
def overlay(docker_client, run_id, swarm) -> Iterator[str]:
    name = f"{run_id}-ov"
    net = docker_client.networks.create(name, driver="overlay", attachable=True)
    yield name
    deadline = time.monotonic() + 30
    while True:
        try:
            net.remove()
            break
        except docker.errors.NotFound:
            break
        except docker.errors.APIError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)  # the last tasks' endpoints go a moment after their services


class Services:
    """Services named `<run_id>-<name>`, removed at the end (also when a test fails)."""

    def __init__(self, client: Any, run_id: str, overlay: str, pyback: Any) -> None:
        self.client, self.run_id, self.overlay, self.pyback = client, run_id, overlay, pyback
        self.made: list[Any] = []

    def create(self, name: str, labels: dict[str, str], replicas: int = 0, env: dict[str, str] | None = None,
               healthcheck: docker.types.Healthcheck | None = None, command: list[str] | None = None,
               mounts: tuple[str, ...] = (), **kw: Any) -> Any:
        environment = {"PORT": "8080", "BACKEND_NAME": "", **(env or {})}
        service = self.client.services.create(
            self.pyback.image, command or self.pyback.command(), name=f"{self.run_id}-{name}", labels=labels,
            env=[f"{k}={v}" for k, v in environment.items()], networks=[self.overlay],
            mode=docker.types.ServiceMode("replicated", replicas), init=True,
            mounts=[*(f"{d}:{d}:ro" for d in self.pyback.mounts), *mounts], healthcheck=healthcheck,
            restart_policy=docker.types.RestartPolicy(condition="any", delay=1 * NS), **kw)
        self.made.append(service)
        return service

    def replicas(self, service: Any) -> int:
        service.reload()
        return int(service.attrs["Spec"]["Mode"]["Replicated"]["Replicas"])

    def running(self, service: Any) -> int:
        return sum(1 for t in service.tasks(filters={"desired-state": "running"})
                   if t["Status"]["State"] == "running")

    def cleanup(self) -> None:
        for service in self.made:
            try:
                service.remove()
            except docker.errors.NotFound:
                pass


@pytest.fixture(scope="module")
def services(docker_client, run_id, overlay, pyback_image) -> Iterator[Services]:
    made = Services(docker_client, run_id, overlay, pyback_image)
    yield made
    made.cleanup()


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Iterator[Any]:
    """A relay in front of the Docker socket that records every request the proxy makes."""
    from test_docker_api_calls import RecordingDockerRelay

    folder = tmp_path_factory.mktemp("swsock")
    folder.chmod(0o755)
    relay = RecordingDockerRelay(str(folder / "docker.sock")).open()
    yield relay
    relay.close()


@pytest.fixture(scope="module")
def swarm_proxy(docker_client, image, run_id, overlay, tmp_path_factory, recording) -> Iterator[ProxyContainer]:
    config = {
        "docker": {"networks": [], "swarm_resync": "2s"},
        "wake": {"timeout": "60s", "per_client": 0},
        "idle": {"timeout": "10m"},
        "shutdown": {"drain": "5s"},
    }
    proxy = RecordedProxyContainer(docker_client, image, f"{run_id}-swarm-proxy", "bridge",
                                   tmp_path_factory.mktemp("swp"), config, network=overlay,
                                   socket_path=recording.path)
    try:
        proxy.start()
        yield proxy
    finally:
        print(proxy.log()[-20000:])
        proxy.remove()


def backend_of(response: httpx.Response) -> str:
    return str(response.json()["backend"])


def test_this_process_cannot_reach_a_task_ip(services, swarm_proxy, host) -> None:
    """The guard is in force here: a task's overlay IP is refused before a packet is sent."""
    h = host("guard")
    svc = services.create("guard", {"wakeproxy.host": h, "wakeproxy.port": "8080"}, replicas=1)
    wait_for(lambda: services.running(svc) == 1, 30, 0.2, "a running task")
    task = next(t for t in svc.tasks(filters={"desired-state": "running"}) if t["Status"]["State"] == "running")
    ip = next(a["Addresses"][0].split("/")[0] for a in task["NetworksAttachments"]
              if a["Network"]["Spec"]["Name"] == services.overlay)
    with pytest.raises(httpx.ConnectError, match="route guard"):
        httpx.get(f"http://{ip}:8080/", timeout=2, trust_env=False)
    with pytest.raises(OffMachineConnection):
        socket.create_connection((ip, 8080), timeout=2)
    assert swarm_proxy.get(h).status_code == 200  # the proxy, on the overlay, reaches it


def test_a_request_wakes_a_service_at_zero_and_gets_the_answer_with_its_host(services, swarm_proxy, host) -> None:
    h = host("wake")
    svc = services.create("wake", {"wakeproxy.host": h, "wakeproxy.port": "8080"})
    wait_for(lambda: f"{h}" in swarm_proxy.exec("wakeproxy", "status")[1], 15, 0.3, "the site in the status")
    assert services.replicas(svc) == 0
    t0 = time.monotonic()
    r = swarm_proxy.get(h, "/hello")
    elapsed = time.monotonic() - t0
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["path"] == "/hello"
    assert body["headers"]["host"] == h, body["headers"]
    assert services.replicas(svc) == 1
    print(f"woken and answered in {elapsed:.2f} s")


def test_fifty_concurrent_requests_scale_the_service_once(docker_client, services, swarm_proxy, host) -> None:
    h = host("fifty")
    svc = services.create("fifty", {"wakeproxy.host": h, "wakeproxy.port": "8080"})
    since = int(time.time()) - 1
    wait_for(lambda: h in swarm_proxy.exec("wakeproxy", "status")[1], 15, 0.3, "the site in the status")
    with ThreadPoolExecutor(max_workers=50) as pool:
        codes = list(pool.map(lambda _: swarm_proxy.get(h, timeout=60).status_code, range(50)))
    assert codes == [200] * 50
    until = int(time.time()) + 1
    events = docker_client.api.events(since=since, until=until, decode=True,
                                      filters={"type": ["service"], "event": ["update"]})
    scales = [e for e in events if (e.get("Actor") or {}).get("ID") == svc.id
              and (e["Actor"].get("Attributes") or {}).get("replicas.new")]
    assert len(scales) == 1, scales
    assert scales[0]["Actor"]["Attributes"]["replicas.old"] == "0"
    assert scales[0]["Actor"]["Attributes"]["replicas.new"] == "1"


def test_three_replicas_share_the_requests(services, swarm_proxy, host) -> None:
    h = host("three")
    svc = services.create("three", {"wakeproxy.host": h, "wakeproxy.port": "8080", "wakeproxy.replicas": "3"})
    wait_for(lambda: h in swarm_proxy.exec("wakeproxy", "status")[1], 15, 0.3, "the site in the status")
    first = swarm_proxy.get(h)
    assert first.status_code == 200
    assert services.replicas(svc) == 3
    assert services.running(svc) == 3  # ready means every task runs (and listens)
    seen = {backend_of(swarm_proxy.get(h)) for _ in range(12)}
    assert len(seen) == 3, seen


def test_an_app_that_listens_two_seconds_after_start_is_held_not_502(services, swarm_proxy, host) -> None:
    h = host("slow")
    services.create("slow", {"wakeproxy.host": h, "wakeproxy.port": "8080"}, env={"SLEEP_BEFORE_LISTEN": "2"})
    wait_for(lambda: h in swarm_proxy.exec("wakeproxy", "status")[1], 15, 0.3, "the site in the status")
    t0 = time.monotonic()
    r = swarm_proxy.get(h)
    assert r.status_code == 200, r.text
    assert time.monotonic() - t0 >= 2.0


def test_a_health_checked_service_is_ready_when_healthy(services, swarm_proxy, host) -> None:
    h = host("health")
    check = docker.types.Healthcheck(test=["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8080/"],
                                     interval=int(0.5 * NS), timeout=2 * NS, retries=20, start_period=0)
    services.create("health", {"wakeproxy.host": h, "wakeproxy.port": "8080"}, healthcheck=check,
                    env={"SLEEP_BEFORE_LISTEN": "1"})
    wait_for(lambda: h in swarm_proxy.exec("wakeproxy", "status")[1], 15, 0.3, "the site in the status")
    r = swarm_proxy.get(h)
    assert r.status_code == 200, r.text
    log = swarm_proxy.log()
    assert f"wake {services.run_id}-health: ready" in log, log[-3000:]


def test_a_task_that_fails_is_replaced_and_followed_not_reported_ready(services, swarm_proxy, host,
                                                                      tmp_path) -> None:
    """The first task exits at once; Swarm starts a new one (new container, new IP) after the restart
    delay. The wake follows it: the held request is answered by the replacement, never a 502."""
    h = host("flaky")
    flags = tmp_path / "flags"
    flags.mkdir()
    flags.chmod(0o777)
    python = " ".join(services.pyback.command())
    svc = services.create("flaky", {"wakeproxy.host": h, "wakeproxy.port": "8080"},
                          command=["/bin/sh", "-c", f"if [ ! -e /flags/failed ]; then touch /flags/failed; exit 3; fi; "
                                                    f"exec {python}"],
                          mounts=(f"{flags}:/flags:rw",))
    wait_for(lambda: h in swarm_proxy.exec("wakeproxy", "status")[1], 15, 0.3, "the site in the status")
    r = swarm_proxy.get(h, timeout=60)
    assert r.status_code == 200, r.text
    assert (flags / "failed").exists()
    states = [t["Status"]["State"] for t in svc.tasks()]
    assert "failed" in states and "running" in states, states


def test_idle_scales_to_zero_and_the_next_request_wakes_it_again(services, swarm_proxy, host) -> None:
    h = host("idle")
    svc = services.create("idle", {"wakeproxy.host": h, "wakeproxy.port": "8080", "wakeproxy.idle-timeout": "3s"})
    wait_for(lambda: h in swarm_proxy.exec("wakeproxy", "status")[1], 15, 0.3, "the site in the status")
    assert swarm_proxy.get(h).status_code == 200
    first = backend_of(swarm_proxy.get(h))
    wait_for(lambda: services.replicas(svc) == 0, 40, 0.5, "the idle scale-down to 0")
    wait_for(lambda: services.running(svc) == 0, 30, 0.5, "the task to stop")
    assert f"idle {services.run_id}-idle: no activity" in swarm_proxy.log()
    r = swarm_proxy.get(h)
    assert r.status_code == 200
    assert backend_of(r) != first  # a new task (a new container)
    assert services.replicas(svc) == 1


def test_a_stack_of_two_services_wakes_as_one_group(docker_client, services, swarm_proxy, host, pyback_image,
                                                   tmp_path) -> None:
    """A real `docker stack deploy` of a Compose file: labels under deploy:, the stack is the group."""
    h = host("stack")
    stack = f"{services.run_id}-st"
    mounts = [{"type": "bind", "source": d, "target": d, "read_only": True} for d in pyback_image.mounts]
    svc = {"image": pyback_image.image, "command": pyback_image.command(), "init": True,
           "environment": {"PORT": "8080", "BACKEND_NAME": ""}, "volumes": mounts,
           "networks": ["shared"]}
    compose = {
        "version": "3.8",
        "services": {
            "web": {**svc, "deploy": {"replicas": 0, "labels": {"wakeproxy.host": h, "wakeproxy.port": "8080"}}},
            "worker": {**svc, "deploy": {"replicas": 0}},
        },
        "networks": {"shared": {"external": True, "name": services.overlay}},
    }
    path = tmp_path / "stack.yml"
    path.write_text(yaml.safe_dump(compose))
    out = subprocess.run(["docker", "stack", "deploy", "--resolve-image", "never", "-c", str(path), stack],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    try:
        web = docker_client.services.get(f"{stack}_web")
        worker = docker_client.services.get(f"{stack}_worker")
        wait_for(lambda: h in swarm_proxy.exec("wakeproxy", "status")[1], 15, 0.3, "the site in the status")
        assert swarm_proxy.get(h).status_code == 200
        assert services.replicas(web) == 1 and services.replicas(worker) == 1
        assert services.running(worker) == 1
        assert f"wake {stack}: starting 2" in swarm_proxy.log()
    finally:
        subprocess.run(["docker", "stack", "rm", stack], capture_output=True, timeout=60)


def deploy_stack(name: str, pyback: Any, services_spec: dict[str, Any], networks: dict[str, Any],
                 tmp_path: Path) -> None:
    mounts = [{"type": "bind", "source": d, "target": d, "read_only": True} for d in pyback.mounts]
    base = {"image": pyback.image, "command": pyback.command(), "init": True,
            "environment": {"PORT": "8080", "BACKEND_NAME": ""}, "volumes": mounts}
    compose = {"version": "3.8", "services": {k: {**base, **v} for k, v in services_spec.items()},
               "networks": networks}
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(compose))
    out = subprocess.run(["docker", "stack", "deploy", "--resolve-image", "never", "-c", str(path), name],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def remove_stack(docker_client: Any, name: str) -> None:
    subprocess.run(["docker", "stack", "rm", name], capture_output=True, timeout=60)
    deadline = time.monotonic() + 30
    while docker_client.networks.list(names=[f"{name}_default"]) and time.monotonic() < deadline:
        time.sleep(0.5)


def test_a_stack_on_its_own_attachable_overlay_is_joined_while_it_runs_and_left_after(
        docker_client, services, swarm_proxy, host, pyback_image, tmp_path) -> None:
    """The isolated layout: each stack keeps its own (attachable) network, and the proxy's container joins
    it only while something of the stack runs, as it does for Compose projects' bridges."""
    h = host("own-net")
    stack = f"{services.run_id}-own"
    deploy_stack(stack, pyback_image, {
        "web": {"deploy": {"replicas": 0, "labels": {"wakeproxy.host": h, "wakeproxy.port": "8080",
                                                     "wakeproxy.idle-timeout": "3s"}}},
    }, {"default": {"driver": "overlay", "attachable": True}}, tmp_path)
    try:
        net = f"{stack}_default"
        web = docker_client.services.get(f"{stack}_web")
        wait_for(lambda: h in swarm_proxy.exec("wakeproxy", "status")[1], 15, 0.3, "the site in the status")
        assert net not in swarm_proxy.networks()  # asleep: not joined
        r = swarm_proxy.get(h)
        assert r.status_code == 200, r.text
        assert net in swarm_proxy.networks()
        assert services.replicas(web) == 1
        wait_for(lambda: services.replicas(web) == 0, 40, 0.5, "the idle scale-down")
        wait_for(lambda: net not in swarm_proxy.networks(), 30, 0.5, "the proxy leaving the stack's network")
        assert swarm_proxy.get(h).status_code == 200  # and once more: joined again
    finally:
        remove_stack(docker_client, stack)


def test_a_stack_whose_network_cannot_be_joined_says_why(docker_client, services, swarm_proxy, host, pyback_image,
                                                        tmp_path) -> None:
    h = host("closed-net")
    stack = f"{services.run_id}-closed"
    deploy_stack(stack, pyback_image, {
        "web": {"deploy": {"replicas": 0, "labels": {"wakeproxy.host": h, "wakeproxy.port": "8080"}}},
    }, {"default": {"driver": "overlay"}}, tmp_path)  # stack networks are not attachable by default
    try:
        r = wait_for(lambda: (a := swarm_proxy.get(h)).status_code != 404 and a, 15, 0.3, "the site")
        assert r.status_code in (502, 503), r.text
        assert "attachable" not in r.text  # an anonymous client learns nothing of the inside
        # From 127.0.0.1 in the proxy's container (a debug client). The reason comes with the network listing
        # that follows the stack's new network, a moment after the site itself: until then the page says
        # only that the proxy is on none of the service's networks.
        seen: list[tuple[int, str]] = []

        def reason() -> bool:
            seen.append(inside_get(swarm_proxy.container, h))
            return "not attachable" in seen[-1][1]
        wait_for(reason, 15, 0.5, "the reason on a debug client's page")
        assert seen[-1][0] in (502, 503), seen[-1]
        assert services.replicas(docker_client.services.get(f"{stack}_web")) == 0  # never woken for nothing
    finally:
        remove_stack(docker_client, stack)


def inside_get(container: Any, host: str, timeout: float = 60) -> tuple[int, str]:
    """GET http://127.0.0.1/ with `Host: host` from inside the proxy's own container (its loopback:
    a debug client); (status, body)."""
    client = ("import urllib.request,urllib.error,sys\n"
              f"req=urllib.request.Request('http://127.0.0.1/',headers={{'Host':'{host}'}})\n"
              "try:\n"
              f"    r=urllib.request.urlopen(req,timeout={timeout})\n"
              "except urllib.error.HTTPError as e:\n"
              "    r=e\n"
              "sys.stdout.write(str(r.status)+' '+r.read().decode())\n")
    code, answer = container.exec_run(["/opt/wakeproxy/bin/python", "-c", client])
    text = answer.decode(errors="replace")
    assert code == 0, text
    status, _, body = text.partition(" ")
    return int(status), body


def test_labels_updated_live_take_effect_and_a_removed_service_404s(services, swarm_proxy, host) -> None:
    old, new = host("live-old"), host("live-new")
    svc = services.create("live", {"wakeproxy.host": old, "wakeproxy.port": "8080"}, replicas=1)
    wait_for(lambda: swarm_proxy.get(old).status_code == 200, 30, 0.3, "the first host")
    assert swarm_proxy.get(new).status_code == 404
    out = subprocess.run(["docker", "service", "update", "--detach", "--label-add", f"wakeproxy.host={new}",
                          svc.name], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    wait_for(lambda: swarm_proxy.get(new).status_code == 200, 20, 0.3, "the new host")
    assert swarm_proxy.get(old).status_code == 404
    svc.remove()
    services.made.remove(svc)
    wait_for(lambda: swarm_proxy.get(new).status_code == 404, 20, 0.3, "the host gone with its service")


def test_container_labels_of_task_containers_are_ignored(services, swarm_proxy, host) -> None:
    """Only the service's own labels declare its sites: a task container's labels come and go with it."""
    h = host("tasklabel")
    svc = services.create("tasklabel", {}, replicas=1, container_labels={"wakeproxy.host": h,
                                                                         "wakeproxy.port": "8080"})
    wait_for(lambda: services.running(svc) == 1, 30, 0.2, "a running task")
    time.sleep(1.0)
    assert swarm_proxy.get(h).status_code == 404


def test_a_hostile_service_cannot_take_another_services_host_nor_ask_for_many_replicas(services, swarm_proxy,
                                                                                     host) -> None:
    h = host("victim")
    services.create("victim", {"wakeproxy.host": h, "wakeproxy.port": "8080"}, env={"BACKEND_NAME": "victim"})
    wait_for(lambda: h in swarm_proxy.exec("wakeproxy", "status")[1], 15, 0.3, "the victim's site")
    time.sleep(1.1)  # a later creation time
    attacker = services.create("attacker", {"wakeproxy.host": h, "wakeproxy.port": "8080",
                                            "wakeproxy.replicas": "100"}, env={"BACKEND_NAME": "attacker"})
    time.sleep(1.0)
    for _ in range(3):
        r = swarm_proxy.get(h)
        assert r.status_code == 200 and r.json()["backend"] == "victim"
    assert services.replicas(attacker) == 0
    status = swarm_proxy.exec("wakeproxy", "status")[1]
    assert "attacker" in status  # refused claims are listed


def test_the_proxy_restarted_with_services_at_zero_keeps_their_routes(services, swarm_proxy, host) -> None:
    h = host("restart")
    svc = services.create("restart", {"wakeproxy.host": h, "wakeproxy.port": "8080"})
    wait_for(lambda: h in swarm_proxy.exec("wakeproxy", "status")[1], 15, 0.3, "the site in the status")
    swarm_proxy.restart()
    assert services.replicas(svc) == 0
    r = swarm_proxy.get(h)
    assert r.status_code == 200, r.text
    assert services.replicas(svc) == 1


def test_on_a_swarm_the_proxy_calls_only_the_documented_endpoints(recording, swarm_proxy) -> None:
    """Everything the module's proxy asked the engine (waking, scaling down, events, restarts): within
    ALLOWED and SWARM_ALLOWED (the README's socket-proxy table), and every Swarm call was seen."""
    from test_docker_api_calls import ALLOWED, SWARM_ALLOWED, SWARM_ESSENTIAL

    assert not recording.errors, recording.errors
    seen = {c.endpoint for c in recording.snapshot()}
    outside = sorted(seen - set(ALLOWED) - set(SWARM_ALLOWED))
    assert not outside, f"calls outside the documented ones: {outside}"
    assert SWARM_ESSENTIAL <= seen, sorted(SWARM_ESSENTIAL - seen)
    updates = [c for c in recording.snapshot() if c.endpoint == "POST /services/{id}/update"]
    assert all(dict(c.query).get("version") for c in updates), updates  # every scale is version-checked


def test_the_proxy_deployed_as_a_swarm_service_from_deploy_stack_yaml(docker_client, services, image, host,
                                                                    tmp_path) -> None:
    """deploy/stack.yaml as shipped, with three changes for this machine: the image under test, no
    published ports (host mode would bind every address of this host), and the run's overlay as the
    `sandboxes` network. The client runs inside the proxy's own task container (127.0.0.1 there)."""
    from harness import READY_LINE, REPO

    stack = f"{services.run_id}-wp"
    spec = yaml.safe_load((REPO / "deploy" / "stack.yaml").read_text())
    proxy = spec["services"]["wakeproxy"]
    assert [p["mode"] for p in proxy["ports"]] == ["host", "host"]
    assert "node.role == manager" in proxy["deploy"]["placement"]["constraints"]
    proxy["image"] = image
    del proxy["ports"]
    spec["networks"]["sandboxes"] = {"external": True, "name": services.overlay}
    path = tmp_path / "stack.yaml"
    path.write_text(yaml.safe_dump(spec))
    h = host("as-service")
    app = services.create("as-service-app", {"wakeproxy.host": h, "wakeproxy.port": "8080"})
    out = subprocess.run(["docker", "stack", "deploy", "--resolve-image", "never", "-c", str(path), stack],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    try:
        def task_container() -> Any:
            found = docker_client.containers.list(filters={"label": f"com.docker.swarm.service.name={stack}_wakeproxy"})
            return found[0] if found else None

        container = wait_for(task_container, 60, 0.5, "the proxy's task container")
        wait_for(lambda: READY_LINE in container.logs().decode(errors="replace"), 60, 0.3, "the proxy ready")
        status, body = inside_get(container, h)
        assert status == 200, body + container.logs().decode(errors="replace")[-3000:]
        assert json.loads(body)["headers"]["host"] == h
        assert services.replicas(app) == 1
        logs = container.logs().decode(errors="replace")
        assert "the engine is a Swarm manager" in logs
    finally:
        subprocess.run(["docker", "stack", "rm", stack], capture_output=True, timeout=60)

        def volume_gone() -> bool:
            try:
                docker_client.volumes.get(f"{stack}_state").remove(force=True)
            except docker.errors.NotFound:
                return True
            except docker.errors.APIError:
                return False  # still in use by the stopping task
            return True

        wait_for(volume_gone, 40, 0.5, "the stack's state volume removed")
