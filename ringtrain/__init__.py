"""ringtrain: train one model together on the devices you already have.

Nodes on one LAN find each other, agree on a ring with no leader, and average gradients by
ring-allreduce over ZeroMQ. Start here: :class:`Node`.
"""

from .comm.security import JobKey, read_key_file, write_key_file
from .config import Settings
from .errors import (
                     CollectiveError,
                     CollectiveTimeout,
                     ConfigError,
                     MembershipError,
                     MismatchError,
                     PeerFailedError,
                     ProtocolError,
                     RingtrainError,
                     SecurityError,
                     TransportError,
)
from .node.launch import join
from .node.node import Node, Work

__version__ = "0.1.0"

__all__ = [
    "CollectiveError", "CollectiveTimeout", "ConfigError", "MembershipError", "MismatchError",
    "Node", "PeerFailedError", "ProtocolError", "RingtrainError", "SecurityError", "Settings",
    "TransportError", "Work", "JobKey", "join", "read_key_file", "write_key_file",
    "__version__",
]
