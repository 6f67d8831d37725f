"""Layer 3, the node: :class:`~ringtrain.node.node.Node`, its public collectives and lifecycle
(`node`, the collective calls in `collective_calls`, their `Work` handles in `work`); the engine
thread that alone touches the sockets (`engine`), running collectives (`executor`) and ordering
the ring by measured links (`ring_order`); its parts wired together (`parts`, `names`), peers
from mDNS and DNS (`peer_sources`), admission of device keys (`gate`), wrong-key evidence
(`wrong_key`); and `join()` for scripts started by `ringtrain node` (`launch`).

May import: every lower layer (comm, ring, membership, discovery, errors, config).
"""
