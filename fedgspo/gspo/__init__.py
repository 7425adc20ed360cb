"""The RL algorithm: GSPO loss, rollouts, the policy model, tasks and reward functions.

Imports nothing else of fedgspo. Importing the package loads the loss only (torch); the
rollout, model, task and reward modules load transformers and are imported by name.
"""

from fedgspo.gspo.loss import GSPOStats, group_advantages, gspo_loss, gspo_loss_and_stats

__all__ = ["GSPOStats", "group_advantages", "gspo_loss", "gspo_loss_and_stats"]
