"""Networks and losses, one file per method, built by name from config.

Importing the package registers every member.
"""

from models import losses, mff, recipes, sbi_fed, sjedd, sladd, sta  # noqa: F401  (registration side effects)
from models.losses import build_criterion
from models.registry import build_model, build_train_data, check_train_data

__all__ = ["build_criterion", "build_model", "build_train_data", "check_train_data"]
