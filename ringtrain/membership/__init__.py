"""Who is in the ring: leaderless agreement on views and generations, heartbeats and failure
suspicion, as a pure state machine (layer 0): `protocol` (its inputs and shared state) and
its parts `choice` (the view to propose), `heartbeats`, `installing` (installing and leaving
views) and `agreement` (Paxos, first views), over `views`, `peers` and `messages`. Layer 2:
`links` wires it to the node's sockets (HELLO, WELCOME, the wire form) and `dialling` dials
the candidates a node learns.

May import: `ringtrain.errors`, `ringtrain.config`, `ringtrain.comm`, numpy.
"""
