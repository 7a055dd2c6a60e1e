# shellcheck shell=bash
# Shared by scripts/test and scripts/bench: make sure a Docker engine answers.
#
# Usage (after `cd "$REPO_ROOT"`):  source scripts/_docker.sh; ensure_dockerd
#
# When `docker info` already works, that engine is used and left alone. Otherwise
# dockerd is started in the background and stopped on exit — only that process,
# by its PID (an EXIT trap is installed; callers must not replace it).

DOCKERD_PID=""

_stop_own_dockerd() {
    local rc=$?
    if [[ -n "$DOCKERD_PID" ]] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
        echo "[docker] stopping the dockerd we started (pid $DOCKERD_PID)" >&2
        kill -TERM "$DOCKERD_PID" 2>/dev/null || true
        # Give it 20 s to stop its containers, then force it.
        for _ in $(seq 1 200); do
            kill -0 "$DOCKERD_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$DOCKERD_PID" 2>/dev/null || true
        wait "$DOCKERD_PID" 2>/dev/null || true
    fi
    exit "$rc"
}

ensure_dockerd() {
    if docker info >/dev/null 2>&1; then
        echo "[docker] using the Docker engine that is already running" >&2
        return 0
    fi
    local log
    log="$(mktemp /tmp/wakeproxy-dockerd.XXXXXX.log)"
    echo "[docker] starting dockerd (log: $log)" >&2
    trap _stop_own_dockerd EXIT
    dockerd >"$log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 1 300); do
        if docker info >/dev/null 2>&1; then
            echo "[docker] dockerd is up (pid $DOCKERD_PID)" >&2
            return 0
        fi
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "[docker] dockerd did not answer within 30 s; its log:" >&2
    cat "$log" >&2 || true
    exit 1
}
