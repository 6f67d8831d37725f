"""Layer 2, who is in the ring: leaderless agreement on views and generations, heartbeats
and failure suspicion (`protocol`, pure); `links` wires it to the node's sockets (HELLO,
WELCOME, the wire form) and `dialling` dials the candidates a node learns.

May import: `ringtrain.errors`, `ringtrain.config`, `ringtrain.comm`, numpy.
"""
