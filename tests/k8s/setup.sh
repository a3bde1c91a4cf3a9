#!/usr/bin/env bash
# Builds (once per machine) the Kubernetes 1.20 API server, controller
# manager and kubectl that the operator's end-to-end tests use, and installs
# etcd and openssl.
#
# The binaries are cached outside the clone, in $SIP_PBX_K8S_CACHE
# (default /var/cache/sip-pbx-k8s/bin); a second run only checks they are there.
# Sources: Debian's `kubernetes` source package (vendored Kubernetes 1.20.2),
# fetched with `apt-get source` through a private deb-src list that does not
# touch the system's apt sources.
set -euo pipefail

CACHE="${SIP_PBX_K8S_CACHE:-/var/cache/sip-pbx-k8s}"
BIN="$CACHE/bin"
K8S_VERSION="1.20.5+really1.20.2-1.1+deb12u1"

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup.sh: needs root to install Debian packages" >&2
        exit 1
    fi
}

apt_install() {
    need_root
    # Another apt may be running: wait for the dpkg lock instead of failing.
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "$@"
}

PROGRAMS=(kube-apiserver kube-controller-manager kubectl)

if ! command -v etcd >/dev/null || ! command -v openssl >/dev/null; then
    need_root
    apt-get -o DPkg::Lock::Timeout=600 update
    apt_install etcd-server openssl
fi

cached=yes
for b in "${PROGRAMS[@]}"; do
    [ -x "$BIN/$b" ] || cached=no
done
if [ "$cached" = yes ]; then
    echo "setup.sh: ${PROGRAMS[*]} cached in $BIN"
    exit 0
fi

need_root
apt-get -o DPkg::Lock::Timeout=600 update
apt_install golang-go dpkg-dev make rsync \
    golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev

SRC="$CACHE/src"
APTDIR="$CACHE/apt"
mkdir -p "$SRC" "$APTDIR/lists/partial" "$BIN"
cat > "$APTDIR/deb-src.sources" <<SOURCES
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
APT_PRIVATE=(-o "Dir::Etc::SourceList=$APTDIR/deb-src.sources"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$APTDIR/lists")

TREE="$SRC/kubernetes-1.20.5+really1.20.2"
if [ ! -d "$TREE" ]; then
    apt-get "${APT_PRIVATE[@]}" update
    (cd "$SRC" && apt-get "${APT_PRIVATE[@]}" source "kubernetes=$K8S_VERSION")
fi

# Go 1.19 crashes ("fatal error: fault") in the vendored reflect2/json-iterator
# on the first custom resource write: use Debian's maintained sources instead.
GOCODE=/usr/share/gocode/src/github.com
for pkg in modern-go/reflect2 json-iterator/go; do
    rsync -a --delete --exclude '*_test.go' "$GOCODE/$pkg/" "$TREE/vendor/github.com/$pkg/"
done

(cd "$TREE" && nice -n 10 make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kubectl")
for b in "${PROGRAMS[@]}"; do
    install -m 0755 "$TREE/_output/local/go/bin/$b" "$BIN/$b.tmp"
    mv "$BIN/$b.tmp" "$BIN/$b"
done
echo "setup.sh: built into $BIN"
