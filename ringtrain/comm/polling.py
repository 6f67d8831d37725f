"""What a node's sockets wait on: :class:`SocketPoller`, two poll sets over the listening
socket, the outgoing links, watched descriptors and a wake, and what the last poll found
readable (for ``transport``)."""

from __future__ import annotations

import math
import socket
import threading

import zmq

from ..errors import TransportError

POLLIN, POLLOUT = int(zmq.POLLIN), int(zmq.POLLOUT)  # plain ints: enum flags' & is slow


class SocketPoller:
    """What a node's sockets wait on, and what the last poll found readable. Not thread-safe,
    except :meth:`wake`.

    Two poll sets: everything (the listening socket, outgoing links, watched descriptors,
    the wake), and data only, what a collective waits for: data comes to the listening
    socket or a door, never on a link (links bring replies to membership, read at its next
    turn). Each zmq socket polled costs system calls, and a ring of N has N-1 links.

    Args:
        router: the listening socket.
    """

    def __init__(self, router: zmq.Socket):
        # a plain socket pair: one write wakes the poll, cheaper than a zmq send
        self._wake_in, self._wake_out = socket.socketpair()
        self._wake_in.setblocking(False)
        self._wake_out.setblocking(False)
        self._wake_lock = threading.Lock()
        self._wake_fd = self._wake_in.fileno()
        self._all = zmq.Poller()
        self._data = zmq.Poller()
        for poller in (self._all, self._data):
            poller.register(router, zmq.POLLIN)
            poller.register(self._wake_fd, zmq.POLLIN)
        self.ready: list[zmq.Socket] = []  # sockets the last look found readable, unread
        self.ready_fds: set[int] = set()  # watched descriptors the last look found readable

    def add_link(self, sock: zmq.Socket) -> None:
        """Watch an outgoing link (in the full set only)."""
        self._all.register(sock, zmq.POLLIN)

    def remove_link(self, sock: zmq.Socket) -> None:
        """Forget an outgoing link that is closing, and anything it had ready."""
        if sock in self.ready:
            self.ready.remove(sock)
        self._all.unregister(sock)

    def watch(self, fd: int) -> None:
        """Watch file descriptor ``fd`` in both sets."""
        self._all.register(fd, zmq.POLLIN)
        self._data.register(fd, zmq.POLLIN)

    def wait(self, timeout: float, writable: zmq.Socket | None, links: bool
             ) -> tuple[bool, bool]:
        """Block until something is readable, ``writable`` can take a message, a wake, or
        timeout, using up a wake; ``links=False`` polls the data set only.

        Returns:
            (readable, can_send), as :meth:`Transport.wait`.
        """
        poller = self._all if links else self._data
        if writable is not None:
            if links:
                poller.modify(writable, zmq.POLLIN | zmq.POLLOUT)
            else:
                poller.register(writable, zmq.POLLOUT)
        try:
            return self._poll(poller, timeout, writable, wakes=True)
        finally:
            if writable is not None:
                if links:
                    poller.modify(writable, zmq.POLLIN)
                else:
                    poller.unregister(writable)

    def look(self) -> bool:
        """Poll everything without blocking, leaving a wake for the next wait. Returns
        whether anything is readable."""
        return self._poll(self._all, 0.0, None, wakes=False)[0]

    def _poll(self, poller: zmq.Poller, timeout: float, writable: zmq.Socket | None,
              wakes: bool) -> tuple[bool, bool]:
        """One poll; remembers what is readable. ``wakes``: use up a pending wake."""
        try:
            events = poller.poll(max(0, math.ceil(timeout * 1000)))
        except zmq.ZMQError as exc:
            raise TransportError(f"poll failed: {exc}") from exc
        ready, fds, can_send = [], set(), False
        for source, flags in events:
            if source is writable and flags & POLLOUT:
                can_send = True
            if not flags & POLLIN:
                continue
            if source == self._wake_fd:
                if wakes:
                    self._clear_wakes()
            elif isinstance(source, zmq.Socket):
                ready.append(source)
            else:
                fds.add(source)
        self.ready, self.ready_fds = ready, fds
        return bool(ready or fds), can_send

    def _clear_wakes(self) -> None:
        """Take the pending wakes off the wake socket."""
        try:
            self._wake_in.recv(4096)  # any more (a wake since) just ends the next wait early
        except (BlockingIOError, InterruptedError):
            pass

    def wake(self) -> None:
        """Interrupt a :meth:`wait` in progress. Safe from any thread."""
        with self._wake_lock:
            try:
                self._wake_out.send(b"\0")
            except OSError:
                pass  # full: a wake is already pending; closed: nobody waits any more

    def close(self) -> None:
        """Close the wake socket pair."""
        with self._wake_lock:
            self._wake_out.close()
        self._wake_in.close()
