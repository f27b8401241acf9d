"""Knowledge distillation while fine-tuning (``finetune.distill=true``): the compressed model
(the student) learns the dense model's outputs (the teacher's) besides the labels, which
recovers more of the dense accuracy than the labels alone (Hinton et al. 2015, "Distilling
the knowledge in a neural network")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compaware.config import FinetuneConfig


class Distillation:
    """The fine-tuning loss with a teacher: (1 − w)·CE(student, y) + w·T²·KL(softmax(teacher/T)
    ‖ softmax(student/T)), with T = ``finetune.temperature`` and w = ``finetune.distill_weight``.
    T² keeps the soft term's gradients at the scale of the hard one's as T grows.

    The teacher runs in eval mode without gradients on the student's batch, so it is a fixed
    function of the batch: a resumed fine-tuning sees the same targets.
    """

    def __init__(self, teacher: nn.Module, options: FinetuneConfig) -> None:
        self.teacher = teacher.eval()
        self.temperature = options.temperature
        self.weight = options.distill_weight

    def loss(self, logits: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """The loss of the student's ``logits`` on the batch ``x`` with labels ``y``."""
        with torch.no_grad():
            targets = self.teacher(x).float()
        t = self.temperature
        soft = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(targets / t, dim=1),
                        reduction="batchmean", log_target=True)
        return (1 - self.weight) * F.cross_entropy(logits, y) + self.weight * t * t * soft
