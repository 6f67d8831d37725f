"""Registers ``ringtrain`` as a torch.distributed backend, so that an unchanged torchrun script
runs with ``init_process_group(backend="ringtrain")``.

How it is reached: the package declares a ``torch.backends`` entry point, which torch loads
at ``import torch`` (unless ``TORCH_DEVICE_BACKEND_AUTOLOAD=0``; then ``import
ringtrain.integrations.torch`` registers it). :func:`register` only registers names: no
socket opens and nothing of the node layer runs at ``import torch``, except in a process run
by ``ringtrain node``, which also starts the local rendezvous store the script's
``env://`` initialisation connects to (:func:`serve_rendezvous_store`).

The rendezvous is the ring. Under ``ringtrain node script.py`` the ring is formed before the
script starts, and the script sees it as torchrun's variables (RANK, WORLD_SIZE, ...;
:func:`ringtrain.node.launch.torchrun_environment`); torch's ``env://`` handshake then only
talks to a store on 127.0.0.1 in this very process (torchrun's agent store, which ringtrain's
collectives never use). A script started by hand can pass ``init_method="ringtrain://"``:
the node is then formed from ``RINGTRAIN_*`` variables, as :func:`ringtrain.join` does.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

BACKEND = "ringtrain"
_lock = threading.Lock()
_state: dict[str, Any] = {"registered": False, "store": None, "node": None}


def autoload() -> None:
    """The ``torch.backends`` entry point, run inside ``import torch``: :func:`register`, but
    a failure is logged, never raised (it would make ``import torch`` itself fail)."""
    try:
        register()
    except Exception:  # noqa: BLE001 - see above
        logging.getLogger(__name__).exception(
            "could not register the ringtrain torch.distributed backend; "
            "`import ringtrain.integrations.torch` says why")


def register() -> None:
    """Register the ``ringtrain`` backend and the ``ringtrain://`` init method (idempotent)."""
    import torch.distributed as dist
    from torch.distributed.rendezvous import register_rendezvous_handler

    with _lock:
        if not _state["registered"]:
            dist.Backend.register_backend(BACKEND, _create_group, devices=["cpu"])
            register_rendezvous_handler(BACKEND, _ring_rendezvous)
            _state["registered"] = True


def process_node() -> Any:
    """This process's node: the one ``ringtrain node`` formed, else one formed now from
    ``RINGTRAIN_*`` variables (and kept for the life of the process)."""
    node = _launched_node()
    if node is not None:
        return node
    with _lock:
        if _state["node"] is None:
            from ...node.launch import join
            _state["node"] = join()
        return _state["node"]


def _launched_node() -> Any:
    launch = sys.modules.get("ringtrain.node.launch")
    return None if launch is None else launch.launched_node()


def serve_rendezvous_store() -> dict[str, str]:
    """Start the store torch's ``env://`` handshake needs, on 127.0.0.1 in this process (as
    torchrun's agent hosts one), and return the variables that point the script at it."""
    from torch.distributed import TCPStore

    with _lock:
        if _state["store"] is None:
            _state["store"] = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                       timeout=timedelta(seconds=60))
        port = _state["store"].port
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "TORCHELASTIC_USE_AGENT_STORE": "True"}


def _create_group(store: Any, rank: int, world_size: int, timeout: timedelta) -> Any:
    """torch's creator hook: a process group over the current generation of the ring.

    torch calls it for ``init_process_group``, and for ``new_group`` where it does not hand
    that to the default group (:meth:`RingtrainProcessGroup.new_group`: a default group of
    another backend, or a torch without the hand-off): a group of part of the ring is
    refused here, only on its members (torch makes no call on the others).
    """
    import torch.distributed as dist

    from ...errors import ConfigError
    from .process_group import RingtrainProcessGroup, subset_refusal

    node = process_node()
    if dist.is_initialized() and (rank, world_size) != (node.rank, node.world_size):
        raise ConfigError(subset_refusal(f"a group of {world_size} with this node as rank "
                                         f"{rank}", node.world_size))
    if (rank, world_size) != (node.rank, node.world_size):
        logging.getLogger(__name__).warning(
            "init_process_group was given rank %d of %d; the ring has rank %d of %d "
            "(generation %d): the ring's values stand", rank, world_size, node.rank,
            node.world_size, node.generation)
    seconds = timeout.total_seconds() if timeout is not None else None
    return RingtrainProcessGroup(node, min(seconds, node.settings.collective_timeout)
                                 if seconds else None)


def _ring_rendezvous(url: str, timeout: timedelta = timedelta(minutes=30),
                     **_kwargs: Any) -> Iterator[tuple[Any, int, int]]:
    """``init_method="ringtrain://"``: the ring is the rendezvous; torch gets a store local
    to this process, which the ringtrain backend never uses."""
    import torch.distributed as dist

    node = process_node()
    yield dist.HashStore(), node.rank, node.world_size
    raise RuntimeError("ringtrain:// rendezvous has no second attempt; re-form the ring")
