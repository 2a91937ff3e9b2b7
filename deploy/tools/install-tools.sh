#!/usr/bin/env bash
# Build the deploy validation tools (helm, helmfile, kubeconform) from source at pinned versions.
#
# Debian has none of the three and only the Go module proxy is reachable from our machines, so
# each tool is compiled with the local Go toolchain. Everything lives under one tools dir outside
# the checkout (default $FACTKEEPER_HOME/tools, i.e. ~/.cache/factkeeper/tools), so a fresh clone
# or CI checkout on the same machine reuses the build: binaries in tools/bin, GOPATH/GOMODCACHE/
# GOCACHE beside them; nothing touches ~/go. A tool whose binary and version stamp already match is skipped, so a
# rerun takes well under a second. Sources come from the module proxy and are verified against
# the checksum database (go.sum / GOSUMDB), like any `go install`.
#
# Usage: deploy/tools/install-tools.sh            # build what is missing
#        deploy/tools/install-tools.sh --print-bin # print the bin dir and exit
# Env:   FACTKEEPER_TOOLS_DIR (default $FACTKEEPER_HOME/tools, FACTKEEPER_HOME defaulting to
#        ~/.cache/factkeeper), GO (default: go on PATH, else
#        /usr/local/go/bin/go), FACTKEEPER_TOOLS_JOBS (go build -p, default 1: the build
#        machines are small and shared).
set -euo pipefail

HELM_VERSION=v3.22.0
HELMFILE_VERSION=v1.8.0
KUBECONFORM_VERSION=v0.8.0

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TOOLS_DIR="${FACTKEEPER_TOOLS_DIR:-${FACTKEEPER_HOME:-$HOME/.cache/factkeeper}/tools}"
BIN="$TOOLS_DIR/bin"

if [[ "${1:-}" == "--print-bin" ]]; then
    echo "$BIN"
    exit 0
fi

if [[ -z "${GO:-}" ]]; then
    GO="$(command -v go || true)"
    [[ -n "$GO" ]] || GO=/usr/local/go/bin/go
fi
if [[ ! -x "$GO" ]]; then
    echo "install-tools: Go not found (set GO=/path/to/go or install Go >= 1.26)" >&2
    exit 3
fi

mkdir -p "$BIN"
cd "$TOOLS_DIR"  # keep go commands away from any go.mod in the checkout
export GOPATH="$TOOLS_DIR/go"
export GOMODCACHE="$GOPATH/pkg/mod"
export GOCACHE="$TOOLS_DIR/go-build"
export GOTOOLCHAIN=local   # never download another toolchain
export CGO_ENABLED=0       # static binaries, no C compiler needed
export GOFLAGS="-modcacherw -buildvcs=false -trimpath -p=${FACTKEEPER_TOOLS_JOBS:-1}"
unset GOBIN

log() { printf 'install-tools: %s\n' "$*" >&2; }

# One build at a time per tools dir (parallel test runs share it).
exec 9>"$TOOLS_DIR/.install.lock"
if command -v flock >/dev/null; then
    flock 9
fi

# up_to_date NAME VERSION: the binary exists and its stamp names VERSION.
up_to_date() {
    [[ -x "$BIN/$1" && -f "$BIN/.$1.version" && "$(cat "$BIN/.$1.version")" == "$2" ]]
}

# finish NAME VERSION TMPFILE: move a fresh build into place, then write its stamp.
finish() {
    mv -f "$3" "$BIN/$1"
    printf '%s\n' "$2" >"$BIN/.$1.version"
}

# module_dir MODULE@VERSION: download one module (verified) and print its source dir.
module_dir() {
    "$GO" mod download -json "$1" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p'
}

timed() {
    local name=$1 start=$SECONDS
    shift
    "$@"
    log "$name built in $((SECONDS - start))s"
}

build_kubeconform() {
    GOBIN="$TOOLS_DIR/tmp-kubeconform" "$GO" install \
        -ldflags "-s -w -X main.version=$KUBECONFORM_VERSION" \
        "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION"
    finish kubeconform "$KUBECONFORM_VERSION" "$TOOLS_DIR/tmp-kubeconform/kubeconform"
    rmdir "$TOOLS_DIR/tmp-kubeconform"
}

build_helm() {
    # Helm's Makefile stamps the version and the Kubernetes version that `helm template` and
    # `helm lint` assume (.Capabilities.KubeVersion); without them it would claim Kubernetes 1.20.
    local src k8s_minor
    src="$(module_dir "helm.sh/helm/v3@$HELM_VERSION")"
    k8s_minor="$(sed -n 's/^[[:space:]]*k8s\.io\/client-go v0\.\([0-9]*\)\..*/\1/p' "$src/go.mod" | head -n1)"
    [[ -n "$k8s_minor" ]] || { log "cannot read k8s.io/client-go from $src/go.mod"; exit 1; }
    local ld="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
    ld+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
    for pkg in pkg/lint/rules pkg/chartutil; do
        ld+=" -X helm.sh/helm/v3/$pkg.k8sVersionMajor=1 -X helm.sh/helm/v3/$pkg.k8sVersionMinor=$k8s_minor"
    done
    GOBIN="$TOOLS_DIR/tmp-helm" "$GO" install -ldflags "$ld" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
    finish helm "$HELM_VERSION" "$TOOLS_DIR/tmp-helm/helm"
    rmdir "$TOOLS_DIR/tmp-helm"
}

build_helmfile() {
    # helmfile's go.mod has `replace` directives, which `go install module@version` refuses, so
    # build it as the main module from a writable copy of its verified module source.
    local src work
    src="$(module_dir "github.com/helmfile/helmfile@$HELMFILE_VERSION")"
    work="$TOOLS_DIR/src/helmfile@$HELMFILE_VERSION"
    rm -rf "$work"
    mkdir -p "$work"
    cp -R "$src/go.mod" "$src/go.sum" "$src/main.go" "$src/cmd" "$src/pkg" "$work/"
    chmod -R u+w "$work"
    (cd "$work" && "$GO" build -mod=readonly -o "$work/helmfile" \
        -ldflags "-s -w -X go.szostok.io/version.version=$HELMFILE_VERSION -X go.szostok.io/version.dirtyBuild=false" .)
    finish helmfile "$HELMFILE_VERSION" "$work/helmfile"
    rm -rf "$work"
}

for spec in "kubeconform $KUBECONFORM_VERSION" "helm $HELM_VERSION" "helmfile $HELMFILE_VERSION"; do
    read -r name version <<<"$spec"
    if up_to_date "$name" "$version"; then
        log "$name $version already built"
    else
        log "building $name $version (slow the first time)"
        timed "$name" "build_$name"
    fi
done
echo "$BIN"
