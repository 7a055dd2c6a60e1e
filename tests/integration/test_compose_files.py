"""deploy/compose.yaml and deploy/compose.bridge.yaml run as a user runs them: the folder copied next to
the user's own wakeproxy.yaml, `docker compose up -d` (Compose v2, scripts/_compose.sh), and a sandbox
that is a real Compose project of its own (`docker compose up` / `down`).

What a test adds to the shipped file is kept to what cannot be shipped: the image under test (the same
recipe, tagged by scripts/image), and free ports (an override file for the bridge file's published
ports; the user's wakeproxy.yaml for the listeners with host networking). Everything is named after the
run (Compose's project name), so runs never collide.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from harness import READY_LINE, REPO, free_port, proxied, wait_for

MODES = {"host": "compose.yaml", "bridge": "compose.bridge.yaml"}


class Compose:
    """`docker compose` for one project: a folder, its files, a project name."""

    def __init__(self, folder: Path, project: str | None, files: tuple[str, ...]) -> None:
        """`project` None: the project name is the files' own (`name:`), as a plain `docker compose up`."""
        self.folder, self.project, self.files = folder, project, files

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        cmd = ["docker", "compose", "--project-directory", str(self.folder)]
        if self.project is not None:
            cmd += ["-p", self.project]
        for f in self.files:
            cmd += ["-f", str(self.folder / f)]
        out = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(cmd[2:])} {' '.join(args)} → {out.returncode}:\n"
                                 f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return out

    def container_id(self, service: str) -> str:
        ids = self.run("ps", "-q", "-a", service).stdout.split()
        assert len(ids) == 1, ids
        return ids[0]


def inspect(cid: str) -> dict:
    out = subprocess.run(["docker", "inspect", cid], capture_output=True, text=True, timeout=30, check=True)
    return json.loads(out.stdout)[0]


def sandbox_compose(folder: Path, image: str, host: str, body: str = "hello from compose", service: str = "web",
                    name: str | None = None) -> None:
    """A one-service Compose project: busybox's httpd behind a wakeproxy.host label (`name`: the file's own
    project name). Its shell stops on SIGTERM (a PID 1 without a handler would make `down` wait its 10 s)."""
    folder.mkdir(parents=True)
    spec: dict = {"services": {service: {
        "image": image,
        "command": ["sh", "-c", f"mkdir -p /www && echo {body} > /www/index.html && "
                    "trap 'exit 0' TERM; httpd -f -p 80 -h /www & wait"],
        "labels": {"wakeproxy.host": host, "wakeproxy.idle-timeout": "0"},
    }}}
    if name is not None:
        spec["name"] = name
    (folder / "compose.yaml").write_text(yaml.safe_dump(spec))


@pytest.fixture(params=list(MODES))
def shipped(request, tmp_path, image, run_id):
    """(mode, Compose of the proxy, http port): the deploy folder copied, up, and healthy."""
    mode = request.param
    folder = tmp_path / "deploy"
    shutil.copytree(REPO / "deploy", folder)
    http_port, https_port = free_port(), free_port()
    override = f"services:\n  wakeproxy:\n    image: {json.dumps(image)}\n"
    user_config = yaml.safe_load((folder / "wakeproxy.yaml").read_text()) or {}
    if mode == "host":
        # With host networking the listeners are the host's: the user's config moves them off 80/443
        # and the other loopback listeners off their defaults (another proxy of this run may hold them).
        user_config.update({
            "listen": {"http": f"127.0.0.1:{http_port}", "https": f"127.0.0.1:{https_port}"},
            "status": {"listen": f"127.0.0.1:{free_port()}"},
            "metrics": {"listen": f"127.0.0.1:{free_port()}"},
            "debug": {"listen": f"127.0.0.1:{free_port()}"},
        })
    else:
        # `!override` replaces the shipped list of published ports (a merge would keep 80:80 and 443:443).
        override += (f"    ports: !override\n"
                     f"      - \"127.0.0.1:{http_port}:80\"\n"
                     f"      - \"127.0.0.1:{https_port}:443\"\n"
                     f"networks:\n  proxy:\n    name: 0-{run_id}-proxy\n")
    (folder / "wakeproxy.yaml").write_text(yaml.safe_dump(user_config))
    (folder / "test.override.yaml").write_text(override)
    proxy = Compose(folder, f"{run_id}-dc-{mode}", (MODES[mode], "test.override.yaml"))
    failed = True
    try:
        proxy.run("up", "-d", "--no-build", timeout=180)
        wait_for(lambda: READY_LINE in proxy.run("logs", "wakeproxy").stdout, 60, 0.2, "the proxy ready")
        failed = False
        yield mode, proxy, http_port
    finally:
        if failed or request.session.testsfailed:
            logs = proxy.run("logs", "--no-color", check=False).stdout
            print(f"\n--- {proxy.project} logs ---\n{logs[-20000:]}", file=sys.stderr)
        proxy.run("down", "-v", "--timeout", "5", check=False, timeout=120)


