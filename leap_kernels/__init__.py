"""leap-kernels: fused kernels for LEAP feature distillation.

Public API:
    fused_feature_loss      projection + MSE / token-normalized MSE, forward and backward fused
    token_normalized_mse    token-normalized MSE without the projection
    FeatureDistillationHead, TokenNormalizedMSELoss   nn.Module front-ends
    backends(), use_backend()                         which backends run here; force one
"""

from ._backends import ENV_BACKEND, BackendStatus, backends, use_backend
from .modules import FeatureDistillationHead, TokenNormalizedMSELoss
from .ops.feature_loss import fused_feature_loss
from .ops.naive import fused_feature_loss_reference, teacher_attention_reference, token_normalized_mse_reference
from .ops.teacher_attention import teacher_attention
from .ops.token_norm_mse import token_normalized_mse

__version__ = "0.1.0"

__all__ = [
    "ENV_BACKEND",
    "BackendStatus",
    "FeatureDistillationHead",
    "TokenNormalizedMSELoss",
    "backends",
    "fused_feature_loss",
    "fused_feature_loss_reference",
    "teacher_attention",
    "teacher_attention_reference",
    "token_normalized_mse",
    "token_normalized_mse_reference",
    "use_backend",
]
