"""The ring's codecs inside DDP, as a communication hook::

    ddp.register_comm_hook(hooks.RingCodecState(), hooks.ring_codec_hook)        # int8

Each gradient bucket is averaged by the node's compressed all-reduce: int8 with one float32
scale per segment and error feedback (what rounding left out of a bucket joins that bucket's
next all-reduce), so every link carries about a quarter of the bytes. Every member decodes
the same bytes, so all hold the same averaged gradient. Needs the ``ringtrain`` backend (the
hook talks to the group's node); float buckets only (DDP's are).
"""

from typing import Any

import torch
import torch.distributed as dist

from ...errors import ConfigError
from ...ring.compression import Codec, get_codec
from .process_group import RingtrainProcessGroup


class RingCodecState:
    """The hook's state: the codec name and one codec (one error-feedback residual) per
    bucket index.

    Args:
        codec: a ring codec name (``int8``, ``fp16``, ...; see ``ringtrain.ring.compression``).
        group: the process group (default: the default group, which must be ``ringtrain``).
    """

    def __init__(self, codec: str = "int8", group: Any = None):
        self.codec = codec
        self.group = group
        self.codecs: dict[int, Codec] = {}
        if get_codec(codec) is None:
            raise ConfigError(f"{codec!r} is not a compressing codec")

    def codec_for(self, bucket: int) -> Codec:
        if bucket not in self.codecs:
            self.codecs[bucket] = get_codec(self.codec)  # type: ignore[assignment]
        return self.codecs[bucket]


# real annotations, not strings: DDP's register_comm_hook checks them
def ring_codec_hook(state: RingCodecState, bucket: dist.GradBucket
                    ) -> torch.futures.Future[torch.Tensor]:
    """Average ``bucket`` over the ring with the state's codec (a DDP communication hook)."""
    group = state.group or dist.distributed_c10d._get_default_group()
    if not isinstance(group, RingtrainProcessGroup):
        raise ConfigError("ring_codec_hook needs init_process_group('ringtrain')")
    tensor = bucket.buffer()
    codec = state.codec_for(bucket.index())
    array = tensor.detach().numpy()
    return group.start_compressed_mean(tensor, array, codec)

