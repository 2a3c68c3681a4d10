"""Mean Teacher (Tarvainen and Valpola 2017), the paper's "MT" baseline on the U-Net backbone."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..losses import alpha_schedule
from .augment import gaussian_noise
from .base import Method, TrainingBatch, combine_losses


def mean_probabilities(model: nn.Module, outputs: list[torch.Tensor]) -> torch.Tensor:
    """The mean of the segmentation decoders' probabilities (one decoder for the U-Net)."""
    probs = [model.probabilities(o.float()) for o in outputs]
    return probs[0] if len(probs) == 1 else torch.stack(probs).mean(0)


class MeanTeacherMethod(Method):
    """A student (the trained network) and a teacher, the exponential moving average of the student.

    ``loss = Dice(student(x_l + n)) + w(step) * MSE(p_student(x_u + n'), p_teacher(x_u + n''))``, where the
    ``n`` are independent Gaussian noise draws (``noise_std``) and ``w`` ramps up to
    ``consistency_weight`` with the alpha schedule's shape over ``alpha_rampup`` of training. After every
    optimiser step the teacher follows ``theta_t <- d theta_t + (1 - d) theta_s`` with
    ``d = min(ema_decay, 1 - 1 / (step + 1))`` (the original code's warm-up: early on the teacher tracks
    the student closely).

    The teacher is a deep copy of the network held by the method (created from the student at the first
    :meth:`loss` call, moved to the student's device whenever they differ), with ``requires_grad=False``;
    it is not part of the network, so the optimiser never sees it and the saved model is the student.
    ``--alpha`` is not used: MisMatch's 0.002 would make the term negligible here.
    """

    name = "mt"
    architecture = "unet"
    uses_unlabelled = True

    def __init__(self, architecture: str = "unet", consistency_weight: float = 0.1, ema_decay: float = 0.99,
                 noise_std: float = 0.1, alpha_rampup: float = 0.4, **_ignored):
        super().__init__(architecture, consistency_weight=consistency_weight, ema_decay=ema_decay,
                         noise_std=noise_std, alpha_rampup=alpha_rampup)
        self.consistency_weight = consistency_weight
        self.ema_decay = ema_decay
        self.noise_std = noise_std
        self.alpha_rampup = alpha_rampup
        self.teacher: nn.Module | None = None

    def _teacher_for(self, model: nn.Module) -> nn.Module:
        model = getattr(model, "module", model)  # the bare network under a DistributedDataParallel wrapper
        if self.teacher is None:
            self.teacher = copy.deepcopy(model)
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        device = next(model.parameters()).device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        self.teacher.train(model.training)
        return self.teacher

    def loss_terms(self, model: nn.Module, batch: TrainingBatch) -> dict[str, torch.Tensor]:
        """``supervised`` and ``consistency`` (unweighted) tensors."""
        teacher = self._teacher_for(model)
        n_l = batch.n_labelled
        outputs = model(gaussian_noise(batch.inputs(), self.noise_std))
        terms = {"supervised": batch.supervised(outputs)}
        if batch.unlabelled_x is not None:
            with torch.no_grad():
                target = mean_probabilities(teacher, teacher(gaussian_noise(batch.unlabelled_x, self.noise_std)))
            student = mean_probabilities(model, [o[n_l:] for o in outputs])
            terms["consistency"] = torch.mean((student - target) ** 2)
        return terms

    def weight(self, batch: TrainingBatch) -> float:
        return alpha_schedule(batch.step, batch.total_steps, self.consistency_weight, self.alpha_rampup)

    def loss(self, model: nn.Module, batch: TrainingBatch) -> tuple[torch.Tensor, dict[str, float]]:
        t = self.loss_terms(model, batch)
        w = self.weight(batch)
        extra = [("consistency", t["consistency"], w)] if "consistency" in t else []
        loss, out = combine_losses(t["supervised"], *extra)
        out["weight"] = w
        return loss, out

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.teacher is None:
            return {}
        return {f"teacher.{k}": v.detach().cpu().clone() for k, v in self.teacher.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], model: nn.Module) -> None:
        teacher_state = {k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")}
        if teacher_state:
            self._teacher_for(model).load_state_dict(teacher_state)

    def ema_decay_at(self, step: int) -> float:
        return min(self.ema_decay, 1.0 - 1.0 / (step + 1))

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        model = getattr(model, "module", model)
        teacher = self._teacher_for(model)
        d = self.ema_decay_at(step)
        for t, s in zip(teacher.parameters(), model.parameters()):
            t.mul_(d).add_(s.detach(), alpha=1 - d)
        for t, s in zip(teacher.buffers(), model.buffers()):
            t.copy_(s)
