"""EM + APL, entropy maximisation with asymmetric pseudo-labelling of negatives (Zhou et al. 2022).

After every epoch e ≥ W (warm-up), one inference pass over the training set (model.eval(), the train
loader, as in the official code) picks, per class i, the int(θ·U_i/(E − W)) still-unknown entries with
the lowest predicted probability, where U_i is the number of unknowns of class i in the *initial*
observed labels and E is the official code's epoch count (``quota_epochs``, 10: the quota keeps the
authors' arithmetic when our protocol trains longer; rounds then go on until the candidates run out). Those become soft negatives with target s = their probability at labelling time,
trained with β·BCE(f; s). Labels accumulate over rounds, so about θ of the unknowns are labelled over
the E − W rounds that affect training (the official round after the last epoch, which changes
nothing, is skipped). State: the pseudo-label mask and soft targets, keyed by training row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch

from pipeline.config import Range
from pipeline.contracts import StepOutput
from pipeline.errors import SpmlError
from pipeline.methods import Method, register_method
from pipeline.methods.losses import apl_quota, em_loss, lowest_k_per_class
from pipeline.methods.sync import all_reduce_


@register_method("em-apl")
class EntropyMaximisationAPL(Method):
    schedules: ClassVar[dict[str, str]] = {"warmup": "epochs", "quota_epochs": "epochs"}

    @dataclass
    class Params:
        alpha: Annotated[float, Range(ge=0)]  # weight of the entropy term on the remaining unknowns
        beta: float  # weight of the soft pseudo-negative BCE
        theta: float  # fraction of the initial unknowns pseudo-labelled over all rounds
        warmup: int  # W: the first round runs after epoch W (VOC's value)
        quota_epochs: int  # E of the quota: the official code's 10 epochs (mapped to the run like W)

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        p = self.params
        if not 1 <= p.warmup < min(ctx.epochs, p.quota_epochs):
            raise SpmlError(f"method_params.em-apl.warmup must be in [1, min(train.epochs, quota_epochs)) = "
                            f"[1, {min(ctx.epochs, p.quota_epochs)}), got {p.warmup}")
        if not 0 <= p.theta <= 1 or p.beta < 0:
            raise SpmlError(f"method_params.em-apl: theta must be in [0, 1] and beta >= 0, got "
                            f"theta={p.theta}, beta={p.beta}")
        self.initial_unknown = (ctx.observed_train <= 0).sum(dim=0)  # U_i (no observed negatives in SPML)
        self.quota = apl_quota(self.initial_unknown, p.theta, p.quota_epochs, p.warmup)
        shape = ctx.observed_train.shape
        self.pseudo_mask = torch.zeros(shape, dtype=torch.bool, device=ctx.device)
        self.pseudo_target = torch.zeros(shape, dtype=torch.float32, device=ctx.device)

    def on_epoch_start(self, epoch):
        self._labelled_this_epoch = bool(self.pseudo_mask.any())

    def epoch_diagnostics(self):
        if not hasattr(self, "_labelled_this_epoch"):  # no epoch ran
            return {}
        # before the first round every unknown is "flagged": mark those epochs inactive for the report
        return {"fn_active": float(self._labelled_this_epoch)}

    def training_step(self, model, batch, epoch):
        logits = model(batch.image).logits
        mask, target = self.pseudo_mask[batch.index], self.pseudo_target[batch.index]
        loss = em_loss(logits, batch.positives, self.params.alpha, mask, target, self.params.beta)
        # "flagged" = unknowns not (yet) taken as negatives, as IGNORE's ignored entries; the loop scores the
        # pseudo-negatives' false-negative share as apl_pseudo_negative_error
        return StepOutput(loss, {"apl_labelled_fraction": mask.float().mean()}, flagged=~mask,
                          fn_share={"apl_pseudo_negative_error": mask})

    @torch.no_grad()
    def on_epoch_end(self, epoch, model, batches):
        if epoch < self.params.warmup or epoch >= self.ctx.epochs:
            return
        was_training = model.training
        model.eval()
        probs = torch.zeros_like(self.pseudo_target)
        scored = torch.zeros(len(probs), device=probs.device)
        for batch in batches:
            probs[batch.index] = torch.sigmoid(self.predict(model, batch.image).float())
            scored[batch.index] = 1.0
        model.train(was_training)
        # DDP: each rank scored its shard; sum the shards (a row scored on two ranks is averaged)
        all_reduce_(probs.mul_(scored.unsqueeze(1)))
        all_reduce_(scored)
        probs /= scored.clamp(min=1).unsqueeze(1)
        candidates = (self.ctx.observed_train == 0) & ~self.pseudo_mask & (scored > 0).unsqueeze(1)
        chosen = lowest_k_per_class(probs, candidates, self.quota)
        self.pseudo_target[chosen] = probs[chosen]
        self.pseudo_mask |= chosen

    def state_dict(self):
        return {"pseudo_mask": self.pseudo_mask, "pseudo_target": self.pseudo_target}

    def load_state_dict(self, state):
        if "pseudo_mask" in state:
            self.pseudo_mask.copy_(state["pseudo_mask"].to(self.pseudo_mask.device))
            self.pseudo_target.copy_(state["pseudo_target"].to(self.pseudo_target.device))

    def describe(self):
        return {**super().describe(), "pseudo_labels_per_round": int(self.quota.sum())}
