"""The handle of a collective started with one of a node's ``*_async`` methods (:class:`Work`)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import CollectiveTimeout
from ..ring.collectives import Collective

Builder = Callable[[int, int], Collective]  # (rank, world_size) -> collective


class Work:
    """A collective started with an ``*_async`` method. :meth:`wait` returns its result."""

    def __init__(self, build: Builder, timeout: float, step: int, spin: float = 0.0,
                 generation: int | None = None, members: tuple[str, ...] = ()):
        self.build = build
        self.timeout = timeout
        self.step = step
        self.generation = generation  # the view it was started in (None: before any)
        # that view's members in rank order: a collective that succeeded ran in exactly that
        # view (the executor fails one whose view changed), so its rows are these members',
        # whatever view the node holds by the time the caller reads them
        self.members = members
        self._spin = spin  # seconds wait() yields before it sleeps (Settings.spin_seconds)
        # a latch: held until the engine finishes the work (cheaper to wake than an Event,
        # which a small collective felt); every waiter passes it back on
        self._latch = threading.Lock()
        self._latch.acquire()
        self._finished = False
        self._result: Any = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        """Whether the collective has finished (successfully or not)."""
        return self._finished

    def wait(self, timeout: float | None = None) -> Any:
        """The collective's result, waiting at most ``timeout`` seconds (default: the
        collective's own timeout plus a second).

        Raises:
            CollectiveTimeout: the result did not come in time.
            CollectiveError: the collective failed on this node.
        """
        limit = self.timeout + 1.0 if timeout is None else timeout
        spin_until = time.monotonic() + min(self._spin, limit)
        while not self._finished and time.monotonic() < spin_until:
            os.sched_yield()
        if not self._latch.acquire(timeout=max(0.0, limit)):
            raise CollectiveTimeout(f"collective still running after {limit:.1f} s")
        self._latch.release()
        if self._error is not None:
            raise self._error
        return self._result

    def _finish(self, result: Any = None, error: BaseException | None = None) -> None:
        if self._finished:
            return  # the first outcome stands
        self._result, self._error = result, error
        self._finished = True
        self._latch.release()
