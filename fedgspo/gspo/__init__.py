"""The RL algorithm: GSPO loss, rollouts, the policy model, tasks and reward functions.

Imports nothing else of fedgspo. Importing the package loads the loss only (torch); the
model, data and reward modules load transformers or datasets and are imported by name.
"""

from fedgspo.gspo.loss import (
    GSPOStats,
    backward_in_micro_batches,
    group_advantages,
    gspo_loss,
    gspo_loss_and_stats,
)

__all__ = ["GSPOStats", "backward_in_micro_batches", "group_advantages", "gspo_loss", "gspo_loss_and_stats"]
