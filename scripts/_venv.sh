# shellcheck shell=bash
# Shared helper for scripts/run and scripts/test: create .venv in the repo root
# and (re)install the project into it only when needed.
#
# Usage (after `cd "$REPO_ROOT"`):  source scripts/_venv.sh; ensure_venv [EXTRAS]
#
# A stamp file inside .venv records the sha256 of pyproject.toml per extras
# flavour; the install runs again when pyproject.toml changes, when the stamp
# is missing, or when the `wakeproxy` command is missing from the venv.

ensure_venv() {
    local extras="${1:-}"
    local venv=".venv"
    local spec="."
    local stamp="$venv/.wakeproxy-stamp"
    if [[ -n "$extras" ]]; then
        spec=".[${extras}]"
        stamp="$venv/.wakeproxy-stamp-${extras}"
    fi

    if [[ ! -x "$venv/bin/python" ]]; then
        echo "[venv] creating $venv" >&2
        python3 -m venv "$venv"
    fi

    local want
    want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    local have=""
    [[ -f "$stamp" ]] && have="$(cat "$stamp")"
    # A full install with extras also satisfies the plain install.
    if [[ -z "$extras" && "$have" != "$want" ]]; then
        local f
        for f in "$venv"/.wakeproxy-stamp-*; do
            [[ -f "$f" && "$(cat "$f")" == "$want" ]] && have="$want" && break
        done
    fi

    if [[ "$have" == "$want" && -x "$venv/bin/wakeproxy" ]]; then
        return 0
    fi

    if [[ ! -f README.md ]]; then
        echo "[venv] warning: README.md is missing; pyproject.toml needs it for the install" >&2
    fi
    echo "[venv] installing -e '$spec' into $venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$spec" >&2
    echo "$want" > "$stamp"
}
