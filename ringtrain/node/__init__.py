"""Layer 3, the node: lifecycle and the engine thread that wires discovery, membership and
collectives together (`node`), and `join()` for scripts started by `ringtrain node` (`launch`).

May import: every lower layer (comm, ring, membership, discovery, errors, config).
"""
