"""PyTorch through ringtrain (``pip install -e '.[torch]'``; see the README for the CPU wheel).

Two ways in:

- the ``ringtrain`` torch.distributed backend: ``dist.init_process_group("ringtrain")`` in an
  unchanged torchrun/DDP script run by ``ringtrain node script.py`` (:mod:`.backend`,
  :mod:`.process_group`), with :mod:`.elastic` to carry on when devices die or join and
  :mod:`.hooks` for the ring's int8 codec as a DDP communication hook and
  :mod:`.diloco` for DiLoCo rounds on slow links;
- :class:`DataParallel`, which averages a model's gradients over a :class:`~ringtrain.Node`
  the caller holds (:mod:`.data_parallel`).

Importing this package registers the backend (torch also loads it at ``import torch``
through the ``torch.backends`` entry point).
"""

from .backend import register
from .data_parallel import DataParallel

__all__ = ["DataParallel", "register"]

try:
    register()
except ImportError:  # no torch: DataParallel says which extra to install when used
    pass
