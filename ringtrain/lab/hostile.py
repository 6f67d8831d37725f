"""A keyless stranger on the LAN, for ``ringtrain bench-hostile``: lying adverts and idle
connections, run inside a namespace of an emulated LAN (``lab.netns``), never elsewhere.

    python -m ringtrain.lab.hostile --interface 10.77.5.250 --job J --fingerprint FP \\
        --dead-prefix 10.77.5 --target 10.77.5.2:7077 --connections 2000 --seconds 60

* ``--adverts`` adverts of job J under the real key fingerprint (public: every advert
  carries it), each listing ``--addresses`` dead addresses of the LAN (``<dead-prefix>.100``
  upwards: nobody answers there), re-announced every ``--refresh`` seconds with new ports;
* ``--connections`` TCP connections to every ``--target``, opened and left idle (never a
  byte sent); each one the node closes is opened again;
* ``--door-asks`` datagrams a second to every target's key door (UDP, same port), shaped
  like asks, under no job key (their MACs are random).

Prints one JSON line per second: connections open, reopened, adverts announced.
"""

from __future__ import annotations

import argparse
import errno
import json
import random
import resource
import select
import socket
import sys
import time

from ..comm.door import ASK_BYTES, MAGIC
from ..comm.wire import PROTOCOL_VERSION
from ..discovery.advert import Advert
from ..discovery.mdns import Announcer, Discovery


def _send_ask(sock: socket.socket, target: tuple[str, int]) -> int:
    """One ask-shaped datagram of random bytes to ``target``'s door; 1 if it was sent."""
    try:
        sock.sendto(MAGIC + random.randbytes(ASK_BYTES - len(MAGIC)), target)
    except OSError:
        return 0  # the buffer is full: the flood is as fast as it can be
    return 1


def _connect(target: tuple[str, int]) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    code = sock.connect_ex(target)
    if code not in (0, errno.EINPROGRESS):
        sock.close()
        return None
    return sock


class IdleConnections:
    """``count`` idle connections to each target, kept open: closed ones are opened again."""

    def __init__(self, targets: list[tuple[str, int]], count: int):
        self.targets, self.count = targets, count
        self.open: dict[socket.socket, tuple[str, int]] = {}
        self.reopened = 0

    def established(self) -> int:
        """Connections whose TCP handshake completed (the rest are still connecting)."""
        return sum(1 for _, events in _poll(self.open, select.POLLOUT)
                   if events & select.POLLOUT)

    def fill(self, budget: int = 500) -> None:
        """Open up to ``budget`` connections that are missing."""
        for target in self.targets:
            have = sum(1 for t in self.open.values() if t == target)
            for _ in range(min(budget, self.count - have)):
                sock = _connect(target)
                if sock is not None:
                    self.open[sock] = target
                budget -= 1

    def reap(self) -> None:
        """Forget the connections the other end closed (they are opened again by fill)."""
        for sock, events in _poll(self.open, select.POLLIN):
            if not events & (select.POLLERR | select.POLLHUP):
                try:
                    if sock.recv(1, socket.MSG_PEEK) != b"":
                        continue  # it sent something: still open
                except BlockingIOError:
                    continue
                except OSError:
                    pass
            self.open.pop(sock, None)
            sock.close()
            self.reopened += 1


def _poll(socks: dict[socket.socket, tuple[str, int]], mask: int
          ) -> list[tuple[socket.socket, int]]:
    """The sockets with any of ``mask`` (or an error or hang-up) now, and their events
    (poll, not select: thousands of descriptors are past select's 1024)."""
    poller = select.poll()
    by_fd = {sock.fileno(): sock for sock in socks}
    for fd in by_fd:
        poller.register(fd, mask)
    return [(by_fd[fd], events) for fd, events in poller.poll(0)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interface", required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--fingerprint", required=True)
    parser.add_argument("--dead-prefix", required=True, help="first three octets, e.g. 10.77.5")
    parser.add_argument("--adverts", type=int, default=64)
    parser.add_argument("--addresses", type=int, default=16)
    parser.add_argument("--refresh", type=float, default=5.0)
    parser.add_argument("--target", action="append", default=[], metavar="HOST:PORT")
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--door-asks", type=float, default=0.0, metavar="PER_S")
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    targets = [(h, int(p)) for h, _, p in (t.rpartition(":") for t in args.target)]
    idle = IdleConnections(targets, args.connections)
    dead = tuple(f"{args.dead_prefix}.{100 + i}" for i in range(args.addresses))
    announcers: list[Announcer] = []
    rounds = 0
    end = time.monotonic() + args.seconds
    next_refresh = 0.0
    next_report = time.monotonic() + 1.0
    door = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    door.setblocking(False)
    asks, asks_owed, last = 0, 0.0, time.monotonic()
    with door, Discovery([args.interface]) as discovery:
        while time.monotonic() < end:
            if time.monotonic() >= next_refresh:
                for announcer in announcers:
                    announcer.close()
                port = random.randint(20000, 60000)
                announcers = [discovery.announce(Advert(
                    f"ghost{rounds % 100:02d}-{a:02d}", args.job, dead, port + a,
                    PROTOCOL_VERSION, args.fingerprint, 0, "forming"))
                    for a in range(args.adverts)]
                rounds += 1
                next_refresh = time.monotonic() + args.refresh
            idle.reap()
            idle.fill()
            now = time.monotonic()
            asks_owed += (now - last) * args.door_asks
            last = now
            while asks_owed >= 1.0:
                asks_owed -= 1.0
                for target in targets:
                    asks += _send_ask(door, target)
            if time.monotonic() >= next_report:
                next_report += 1.0
                print(json.dumps({"open": len(idle.open), "established": idle.established(),
                                  "reopened": idle.reopened, "door_asks": asks,
                                  "advert_rounds": rounds, "adverts": len(announcers)}),
                      flush=True)
            time.sleep(0.05)
        for announcer in announcers:
            announcer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
