#!/usr/bin/env bash
# Install ringtrain from this checkout.
#   bash deploy/install.sh          the package (numpy, pyzmq, zeroconf)
#   bash deploy/install.sh --test   the package with its test tools and the MPI baseline of
#                                   `ringtrain bench` (mpi4py and Open MPI wheels, seconds);
#                                   PyTorch (CPU) from a local wheel when a PIP_FIND_LINKS
#                                   directory holds one, and Accelerate where torch is; and
#                                   (as root on Debian or Ubuntu) the system tools the
#                                   network-namespace tests use: iproute2 (ip, tc), nftables
#                                   (loss, partitions), procps (sysctl), dnsutils (dig)
#   bash deploy/install.sh --torch  the package and the CPU build of PyTorch, for the
#                                   "ringtrain" torch.distributed backend: from a local wheel
#                                   when a PIP_FIND_LINKS directory holds torch-*+cpu-*.whl,
#                                   else from PyTorch's CPU-only index (never a CUDA build)
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
    # Accelerate, for tests/procs/test_accelerate_launch.py, only once torch is importable:
    # it requires torch, which pip would otherwise fetch from the index (the CUDA build). The
    # installed torch is named too, so pip keeps it as it is.
    if torch_version=$(python3 -c "import torch; print(torch.__version__)" 2>/dev/null); then
        echo "install.sh: installing accelerate 1.15.0 beside PyTorch $torch_version"
        python3 -m pip install --quiet --disable-pip-version-check accelerate==1.15.0 \
            "torch==$torch_version"
    fi
elif [ "${1:-}" = "--torch" ]; then
    python3 -m pip install --quiet --disable-pip-version-check -e .
    if python3 -c "import torch" >/dev/null 2>&1; then
        echo "install.sh: PyTorch is already installed: $(python3 -c 'import torch; print(torch.__version__)')"
        exit 0
    fi
    wheel=""
    for dir in ${PIP_FIND_LINKS:-}; do
        wheel=$(ls "$dir"/torch-*+cpu-*.whl 2>/dev/null | sort -V | tail -n 1)
        [ -n "$wheel" ] && break
    done
    if [ -n "$wheel" ]; then
        echo "install.sh: installing PyTorch (CPU) from $wheel"
        python3 -m pip install --quiet --disable-pip-version-check "$wheel"
    else
        # plain `pip install torch` would bring the CUDA build (gigabytes); this index holds
        # CPU builds only
        echo "install.sh: installing PyTorch (CPU build) from https://download.pytorch.org/whl/cpu"
        python3 -m pip install --quiet --disable-pip-version-check torch \
            --index-url https://download.pytorch.org/whl/cpu
    fi
else
    python3 -m pip install --quiet --disable-pip-version-check -e .
fi
