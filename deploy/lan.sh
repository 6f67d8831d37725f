#!/usr/bin/env bash
# Build or remove an emulated LAN of network namespaces (Linux, root).
#   deploy/lan.sh up 4 [--rate 1000]     # prints the prefix, namespaces and addresses
#   ip netns exec PREFIX-0 COMMAND       # run something on node 0
#   deploy/lan.sh down PREFIX
# Needs Debian iproute2 and procps; nftables for loss and partitions.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${root}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python3}" -m ringtrain.lab.netns "$@"
