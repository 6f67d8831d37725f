"""Layer 4, training on a node: numpy models (`nn`), optimizers (`optim`), sample sharding
(`sharding`), checkpoints (`checkpoint`), the bundled data (`datasets`) and the elastic
`Trainer` with its distributed optimizer (`trainer`).

May import: every lower layer; never the CLI, benchmarks or lab.
"""

from .trainer import (
    DistributedOptimizer,
    ModelVersion,
    NonFiniteGradientError,
    StepReport,
    Trainer,
    check_agreement,
    schema_of,
    training_facts,
)

__all__ = ["DistributedOptimizer", "ModelVersion", "NonFiniteGradientError", "StepReport",
           "Trainer", "check_agreement", "schema_of", "training_facts"]
