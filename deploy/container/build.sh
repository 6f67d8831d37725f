#!/usr/bin/env bash
# Build the ringtrain node image: wheels of ringtrain and its dependencies (from this
# checkout and the package index), then the image from deploy/container/Dockerfile.
#   deploy/container/build.sh [TAG] [extra build flags, e.g. --build-arg BASE=...]
# Uses docker, podman or buildah, whichever is installed (in that order). The wheels are
# made with this machine's python3, which must be the image's Python version (3.11).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tag="${1:-ringtrain:0.1.0}"
shift || true
rm -rf "$here/wheels"
python3 -m pip wheel --quiet --disable-pip-version-check --only-binary=:all: \
    --wheel-dir "$here/wheels" "numpy>=1.24" "pyzmq>=25.1" "zeroconf>=0.131" "dnspython>=2.4"
python3 -m pip wheel --quiet --disable-pip-version-check --no-deps \
    --wheel-dir "$here/wheels" "$here/../.."
for tool in docker podman buildah; do
    if command -v "$tool" >/dev/null 2>&1 && "$tool" info >/dev/null 2>&1; then
        if [ "$tool" = buildah ]; then
            exec buildah bud --tag "$tag" "$@" "$here"
        fi
        exec "$tool" build --tag "$tag" "$@" "$here"
    fi
done
echo "build.sh: no working docker, podman or buildah; the wheels are in $here/wheels" >&2
exit 2
