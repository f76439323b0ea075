"""Knowledge distillation: losses, frozen teachers, feature capture, a step function, a
Lightning callback and the qat-train config (``KDConfig``)."""

from .callback import DistillationCallback
from .capture import FeatureCapture, feature_widths, first_tensor
from .config import KDConfig, build_distiller
from .loss import AttentionLoss, DistillationLoss, HiddenStateLoss, kd_kl_loss
from .step import Distiller, default_forward, default_mask, distill_step
from .teacher import FrozenTeacher, TeacherCache, load_state_dict_file, load_teacher

__all__ = [
    "DistillationLoss",
    "HiddenStateLoss",
    "AttentionLoss",
    "kd_kl_loss",
    "FrozenTeacher",
    "TeacherCache",
    "load_teacher",
    "load_state_dict_file",
    "FeatureCapture",
    "feature_widths",
    "first_tensor",
    "Distiller",
    "distill_step",
    "default_forward",
    "default_mask",
    "DistillationCallback",
    "KDConfig",
    "build_distiller",
]
