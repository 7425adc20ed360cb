"""fedgspo: Byzantine-robust distributed GSPO training on torch.distributed.

Public entry points:
    gspo_loss, group_advantages   the GSPO objective (fedgspo.gspo)
    robust_all_reduce             drop-in robust replacement for dist.all_reduce (fedgspo.robust)
"""

from fedgspo.gspo import group_advantages, gspo_loss
from fedgspo.robust import RobustReport, robust_all_reduce

__version__ = "0.1.0"

__all__ = ["gspo_loss", "group_advantages", "robust_all_reduce", "RobustReport", "__version__"]