def get(port: int, host: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}/", headers={"Host": host}, timeout=10)


def test_the_shipped_compose_files_run_the_proxy_for_a_compose_sandbox(shipped, tmp_path, busybox_image, run_id,
                                                                       host):
    mode, proxy, port = shipped
    cid = proxy.container_id("wakeproxy")
    state = inspect(cid)
    assert state["HostConfig"]["NetworkMode"] == ("host" if mode == "host" else f"0-{run_id}-proxy")
    start_networks = set(state["NetworkSettings"]["Networks"])

    # The image's HEALTHCHECK (`wakeproxy health`) turns healthy.
    wait_for(lambda: inspect(cid)["State"].get("Health", {}).get("Status") == "healthy", 60, 0.5,
             "the proxy container healthy")

    # A sandbox made the way users make them: a Compose project of its own, on its own network.
    name = host(f"dc-{mode}")
    app = Compose(tmp_path / "app", f"{run_id}-dcapp-{mode}", ("compose.yaml",))
    sandbox_compose(app.folder, busybox_image, name)
    try:
        app.run("up", "-d")
        r = wait_for(lambda: (resp := get(port, name)).status_code == 200 and resp, 20, 0.1, f"{name} routed")
        assert r.text.strip() == "hello from compose"
        app_net = f"{app.project}_default"
        if mode == "bridge":
            assert app_net in inspect(cid)["NetworkSettings"]["Networks"]
        else:
            assert set(inspect(cid)["NetworkSettings"]["Networks"]) == {"host"}

        # `docker compose exec … wakeproxy status` lists the sandbox's group and host.
        status = proxy.run("exec", "-T", "wakeproxy", "wakeproxy", "status").stdout
        assert app.project in status and name in status, status

        # `docker compose kill -s HUP`: the workers are replaced one by one, and the site keeps answering.
        proxy.run("kill", "-s", "HUP", "wakeproxy")
        deadline = time.monotonic() + 60
        codes = []
        while "wakeproxy: reload done" not in proxy.run("logs", "wakeproxy").stdout:
            assert time.monotonic() < deadline, "no 'reload done' within 60 s"
            codes.append(get(port, name).status_code)
            time.sleep(0.05)
        assert codes and set(codes) == {200}, codes

        # `docker compose down` of the sandbox succeeds: in bridge mode the proxy has left the network by
        # the time Compose removes it (a proxy still attached would make Compose fail: "active endpoints").
        app.run("down", "--timeout", "5")
    finally:
        app.run("down", "--timeout", "1", check=False)
    # Left the sandbox's network, kept the one it was started on (other sandboxes on a shared engine may
    # have had it join theirs meanwhile: only this run's are compared).
    now = {n for n in inspect(cid)["NetworkSettings"]["Networks"] if n.startswith(("host", "0-", run_id))}
    assert now == {n for n in start_networks if n.startswith(("host", "0-", run_id))}
    wait_for(lambda: get(port, name).status_code == 404, 10, 0.1, f"{name} gone")

    # `docker compose stop` ends the proxy cleanly within the shipped stop_grace_period (SIGTERM drains).
    t0 = time.monotonic()
    proxy.run("stop", "wakeproxy", timeout=60)
    took = time.monotonic() - t0
    after = inspect(cid)["State"]
    assert after["Status"] == "exited" and after["ExitCode"] == 0, after
    assert took < 20, took
    assert "Traceback" not in proxy.run("logs", "wakeproxy").stdout


def test_a_sandbox_whose_file_names_another_sandboxs_project_gets_none_of_its_traffic(proxy, tmp_path, busybox_image,
                                                                                    run_id, host):
    """The victim runs as `docker compose -p <run>-dcvictim`; the attacker's own compose file says
    `name: <run>-dcvictim` and is run with a plain `docker compose up` in its folder. Compose labels the
    attacker's container as the victim's project; it was merged into the victim's group and took half of
    its requests. Now it is skipped (made from another folder), and every request reaches the victim."""
    p = proxy({"docker": {"networks": []}})
    name = host("dcvictim")
    project = f"{run_id}-dcvictim"
    victim = Compose(tmp_path / "victim", project, ("compose.yaml",))
    attacker = Compose(tmp_path / "attacker", None, ("compose.yaml",))
    sandbox_compose(victim.folder, busybox_image, name, body="victim")
    sandbox_compose(attacker.folder, busybox_image, name, body="attacker", service="evil", name=project)
    try:
        victim.run("up", "-d")
        wait_for(lambda: proxied(p, name).text.strip() == "victim", 20, 0.1, f"{name} routed")
        attacker.run("up", "-d")
        evil = f"{project}-evil-1"
        wait_for(lambda: f"container '{evil}' skipped: its Compose project" in p.log(), 20, 0.1,
                 "the attacker's container skipped")
        bodies = {proxied(p, name).text.strip() for _ in range(20)}
        assert bodies == {"victim"}, bodies
    finally:
        attacker.run("down", "--timeout", "1", check=False)
        victim.run("down", "--timeout", "1", check=False)
