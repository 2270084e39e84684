# Shared by scripts/quickstart and scripts/test (sourced, not run):
# install the distribution packages and the virtualenv that wadaemon needs.

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

ensure_system_packages() {
    local missing=()
    command -v python3 >/dev/null || missing+=(python3)
    python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "installing ${missing[*]} (apt-get)" >&2
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
        echo "wadaemon needs Python 3.10 or newer; this is $(python3 --version)" >&2
        exit 1
    }
}

# ensure_venv [EXTRA]: .venv with wadaemon installed (editable), plus the optional EXTRA group.
# Reinstalls only when pyproject.toml changed; pip's output is shown only if it fails.
ensure_venv() {
    local spec="." stamp=".venv/.installed${1:+-$1}" want log
    [ -n "${1:-}" ] && spec=".[$1]"
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    [ -x .venv/bin/python ] || python3 -m venv .venv
    log=$(mktemp)
    if ! { .venv/bin/python -m pip install --disable-pip-version-check -q --upgrade pip &&
           .venv/bin/python -m pip install --disable-pip-version-check -q -e "$spec"; } >"$log" 2>&1
    then
        cat "$log" >&2
        rm -f "$log"
        echo "installing the Python dependencies into .venv failed (see above)" >&2
        exit 1
    fi
    rm -f "$log"
    echo "$want" > "$stamp"
}
