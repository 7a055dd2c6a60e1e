# shellcheck shell=bash
# Shared by scripts/test: make sure `docker compose` (Compose v2, the CLI plugin) answers, so the tests
# can run deploy/compose*.yaml as shipped and make sandboxes the way users make them.
#
# Usage:  source scripts/_compose.sh; ensure_compose
#
# Nothing happens when `docker compose version` already works. Otherwise Debian trixie's docker-compose
# package (Compose v2; bookworm has only the retired v1, which rejects a top-level `name:`) is fetched
# with apt itself, using a sources list and package lists of its own under the cache folder: apt checks
# the archive's signature and the package's hash, and the machine's apt setup is not changed. Its one
# file, the plugin binary, is installed where every docker CLI looks for plugins.

COMPOSE_SUITE="${WAKEPROXY_COMPOSE_SUITE:-trixie}"
COMPOSE_MIRROR="${WAKEPROXY_COMPOSE_MIRROR:-http://deb.debian.org/debian}"
COMPOSE_PLUGIN_DIR=/usr/local/lib/docker/cli-plugins

ensure_compose() {
    if docker compose version >/dev/null 2>&1; then
        return 0
    fi
    local cache="${WAKEPROXY_CACHE:-/var/cache/wakeproxy}/compose-apt"
    local apt_opts=(-q -o "Dir::Etc::SourceList=$cache/sources.list" -o Dir::Etc::SourceParts=/nonexistent
                    -o "Dir::State::Lists=$cache/lists" -o "Dir::Cache=$cache/cache"
                    -o APT::Sandbox::User=root)
    echo "[compose] installing Compose v2 from Debian $COMPOSE_SUITE's docker-compose package" >&2
    mkdir -p "$cache/lists/partial" "$cache/cache/archives/partial" "$cache/pkg"
    echo "deb $COMPOSE_MIRROR $COMPOSE_SUITE main" > "$cache/sources.list"
    apt-get "${apt_opts[@]}" update >&2
    rm -f "$cache/pkg/"*.deb
    (cd "$cache/pkg" && apt-get "${apt_opts[@]}" download docker-compose >&2)
    local deb
    deb="$(ls "$cache/pkg/"docker-compose_*.deb)"
    rm -rf "$cache/pkg/root"
    dpkg-deb -x "$deb" "$cache/pkg/root"
    install -D -m 0755 "$cache/pkg/root/usr/libexec/docker/cli-plugins/docker-compose" \
        "$COMPOSE_PLUGIN_DIR/docker-compose"
    rm -rf "$cache/pkg/root"
    docker compose version >&2
}
