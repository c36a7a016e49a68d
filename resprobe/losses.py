"""Per-sample losses: the type of a user's loss, and when targets are class indices (accuracy defined)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

LossFn = Callable[[Tensor, Tensor], Tensor]  # (outputs, targets) -> per-sample losses [B]


def is_class_labels(labels: Tensor, logits: Tensor) -> bool:
    """Targets that are class indices of ``logits``' classes (accuracy is defined); a custom loss may
    take anything else (a teacher's logits, regression targets)."""
    return labels.dim() == 1 and not labels.is_floating_point() and not labels.is_complex() and logits.dim() == 2
