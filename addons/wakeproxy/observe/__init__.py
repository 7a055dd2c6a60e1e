"""Seeing what the proxy does: log lines that nothing outside can forge (`logsafe`) and the
read-only status endpoint behind `wakeproxy status` (`status`)."""
