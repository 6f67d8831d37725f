"""Layers 0-2, how bytes move: the wire format (`wire`, pure), job keys (`security`, pure), the
ZeroMQ transport (`transport`, the only zmq importer), shared-memory lanes between nodes of one host
(`shm`) and the mailbox that routes received messages (`mailbox`).

May import: `ringtrain.errors`, `ringtrain.config`, numpy, zmq (transport only).
"""
