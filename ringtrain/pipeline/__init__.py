"""Model parallelism: a model's layers split over consecutive ring members, GPipe style,
beside data parallelism (several pipelines whose gradients are averaged)."""

from .partition import Partition, layer_costs, layer_memory, partition_layers
from .schedule import PipelineTrainer, StageInfo

__all__ = ["Partition", "PipelineTrainer", "StageInfo", "layer_costs", "layer_memory",
           "partition_layers"]
