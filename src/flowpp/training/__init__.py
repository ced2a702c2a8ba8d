"""Training: a short loop (:mod:`.loop`) over named pieces with one job each.

- :mod:`.settings`: :class:`TrainSettings`, everything about a run but the model config;
- :mod:`.state`: :class:`TrainState`, the counters a checkpoint saves;
- :mod:`.step`: :class:`OptimizerStep` (forward, backward, clipping; Adam and the :class:`EMA`);
- :mod:`.guard`: :class:`DivergenceGuard`, the one judge of health (apply / skip / roll back / stop);
- :mod:`.events`: :class:`Events`, what is due after a step (metrics row, evaluation, checkpoint,
  early stop) on rank 0's clock.

Around them: the batches and their noise in :mod:`flowpp.data.batches`, checkpoints and the
metrics file in :mod:`flowpp.runs`, the rank agreement in :mod:`flowpp.distributed`, the
evaluation in :mod:`flowpp.evaluate`, the learning rate and the budget in :mod:`flowpp.schedules`.
"""

from .events import Events, Every, StopSignal
from .guard import DivergenceGuard, health_problem, recovery_steps, weights_problem
from .loop import Trainer, finish_training, start_training, train
from .settings import TrainingDiverged, TrainSettings
from .state import TrainState
from .step import EMA, OptimizerStep, backward_and_clip, ema_update, make_optimizer, parameter_norm, train_step

__all__ = [
    "train",
    "start_training",
    "finish_training",
    "Trainer",
    "TrainSettings",
    "TrainState",
    "TrainingDiverged",
    "DivergenceGuard",
    "health_problem",
    "weights_problem",
    "recovery_steps",
    "Events",
    "Every",
    "StopSignal",
    "EMA",
    "OptimizerStep",
    "backward_and_clip",
    "ema_update",
    "make_optimizer",
    "parameter_norm",
    "train_step",
]
