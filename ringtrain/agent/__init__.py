"""Jobs handed to idle devices: ``ringtrain agent`` waits in a pool ring, ``ringtrain
submit`` hands it a job (see :mod:`.protocol` for what travels and how agents are chosen,
:mod:`.pool` for the loop every pool member runs)."""

from .pool import AgentPool, JobOutcome, submit
from .protocol import JobRequest, PoolRow, assign

__all__ = ["AgentPool", "JobOutcome", "JobRequest", "PoolRow", "assign", "submit"]
