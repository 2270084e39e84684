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

# ensure_venv [EXTRA]: .venv with wadaemon installed (editable), plus the optional EXTRA group
ensure_venv() {
    local spec="."
    [ -n "${1:-}" ] && spec=".[$1]"
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec"
}
