"""Layers 0 and 2, the ring: its math with no I/O (`plan`: order, chunks, segments, hops),
gradient codecs (`compression`, pure) and the collectives that run a plan over the transport
(`collectives`).

May import: `ringtrain.errors`, `ringtrain.config`, `ringtrain.comm`, numpy.
"""
