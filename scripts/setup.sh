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

# ensure_test_tools: faketime (libfaketime), which runs one daemon instance with its clock
# skewed in the lease tests.
ensure_test_tools() {
    if ! command -v faketime >/dev/null; then
        echo "installing faketime (apt-get): the lease tests skew one instance's clock" >&2
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime >/dev/null
    fi
}

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

# ensure_node_packages: Node.js and npm, and the real Baileys library (tests/baileys, pinned in
# its package-lock.json) that tests/test_baileys.py drives. Installs nodejs and npm through apt
# when node is missing or older than Baileys 7 needs (its engines field: node >= 20); a
# distribution whose nodejs is older (Debian 12 has 18) stops here with how to get Node 20.
# `npm ci` runs again only when the lock file changed (stamp in node_modules).
BAILEYS_NODE_MAJOR=20

node_major() {
    node -e 'process.stdout.write(process.versions.node.split(".")[0])' 2>/dev/null || echo 0
}

ensure_node_packages() {
    local dir=tests/baileys stamp=tests/baileys/node_modules/.installed want log missing=()
    if [ "$(node_major)" -lt "$BAILEYS_NODE_MAJOR" ]; then
        missing+=(nodejs)
    fi
    command -v npm >/dev/null || missing+=(npm)
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "installing ${missing[*]} (apt-get): the Baileys tests run the real library on Node.js" >&2
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if [ "$(node_major)" -lt "$BAILEYS_NODE_MAJOR" ] || ! command -v npm >/dev/null; then
        cat >&2 <<MSG
The Baileys tests need Node.js $BAILEYS_NODE_MAJOR or newer and npm (@whiskeysockets/baileys 7 requires
node >= $BAILEYS_NODE_MAJOR); this machine has $(node --version 2>/dev/null || echo 'no node')$(command -v npm >/dev/null || echo ' and no npm').
The distribution's nodejs is too old here (Debian 12: 18; Debian 13 has 20). Install Node.js 20+
(for example NodeSource's nodejs package: https://github.com/nodesource/distributions) and run
scripts/test again.
MSG
        exit 1
    fi
    want=$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    log=$(mktemp)
    # --ignore-scripts: the only install scripts are Baileys' Node version check (done above)
    # and a protobufjs version notice; npm 11 skips unapproved ones anyway, older npm would not
    if ! (cd "$dir" && npm ci --no-audit --no-fund --ignore-scripts) >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "installing the Baileys test packages (npm ci in $dir) failed (see above)" >&2
        exit 1
    fi
    rm -f "$log"
    echo "$want" > "$stamp"
}
