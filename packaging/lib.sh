# Sourced by packaging/test-system (not run).
#
# Root filesystems of each Debian release to boot the package in (made with mmdebstrap, cached
# under $CACHE and never inside the clone), and the per-release packages of the version before,
# which the upgrade test installs first.

# dpkg-buildpackage and friends must see the distribution's tools, not pyenv's shims
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8

CACHE=${WADAEMON_BUILD_CACHE:-/var/cache/wadaemon-build}
# a cached root filesystem older than this is made again (security updates)
ROOTFS_MAX_AGE_DAYS=${WADAEMON_ROOTFS_MAX_AGE_DAYS:-14}
# bump when the way root filesystems are made changes, so that old caches are not used
ROOTFS_FORMAT=1
# the releases tested when none is named
DEFAULT_RELEASES="bookworm trixie"
# the last commit whose packaging/build-deb made one package per release (0.1.0-1+deb12 and
# 0.1.0-1+deb13, the virtualenv owned by dpkg): the packages the upgrade test starts from
PREVIOUS_COMMIT=a053b52b884bae1fd0931f56272f8ff5b04cb409

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

need_root() {
    [ "$(id -u)" = 0 ] || die "$0 needs root (mmdebstrap, systemd-nspawn); run it with sudo"
}

# ensure_host_tools CMD:PACKAGE...: install the Debian packages whose commands are missing
ensure_host_tools() {
    local pair missing=()
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    log "installing ${missing[*]} (apt-get)"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

host_tools() {
    need_root
    command -v apt-get >/dev/null || die "this needs a Debian or Ubuntu host (apt-get)"
    ensure_host_tools mmdebstrap:mmdebstrap systemd-nspawn:systemd-container \
        nsenter:util-linux dpkg-deb:dpkg flock:util-linux pgrep:procps lintian:lintian
}

# release_tag RELEASE: the suffix of the package version built for it
release_tag() {
    case $1 in
        bookworm) echo deb12 ;;
        trixie) echo deb13 ;;
        *) die "unknown release '$1': this knows bookworm and trixie (see docs/packaging.md)" ;;
    esac
}

# release_sources RELEASE: the apt sources mmdebstrap uses (one line each)
release_sources() {
    local mirror=${WADAEMON_DEBIAN_MIRROR:-http://deb.debian.org/debian}
    local security=${WADAEMON_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
    release_tag "$1" >/dev/null
    echo "deb $mirror $1 main"
    echo "deb $mirror $1-updates main"
    echo "deb $security $1-security main"
}

# ensure_rootfs RELEASE PURPOSE VARIANT PACKAGES: print the path of a cached root filesystem of
# RELEASE (mmdebstrap VARIANT, plus the comma-separated PACKAGES), making it first if needed.
# Its name carries a hash of what went into it: a changed package list makes a new one.
ensure_rootfs() {
    local release=$1 purpose=$2 variant=$3 packages=$4
    local key dir sources=()
    key=$(printf '%s\n' "$ROOTFS_FORMAT" "$release" "$variant" "$packages" |
        sha256sum | cut -c1-12)
    dir=$CACHE/rootfs/$release-$purpose-$key
    mkdir -p "$CACHE/rootfs"
    exec 9>"$CACHE/rootfs/.$release-$purpose.lock"
    flock 9
    if [ -f "$dir/.complete" ] &&
        [ -z "$(find "$dir/.complete" -mtime +"$ROOTFS_MAX_AGE_DAYS")" ] &&
        [ -z "${WADAEMON_REFRESH_ROOTFS:-}" ]; then
        exec 9>&-
        echo "$dir"
        return 0
    fi
    mapfile -t sources < <(release_sources "$release")
    log "making the $release $purpose root filesystem in $dir (1-2 minutes, once)"
    rm -rf "$dir.tmp"
    if ! mmdebstrap --quiet --variant="$variant" --include="$packages" \
        --aptopt='Acquire::Retries "3"' "$release" "$dir.tmp" "${sources[@]}" \
        >"$CACHE/rootfs/$release-$purpose.log" 2>&1; then
        cat "$CACHE/rootfs/$release-$purpose.log" >&2
        rm -rf "$dir.tmp"
        die "mmdebstrap could not make the $release $purpose root filesystem (see above)"
    fi
    touch "$dir.tmp/.complete"
    local old
    for old in "$CACHE/rootfs/$release-$purpose-"*; do
        [ "$old" = "$dir.tmp" ] || rm -rf "$old"
    done
    mv "$dir.tmp" "$dir"
    exec 9>&-
    echo "$dir"
}

# previous_packages: print the directory holding the per-release packages of PREVIOUS_COMMIT,
# building them first if they are not cached: that commit's own packaging/build-deb (root
# filesystems, dh-virtualenv), from this clone's history. $WADAEMON_PREVIOUS_DEB_DIR, if set,
# names such a directory instead.
previous_packages() {
    if [ -n "${WADAEMON_PREVIOUS_DEB_DIR:-}" ]; then
        echo "$WADAEMON_PREVIOUS_DEB_DIR"
        return 0
    fi
    local dir=$CACHE/previous/$PREVIOUS_COMMIT tree
    if [ -n "$(find "$dir" -name 'wadaemon_*+deb12_amd64.deb' 2>/dev/null)" ] &&
        [ -n "$(find "$dir" -name 'wadaemon_*+deb13_amd64.deb' 2>/dev/null)" ]; then
        echo "$dir"
        return 0
    fi
    git cat-file -e "$PREVIOUS_COMMIT^{commit}" 2>/dev/null ||
        die "the upgrade test starts from the packages of commit $PREVIOUS_COMMIT, which this" \
            "clone does not have (a shallow clone?): git fetch --unshallow, or set" \
            "WADAEMON_PREVIOUS_DEB_DIR to a directory with wadaemon_0.1.0-1+deb12_amd64.deb and +deb13"
    mkdir -p "$CACHE/tmp" "$CACHE/previous"
    tree=$(mktemp -d "$CACHE/tmp/previous.XXXXXX")
    git archive "$PREVIOUS_COMMIT" | tar -x -C "$tree"
    log "building the per-release packages of $PREVIOUS_COMMIT for the upgrade test (once, 3-6 minutes)"
    rm -rf "$dir.tmp"
    if ! (cd "$tree" && packaging/build-deb --out "$dir.tmp") >"$CACHE/previous/build.log" 2>&1; then
        tail -n 40 "$CACHE/previous/build.log" >&2
        rm -rf "$tree" "$dir.tmp"
        die "could not build the previous packages (log: $CACHE/previous/build.log)"
    fi
    rm -rf "$tree"
    mv "$dir.tmp" "$dir"
    echo "$dir"
}

# in_root ROOTFS [NSPAWN OPTION...] -- COMMAND...: run COMMAND in a throw-away copy of ROOTFS
# (an overlay on it: the cached tree is never changed), with the host's network
in_root() {
    local root=$1 opts=()
    shift
    while [ "$#" -gt 0 ] && [ "$1" != -- ]; do
        opts+=("$1")
        shift
    done
    shift
    # nspawn prints one harmless complaint about its propagation directory on exit
    systemd-nspawn --quiet --register=no --keep-unit --volatile=overlay -D "$root" \
        "${opts[@]}" "$@" 2> >(grep -v 'nspawn/propagate' >&2)
}
