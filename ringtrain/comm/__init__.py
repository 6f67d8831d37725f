"""Layers 0-2, how bytes move: the wire format (`wire`, pure), job keys (`security`, pure),
endpoints as text (`endpoints`, pure), the ZeroMQ side (`transport`: the sockets of a node;
`zap`: the key check and connection budgets at its door; `handshakes`: how far our handshakes
with a peer got; `curve`: CURVE key pairs), shared-memory lanes between nodes of one host
(`shm`) and the mailbox that routes received messages (`mailbox`).

May import: `ringtrain.errors`, `ringtrain.config`, numpy, zmq (transport, zap, handshakes and
curve only).
"""
