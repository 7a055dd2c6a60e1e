"""The waking page in a real browser: Debian's headless Chromium driven by selenium.

A stopped site whose app needs ~2 s to listen: the browser first shows the
"Waking up" page, whose script long-polls /__wakeproxy/wait and reloads, and
then lands on the app's own page, with no reload by the test.

Needs the Debian packages `chromium` and `chromium-driver` (scripts/test
installs them); selenium must not download a browser or a driver.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from harness import wait_for

APP_TITLE = "Browser wake app"
APP_TEXT = "Hello from the woken app"


@pytest.fixture
def app_www(tmp_path) -> Path:
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text(
        f"<!doctype html><html><head><title>{APP_TITLE}</title></head>"
        f"<body><h1 id='app'>{APP_TEXT}</h1></body></html>\n")
    for d in (tmp_path, www):
        d.chmod(0o755)
    return www


def test_browser_sees_waking_page_then_the_app(backend_container, busybox_image, proxy, host, browser, app_www):
    h = host("w-browser")
    c = backend_container(
        "w-browser", image=busybox_image,
        command=["sh", "-c", "sleep 2; exec httpd -f -p 80 -h /www"],
        labels={"wakeproxy.host": h, "wakeproxy.port": "80"},
        volumes={str(app_www): {"bind": "/www", "mode": "ro"}})
    c.stop(timeout=1)
    c.reload()
    assert c.status == "exited"
    p = proxy()  # wake.strategy auto: a navigation gets the waking page
    url = f"http://{h}:{p.http_port}/"

    t0 = time.monotonic()
    browser.get(url)
    first_title = browser.title
    first_source = browser.page_source
    assert "Waking up" in first_title, (first_title, first_source[:2000])
    assert "Waking up" in browser.find_element("tag name", "h1").text

    def on_app():
        return APP_TEXT in browser.page_source and browser.title == APP_TITLE
    wait_for(on_app, 20, 0.1, f"the browser to land on the app (now at {browser.current_url!r}: "
                                f"{browser.title!r})")
    took = time.monotonic() - t0
    assert browser.current_url == url
    assert browser.find_element("id", "app").text == APP_TEXT
    log = p.log()
    assert f"wake {c.name}: starting" in log and f"wake {c.name}: ready (" in log, log
    print(f"browser on the app after {took:.2f}s;", *[ln for ln in log.splitlines() if "wake " in ln], sep="\n")


def test_the_status_page_in_a_browser_shows_a_sleeping_and_a_running_sandbox(
        backend_container, proxy, host, browser, tmp_path, run_id):
    """Headless Chromium loads the status listener's page (a phone-sized window too) and screenshots it."""
    up, down = host("st-up"), host("st-down")
    backend_container("st-up", labels={"wakeproxy.host": up})
    backend_container("st-down", start=False, labels={"wakeproxy.host": down})
    p = proxy()
    assert p.status_port is not None
    url = f"http://127.0.0.1:{p.status_port}/"

    def rows() -> dict[str, str]:
        browser.get(url)
        out = {}
        for tr in browser.find_elements("css selector", "tbody tr"):
            cells = tr.find_elements("css selector", "td")
            if len(cells) >= 2:
                out[cells[0].text.strip()] = cells[1].text.strip()
        return out

    seen = wait_for(lambda: (r := rows()).get(f"{run_id}-st-up") and r, 20, 0.5, "both sandboxes on the page")
    assert seen[f"{run_id}-st-up"] == "running" and seen[f"{run_id}-st-down"] == "asleep", seen
    assert "wakeproxy" in browser.title and down in browser.page_source
    wide = tmp_path / "status-wide.png"
    assert browser.save_screenshot(str(wide)) and wide.stat().st_size > 5000
    browser.set_window_size(390, 844)  # a phone
    browser.get(url)
    narrow = tmp_path / "status-phone.png"
    assert browser.save_screenshot(str(narrow)) and narrow.stat().st_size > 5000
    width = browser.execute_script("return document.documentElement.scrollWidth")
    assert width <= 400, f"the page is {width} px wide on a 390 px screen"
