#!/usr/bin/env bash
# Install ringtrain from this checkout.
#   bash deploy/install.sh          the package (numpy, pyzmq, zeroconf)
#   bash deploy/install.sh --test   the package with its test tools and the MPI baseline of
#                                   `ringtrain bench` (mpi4py and Open MPI wheels, seconds), and
#                                   (as root on Debian or Ubuntu) the system tools the
#                                   network-namespace tests use: iproute2 (ip, tc), nftables
#                                   (loss, partitions), procps (sysctl), dnsutils (dig)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip --version >/dev/null 2>&1 || { echo "install.sh: python3 with pip is needed" >&2; exit 2; }
if [ "${1:-}" = "--test" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        missing=()
        command -v ip >/dev/null 2>&1 || missing+=(iproute2)
        command -v nft >/dev/null 2>&1 || missing+=(nftables)
        command -v sysctl >/dev/null 2>&1 || missing+=(procps)
        command -v dig >/dev/null 2>&1 || missing+=(dnsutils)
        if [ "${#missing[@]}" -gt 0 ]; then
            echo "install.sh: installing ${missing[*]} (used by the network-namespace tests)"
            DEBIAN_FRONTEND=noninteractive apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
        fi
    fi
    python3 -m pip install --quiet --disable-pip-version-check -e '.[test,mpi]'
    # The PyTorch tests (integration, DDP parity) run where a CPU wheel of torch lies in a
    # local wheel directory; we never let pip fetch torch from an index (a multi-GB CUDA build).
    for dir in ${PIP_FIND_LINKS:-}; do
        wheel=$(ls "$dir"/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n 1)
        if [ -n "$wheel" ] && ! python3 -c "import torch" >/dev/null 2>&1; then
            echo "install.sh: installing PyTorch (CPU) from $wheel for the torch tests"
            python3 -m pip install --quiet --disable-pip-version-check "$wheel"
            break
        fi
    done
else
    python3 -m pip install --quiet --disable-pip-version-check -e .
fi
