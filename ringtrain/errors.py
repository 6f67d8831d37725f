"""The errors ringtrain raises. Catch :class:`RingtrainError` to catch them all.

    RingtrainError
    ├── ConfigError            bad argument, flag or environment variable (a user mistake)
    ├── ProtocolError          a peer's bytes broke the wire format (field, expected, got, peer)
    ├── TransportError         a socket could not be bound, connected or used
    ├── CollectiveError        a collective did not complete; nothing was applied
    │   ├── MismatchError      members called a collective with different shape, dtype or op
    │   ├── PeerFailedError    a member died, stalled or left during the collective
    │   └── CollectiveTimeout  the collective missed its deadline
    ├── MembershipError        the ring could not be formed (too few nodes, job mismatch, ...)
    └── SecurityError          a key is missing, malformed or refused

Every error carries the context a user needs to act: which peer, which generation, which step.
"""

from __future__ import annotations


class RingtrainError(Exception):
    """Base of every error ringtrain raises."""


class ConfigError(RingtrainError, ValueError):
    """An argument, flag or environment variable has a value ringtrain cannot use."""


class ProtocolError(RingtrainError):
    """A message does not follow the wire format.

    Attributes:
        field: the header field (or frame) that was wrong.
        expected: what the decoder expected, as text.
        got: what it found, as text.
        peer: who sent it, when known.
    """

    def __init__(self, field: str, expected: object, got: object, peer: str | None = None):
        self.field = field
        self.expected = expected
        self.got = got
        self.peer = peer
        origin = f" from peer {peer}" if peer else ""
        super().__init__(f"bad message{origin}: field {field!r} expected {expected}, got {got}")


class TransportError(RingtrainError):
    """A socket operation failed (bind, connect, send or receive)."""


class CollectiveError(RingtrainError):
    """A collective did not complete on this node; its result was not produced.

    Attributes:
        generation: the membership generation the collective ran in.
        collective: the collective's sequence number within that generation.
    """

    def __init__(self, message: str, *, generation: int = 0, collective: int = 0):
        self.generation = generation
        self.collective = collective
        super().__init__(message)


class MismatchError(CollectiveError):
    """Members called the same collective with different shapes, dtypes or operations."""


class PeerFailedError(CollectiveError):
    """A member failed (died, stalled, left or sent garbage) during a collective.

    Attributes:
        peer: the failed member's node id, when known.
    """

    def __init__(self, message: str, *, peer: str | None = None, generation: int = 0,
                 collective: int = 0):
        self.peer = peer
        super().__init__(message, generation=generation, collective=collective)


class CollectiveTimeout(CollectiveError, TimeoutError):
    """A collective missed its deadline."""


class MembershipError(RingtrainError):
    """The ring could not be formed or changed."""


class SecurityError(RingtrainError):
    """A key is missing, malformed or not authorised."""
