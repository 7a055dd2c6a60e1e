# shellcheck shell=bash
# Shared by scripts/test and scripts/bench: install the Debian packages that are missing.
#
# Usage:  source scripts/_apt.sh; ensure_apt_packages PKG…
# Nothing runs (not even `apt-get update`) when every package is installed already.

ensure_apt_packages() {
    local missing=() pkg status
    for pkg in "$@"; do
        # Capture first: `dpkg -s | grep -q` can die of SIGPIPE under pipefail.
        status="$(dpkg -s "$pkg" 2>/dev/null)" || status=""
        if [[ "$status" != *"Status: install ok installed"* ]]; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]})); then
        echo "[apt] installing Debian packages: ${missing[*]}" >&2
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    fi
}
