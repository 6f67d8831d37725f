"""One discovery node for the netns tests: announce, browse, report JSON lines, wait.

Run inside a namespace: python tests/netns/discovery_node.py --job J --node-id N
--port P --expect K [--interface eth0]. It prints one JSON object per line:
"announced", then "found" (or "error"); for each line "final K" on stdin, a "final"
report once it sees K adverts of any job (or after 5 s); once stdin closes, "closed".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import select
import sys
import time

from ringtrain.discovery.advert import Advert
from ringtrain.discovery.interfaces import usable_ipv4_addresses
from ringtrain.discovery.mdns import Discovery
from ringtrain.errors import RingtrainError

MAX_LIFETIME_S = 60.0


def report(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "t": time.time(), **fields}), flush=True)


def main() -> int:
    started = time.time()
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", required=True)
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--interface", default=None)
    parser.add_argument("--timeout", type=float, default=15.0)
    args = parser.parse_args()
    addresses = usable_ipv4_addresses(args.interface)
    advert = Advert(args.node_id, args.job, tuple(addresses), args.port, 1, "", 0, "forming")
    with Discovery(addresses) as discovery:
        everyone = discovery.browse(None)
        browser = discovery.browse(args.job)
        announced = time.time()
        announcer = discovery.announce(advert)
        report("announced", started=started, register_s=time.time() - announced,
               interfaces=list(discovery.interfaces), advert=dataclasses.asdict(announcer.advert))
        try:
            found = browser.wait_for(args.expect, args.job, timeout=args.timeout)
        except RingtrainError as exc:
            report("error", message=str(exc), everyone=[a.node_id for a in everyone.adverts()])
            return 1
        report("found", started=started, adverts=[dataclasses.asdict(a) for a in found],
               everyone=[dataclasses.asdict(a) for a in everyone.adverts()])
        # Stay announced until the test closes stdin (bounded, in case it never does),
        # answering its requests for a final view while everyone is still announced.
        while time.time() - started < MAX_LIFETIME_S:
            ready, _, _ = select.select([sys.stdin], [], [], MAX_LIFETIME_S)
            line = sys.stdin.readline() if ready else ""
            if not line.startswith("final"):
                break
            try:
                everyone.wait_for(int(line.split()[1]), timeout=5.0)
            except RingtrainError:
                pass  # report what was seen; the test names what is missing
            report("final", everyone=[dataclasses.asdict(a) for a in everyone.adverts()],
                   adverts=[dataclasses.asdict(a) for a in browser.adverts()])
        announcer.close()
        browser.close()
        everyone.close()
    report("closed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
