"""wakeproxy: a reverse proxy for Docker sandboxes, built as mitmproxy addons."""

__version__ = "0.1.0"
