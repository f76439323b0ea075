"""Lightning glue: the QATModule and learning-rate schedules (``calibrate`` lives in
:mod:`qat.quant.calibrate`; re-exported here for old imports)."""

from ..quant.calibrate import calibrate
from .module import QATModule
from .schedules import constant, linear_warmup_decay

__all__ = ["QATModule", "calibrate", "linear_warmup_decay", "constant"]
