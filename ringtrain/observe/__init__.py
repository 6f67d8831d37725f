"""Seeing what a ring does: the flight recorder every node keeps, the status protocol behind
``ringtrain status``, metrics and timelines, the analysis behind ``ringtrain doctor``, and
the checks of "why can't I see my peer".

Lower layers hold only the recorder (fed by the collective runner and the node); the rest is
used by the command line.
"""
