"""Self-checks of the test harness: the backends answer as the tests assume.

These talk to a container directly, only after `container_ip` confirmed the
address is routed via a Docker bridge these tests created.
"""

import hashlib

import httpx
import pytest
from harness import container_ip, pattern_sha256


def test_python_mounts_are_minimal(python_mounts):
    exe, mounts = python_mounts
    assert any(exe.startswith(m + "/") for m in mounts), (exe, mounts)
    assert "/" not in mounts


def test_pyback_direct(backend_container, test_network):
    c = backend_container("direct", env={"BACKEND_NAME": "direct-1"})
    ip = container_ip(c, test_network)
    with httpx.Client(base_url=f"http://{ip}", timeout=10) as client:
        r = client.get("/hello", headers={"X-Test": "1"})
        assert r.status_code == 200
        body = r.json()
        assert body["backend"] == "direct-1"
        assert body["path"] == "/hello"
        assert body["headers"]["x-test"] == "1"
        r = client.get("/download", params={"size": 300_000})
        assert len(r.content) == 300_000
        assert hashlib.sha256(r.content).hexdigest() == pattern_sha256(300_000)
        data = bytes(range(256)) * 1000
        r = client.post("/upload", content=data)
        assert r.json() == {"backend": "direct-1", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    logs = c.logs().decode()
    assert "REQ GET /hello" in logs


def test_busybox_httpd(backend_container, busybox_image, test_network):
    c = backend_container("bb", image=busybox_image,
                          command=["sh", "-c", "mkdir -p /www && echo hi-bb > /www/index.html && exec httpd -f -vv -p 80 -h /www"])
    ip = container_ip(c, test_network)
    from harness import wait_for
    r = wait_for(lambda: httpx.get(f"http://{ip}/", timeout=2), 5)
    assert r.text.strip() == "hi-bb"


def test_the_route_guard_refuses_addresses_that_would_leave_the_machine() -> None:
    """conftest installs the guard for the whole run. A UDP connect sends no packet: safe to try even if
    the guard were broken; TCP to an overlay-like address is refused before any SYN."""
    import socket

    from harness import OffMachineConnection, route_is_local

    assert route_is_local("127.0.0.1")[0]
    ok, route = route_is_local("198.51.100.7")  # TEST-NET-2: routed through the default gateway here
    assert not ok, route
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        with pytest.raises(OffMachineConnection):
            s.connect(("198.51.100.7", 9))
        s.connect(("127.0.0.1", 9))  # loopback is fine
