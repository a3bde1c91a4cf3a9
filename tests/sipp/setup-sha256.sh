#!/usr/bin/env bash
# Installs (once per machine) SIPp 3.7.3, which answers SHA-256 digest
# challenges ([authentication]); bookworm's sip-tester (3.6.1) does MD5 only.
#
# It is Debian trixie's sip-tester with the trixie libraries it needs, glibc
# included, unpacked (not installed: the system's libc and apt sources stay
# as they are) into a cache outside the clone, $SIP_PBX_SIPP373_CACHE
# (default /var/cache/sip-pbx-sipp373). $SIP_PBX_SIPP373_CACHE/sipp runs it
# through the bundled dynamic loader. A second run only checks it is there.
#
# Trust: trixie's InRelease is checked with gpgv against the system's
# debian-archive-keyring; Packages.xz against the SHA256 in it; each .deb
# against the SHA256 in Packages.xz. About 17 MB are downloaded.
set -euo pipefail

CACHE="${SIP_PBX_SIPP373_CACHE:-/var/cache/sip-pbx-sipp373}"
MIRROR="${SIP_PBX_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=trixie
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
# sip-tester and the closure of its Depends in trixie.
PACKAGES=(sip-tester libc6 libgcc-s1 libstdc++6 libgsl28 libgslcblas0
    libncursesw6 libtinfo6 libpcap0.8t64 libdbus-1-3 libsystemd0 libcap2
    libsctp1 libwolfssl42t64)

# `sipp -v` exits 99 after printing its version.
is_sha256_sipp() {
    [ -x "$1" ] && { "$1" -v 2>&1 || true; } | grep -q 'SIPp v3\.7\.3-.*SHA256'
}
works() { is_sha256_sipp "$CACHE/sipp"; }

if works; then
    echo "setup-sha256.sh: SIPp 3.7.3 cached in $CACHE"
    exit 0
fi

. "$(dirname "$0")/../apt.sh"
apt_install_missing curl gpgv xz-utils debian-archive-keyring

# Unpacked beside the cache, then moved into place whole.
mkdir -p "$(dirname "$CACHE")"
tmp="$(mktemp -d "$(dirname "$CACHE")/.sipp373.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
fetch() { curl -sSfL --retry 3 -o "$2" "$MIRROR/$1"; }
check() { # file sha256
    echo "$2  $1" | sha256sum -c --quiet - || { echo "setup-sha256.sh: $1: SHA256 mismatch" >&2; exit 1; }
}

fetch "dists/$SUITE/InRelease" "$tmp/InRelease"
gpgv --keyring "$KEYRING" --output "$tmp/Release" "$tmp/InRelease" 2>/dev/null ||
    { echo "setup-sha256.sh: $SUITE InRelease: bad signature" >&2; exit 1; }
index_sha="$(awk '/^SHA256:/{s=1; next} /^[^ ]/{s=0} s && $3=="main/binary-amd64/Packages.xz"{print $1}' "$tmp/Release")"
[ -n "$index_sha" ] || { echo "setup-sha256.sh: no Packages.xz in $SUITE Release" >&2; exit 1; }
fetch "dists/$SUITE/main/binary-amd64/Packages.xz" "$tmp/Packages.xz"
check "$tmp/Packages.xz" "$index_sha"
xz -d "$tmp/Packages.xz"

root="$tmp/root"
mkdir -p "$root"
for p in "${PACKAGES[@]}"; do
    read -r file sha < <(awk -v p="$p" '
        /^Package: / {x = ($2 == p)}
        x && /^Filename: / {f = $2}
        x && /^SHA256: / {s = $2}
        /^$/ && x && f {print f, s; exit}' "$tmp/Packages") ||
        { echo "setup-sha256.sh: $p is not in $SUITE" >&2; exit 1; }
    deb="$tmp/$(basename "$file")"
    fetch "$file" "$deb"
    check "$deb" "$sha"
    dpkg-deb -x "$deb" "$root"
    echo "${deb##*/}" >> "$root/PACKAGES"
done

cat > "$root/sipp" <<'WRAPPER'
#!/bin/sh
# SIPp 3.7.3 from Debian trixie, with its own glibc (see tests/sipp/setup-sha256.sh).
DIR="$(dirname "$(readlink -f "$0")")"
LIB="$DIR/usr/lib/x86_64-linux-gnu"
exec "$LIB/ld-linux-x86-64.so.2" --library-path "$LIB" "$DIR/usr/bin/sipp" "$@"
WRAPPER
chmod 0755 "$root/sipp"
is_sha256_sipp "$root/sipp" ||
    { echo "setup-sha256.sh: the unpacked SIPp does not run:" >&2; "$root/sipp" -v >&2 || true; exit 1; }

rm -rf "$CACHE.old"
[ ! -e "$CACHE" ] || mv "$CACHE" "$CACHE.old"
mv "$root" "$CACHE"
rm -rf "$CACHE.old"
works || { echo "setup-sha256.sh: $CACHE/sipp does not run" >&2; exit 1; }
echo "setup-sha256.sh: SIPp 3.7.3 (SHA-256) in $CACHE"
