"""Layer 2, who is in the ring: leaderless agreement on views and generations, heartbeats
and failure suspicion (`protocol`).

May import: `ringtrain.errors`, `ringtrain.config`, `ringtrain.comm`, numpy.
"""
