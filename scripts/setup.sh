# Shared by scripts/quickstart and scripts/test (sourced, not run):
# install the distribution packages and the virtualenv that wadaemon needs.

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

ensure_system_packages() {
    local missing=()
    command -v python3 >/dev/null || missing+=(python3)
    python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
    # neonize imports python-magic, which loads the system's libmagic
    ldconfig -p 2>/dev/null | grep -q 'libmagic\.so\.1 ' || missing+=(libmagic1)
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

# ensure_firestore_emulator: Java and Google's Firestore emulator, which the tests start.
# Installs a JRE from the distribution when java is missing; the emulator itself comes from
# Google's Cloud SDK apt repository, so without it this stops and says how to get it.
FIRESTORE_EMULATOR_JAR=${FIRESTORE_EMULATOR_JAR:-/usr/lib/google-cloud-sdk/platform/cloud-firestore-emulator/cloud-firestore-emulator.jar}
export FIRESTORE_EMULATOR_JAR

ensure_firestore_emulator() {
    if ! command -v java >/dev/null; then
        echo "installing default-jre-headless (apt-get): the Firestore emulator runs on Java" >&2
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless \
            >/dev/null
    fi
    [ -f "$FIRESTORE_EMULATOR_JAR" ] && return 0
    if apt-cache policy google-cloud-cli-firestore-emulator 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        echo "installing google-cloud-cli-firestore-emulator (apt-get)" >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            google-cloud-cli-firestore-emulator >/dev/null
        [ -f "$FIRESTORE_EMULATOR_JAR" ] && return 0
    fi
    cat >&2 <<MSG
The Firestore emulator is not installed ($FIRESTORE_EMULATOR_JAR is missing); the tests need it.
Install it from Google's Cloud SDK apt repository (https://cloud.google.com/sdk/docs/install#deb):
    apt-get install google-cloud-cli-firestore-emulator
or, with the gcloud CLI installed another way:
    gcloud components install cloud-firestore-emulator
and set FIRESTORE_EMULATOR_JAR to the jar if it is not at the path above.
MSG
    exit 1
}
