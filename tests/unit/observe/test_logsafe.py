"""wakeproxy.logsafe: nothing a tenant writes can add a line to the log."""

from __future__ import annotations

import logging

from wakeproxy.observe.logsafe import escape, get_logger


def test_control_characters_are_escaped():
    assert escape("plain text") == "plain text"
    assert escape("a\nFORGED b") == "a\\nFORGED b"
    assert escape("x\r\x00\x1b[31m\u2028y") == "x\\r\\x00\\x1b[31m\\u2028y"


def test_a_logger_escapes_its_arguments(caplog):
    log = get_logger("wakeproxy.test_logsafe")
    with caplog.at_level(logging.INFO):
        log.info("container '%s' skipped", "x\nFORGED wake ready")
        value = "y\rz"
        log.info(f"label {value}")
    assert caplog.messages == ["container 'x\\nFORGED wake ready' skipped", "label y\\rz"]
    assert all("\n" not in m for m in caplog.messages)


def test_every_module_logger_of_the_package_escapes():
    import importlib
    import pkgutil

    import wakeproxy

    for mod in pkgutil.iter_modules(wakeproxy.__path__):
        if mod.name in ("wakeproxy", "__main__"):
            continue
        m = importlib.import_module(f"wakeproxy.{mod.name}")
        logger = getattr(m, "logger", None)
        if isinstance(logger, logging.Logger):
            assert any(type(f).__name__ == "_EscapeControl" for f in logger.filters), mod.name
