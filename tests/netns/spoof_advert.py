"""Announce forged ringtrain adverts from inside a namespace, for the netns ring tests.

    python tests/netns/spoof_advert.py --interface ADDR --job J --key-file K \
        --advert ID=HOST:PORT [--advert ...] [--silent-port P]

Each ``--advert`` claims node id ID of job J, with the real job key's fingerprint (a
fingerprint is public: anyone on the LAN reads it from the real adverts), at HOST:PORT.
``--silent-port`` also listens on ADDR:P, accepting TCP connections and never answering,
the worst kind of wrong address (a handshake that hangs). Prints one JSON line,
"announced", then stays until stdin closes (at most MAX_LIFETIME_S).
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import threading

from ringtrain.comm.security import read_key_file
from ringtrain.comm.wire import PROTOCOL_VERSION
from ringtrain.discovery.advert import Advert
from ringtrain.discovery.mdns import Discovery

MAX_LIFETIME_S = 120.0


def _hold_connections(server: socket.socket) -> None:
    """Accept connections and keep them open, silent (until the process exits)."""
    held = []
    while True:
        try:
            held.append(server.accept()[0])
        except OSError:
            return


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--interface", required=True, help="IPv4 address to announce on")
    parser.add_argument("--job", required=True)
    parser.add_argument("--key-file", required=True)
    parser.add_argument("--advert", action="append", required=True, metavar="ID=HOST:PORT")
    parser.add_argument("--silent-port", type=int, default=None)
    args = parser.parse_args()
    fingerprint = read_key_file(args.key_file).fingerprint
    if args.silent_port is not None:
        server = socket.create_server((args.interface, args.silent_port))
        threading.Thread(target=_hold_connections, args=(server,), daemon=True).start()
    with Discovery([args.interface]) as discovery:
        announced = []
        for spec in args.advert:
            node_id, _, endpoint = spec.partition("=")
            host, _, port = endpoint.rpartition(":")
            announcer = discovery.announce(Advert(node_id, args.job, (host,), int(port),
                                                  PROTOCOL_VERSION, fingerprint, 0, "forming"))
            announced.append(announcer.advert.instance_name)
        print(json.dumps({"event": "announced", "names": announced}), flush=True)
        select.select([sys.stdin], [], [], MAX_LIFETIME_S)
    return 0


if __name__ == "__main__":
    sys.exit(main())
