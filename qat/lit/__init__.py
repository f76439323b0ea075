"""Lightning glue: the QATModule, learning-rate schedules and post-training quantization."""

from .module import QATModule
from .ptq import calibrate
from .schedules import constant, linear_warmup_decay

__all__ = ["QATModule", "calibrate", "linear_warmup_decay", "constant"]
