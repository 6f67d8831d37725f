"""Layer 4, training on a node: numpy models (`nn`), optimizers (`optim`), sample sharding
(`sharding`), checkpoints (`checkpoint`), the bundled data (`datasets`) and the elastic
`Trainer` (`trainer`) with its seams: the synchronous step (`sync`), rounds for slow links
(`rounds`: DiLoCo, local SGD, asynchronous), the speed policy (`speed`), recovery and
checkpoints (`elastic`), the agreement check (`agreement`), learning-rate schedules
(`schedule`).

May import: every lower layer; never the CLI, benchmarks or lab.
"""

from .schedule import Cosine
from .trainer import (
    DiLoCo,
    DistributedOptimizer,
    ModelVersion,
    NonFiniteGradientError,
    StepReport,
    Trainer,
    check_agreement,
    schema_of,
    training_facts,
)

__all__ = ["Cosine", "DiLoCo", "DistributedOptimizer", "ModelVersion", "NonFiniteGradientError",
           "StepReport", "Trainer", "check_agreement", "schema_of", "training_facts"]
