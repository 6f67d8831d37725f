"""Layers 0 and 2, the ring: its math with no I/O (`plan`: order, chunks, segments, hops),
gradient codecs (`compression`, pure) and the collectives that run a plan over the transport
(`collectives`; `runner`, whose `plan_run` executes one collective's plan; `one_round`,
`link_probe`).

May import: `ringtrain.errors`, `ringtrain.config`, `ringtrain.comm`, numpy.
"""
