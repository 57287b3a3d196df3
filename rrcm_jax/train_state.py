"""The one train state of every stage.

Pre-training fills every field; fine-tuning leaves the target network (and
BatchNorm statistics) out as None. Schedules read `step`; nothing else about
time is stored.
"""
from typing import Any

import flax.struct
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  step: Any                       # int32 scalar: optimizer steps taken
  params: Any                     # online parameters θ
  opt_state: Any
  batch_stats: Any = None         # BatchNorm statistics of the online network
  target_params: Any = None       # target network ξ (pre-training)
  target_batch_stats: Any = None
  # The fixed-rate "EMA model": parameters only, no BatchNorm statistics. The
  # reference's EMA model never moves its running statistics (it is never
  # called in training mode, and its EMA update averages parameters, not
  # buffers), and nothing reads them: fine-tuning, certification and the k-NN
  # monitor take its encoder without the projection head. Its BatchNorm
  # layers, if ever called in eval mode, take the online network's statistics.
  ema_params: Any = None

  @classmethod
  def create(cls, params, tx, batch_stats=None, with_target=False, with_ema=False):
    """All copies start equal to the online weights.

    docs/method.md, Target-network EMA schedule.
    """
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               batch_stats=batch_stats,
               target_params=params if with_target else None,
               target_batch_stats=batch_stats if with_target else None,
               ema_params=params if with_ema else None)
