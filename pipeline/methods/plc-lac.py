"""PLC + LAC (Xie et al. 2022, stage 2 of SPML-LAC): AN + pseudo-labelling consistency + label-aware
global consistency on Query2Label's label-wise embeddings.

Per step, the weak and strong views go through the network as one batch of 2B (Q2L's frozen BatchNorm
makes that exact). With y the observed positives and (m, t) PLC's confident mask and hard targets at
threshold tau (:func:`pipeline.methods.losses.plc_targets`):

* L_an = mean BCE(z_w, y); L_plc = sum m BCE(z_s, t) / sum m (shared with the ``plc`` method);
* every (image n, class c) with t[n, c] = 1 (observed positives and pseudo-positives) contributes the pair
  [e^w_nc, e^s_nc] of L2-normalised projected embeddings (the model's projector, d -> d -> ``proj_dim``)
  with class id c + 1 to a memory queue of ``queue_size`` slots (:func:`queue_update`, the official
  pointer rule: with M new items, p <- M if p + M >= Q else p + M, and the items go to [p - M, p); older
  entries are detached constants, the current ones carry gradient; id 0 marks an empty slot);
* L_lac = SupCon over every valid queue embedding (:func:`lac_loss`, temperature T, no base temperature):
  each embedding is an anchor, its positives are the other embeddings of the same class (its other view
  included), its denominator all other valid embeddings;
* loss = L_an + lambda_plc L_plc + lambda_lac L_lac.

The official code runs two trainings (stage 1: AN + PLC at tau = 0.6; stage 2, started from stage 1's best
model: AN + PLC + LAC at tau = 0.9, fresh EMA and LR schedule). Here one run does both: the first
``stage1_epochs`` epochs are stage 1 (no LAC, ``stage1_threshold``), the rest stage 2. The official EMA
of the weights is not part of this method. Everything in the step is sync-free (fixed-size queue with
masks, no boolean indexing). Under DDP each rank keeps its own queue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from pipeline.contracts import StepOutput
from pipeline.errors import SpmlError
from pipeline.methods import Method, register_method
from pipeline.methods.losses import plc_loss, plc_targets


def queue_update(feats: torch.Tensor, labels: torch.Tensor, ptr: torch.Tensor, new_feats: torch.Tensor,
                 selected: torch.Tensor, class_ids: torch.Tensor):
    """Write the selected rows of ``new_feats`` (K, 2, D) into the queue (Q, 2, D) by the official rule.

    ``labels`` (Q,) long holds class id + 1 (0 = empty); ``ptr`` is a 0-d long tensor. Returns the new
    (feats, labels, ptr); the old entries are detached, the new ones keep their graph. If more than Q
    items arrive at once, only the first Q are stored (the official code would fail).
    """
    q = feats.shape[0]
    sel = selected.long()
    m = sel.sum()
    new_ptr = torch.where(ptr + m >= q, m, ptr + m)
    slot = new_ptr - m + sel.cumsum(0) - 1
    slot = torch.where(selected & (slot < q), slot, torch.full_like(slot, q))  # the rest go to a dump slot q
    dump = feats.new_zeros((1,) + tuple(feats.shape[1:]))
    out_feats = torch.cat([feats.detach(), dump]).index_put((slot,), new_feats.to(feats.dtype))
    out_labels = torch.cat([labels, labels.new_zeros(1)]).index_put((slot,), (class_ids + 1).to(labels.dtype))
    return out_feats[:q], out_labels[:q], new_ptr


def lac_loss(feats: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """SupCon over the valid queue entries: feats (Q, 2, D) L2-normalised, labels (Q,) with 0 = empty.

    mean over valid anchors a of -(1/|P(a)|) sum_{p in P(a)} log( exp(a.p/T) / sum_{b != a, valid} exp(a.b/T) ).
    0 when the queue holds no entry.
    """
    q, views, d = feats.shape
    z = feats.transpose(0, 1).reshape(views * q, d).float()
    lab = labels.repeat(views)
    valid = lab > 0
    sim = z @ z.T / temperature
    not_self = ~torch.eye(views * q, dtype=torch.bool, device=z.device)
    others = valid[None, :] & not_self
    denom_logits = sim.masked_fill(~others, float("-inf"))
    denom_logits = torch.where(others.any(dim=1, keepdim=True), denom_logits, torch.zeros_like(sim))
    log_prob = sim - torch.logsumexp(denom_logits, dim=1, keepdim=True)
    positives = others & (lab[None, :] == lab[:, None])
    n_pos = positives.sum(dim=1)
    per_anchor = -torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1) / n_pos.clamp(min=1)
    anchors = valid & (n_pos > 0)
    return (per_anchor * anchors).sum() / anchors.sum().clamp(min=1)


@register_method("plc-lac")
class PLCLAC(Method):
    needs_strong_view = True
    schedules: ClassVar[dict[str, str]] = {"stage1_epochs": "epochs"}

    @dataclass
    class Params:
        threshold: float  # tau of stage 2 (PLC targets and the LAC pairs)
        stage1_epochs: int  # first epochs without LAC (the official stage 1), at stage1_threshold
        stage1_threshold: float
        plc_weight: float  # lambda_plc
        lac_weight: float  # lambda_lac
        temperature: float  # T
        queue_size: int
        proj_dim: int  # projector output (label-wise embedding) size

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        p = self.params
        if not (0.5 < p.threshold <= 1 and 0.5 < p.stage1_threshold <= 1):
            raise SpmlError(f"method_params.plc-lac: threshold and stage1_threshold must be in (0.5, 1], got "
                            f"{p.threshold} and {p.stage1_threshold}")
        if p.temperature <= 0 or p.queue_size < 1 or p.proj_dim < 1 or min(p.plc_weight, p.lac_weight) < 0:
            raise SpmlError("method_params.plc-lac: temperature, queue_size and proj_dim must be positive and "
                            "the weights >= 0")
        dev = ctx.device
        self.queue_feats = torch.zeros(p.queue_size, 2, p.proj_dim, device=dev)
        self.queue_labels = torch.zeros(p.queue_size, dtype=torch.long, device=dev)
        self.queue_ptr = torch.zeros((), dtype=torch.long, device=dev)

    @classmethod
    def stage1_params(cls, params, epochs):
        # the official stage 1 is AN + PLC at stage1_threshold, no LAC: every epoch of this run in stage 1
        return {**params, "stage1_epochs": epochs}

    def model_kwargs(self):
        return {"projector_dim": self.params.proj_dim}

    def training_step(self, model, batch, epoch):
        if batch.strong is None:
            raise SpmlError("method plc-lac needs the strong view but the batch has none")
        p = self.params
        b = len(batch.image)
        y = batch.positives
        out = model(torch.cat([batch.image, batch.strong]))
        if out.embeddings is None:
            raise SpmlError("method plc-lac needs label-wise embeddings; set train.model: q2l")
        weak, strong = out.logits.split(b)
        stage1 = epoch <= p.stage1_epochs
        tau = p.stage1_threshold if stage1 else p.threshold
        an = F.binary_cross_entropy_with_logits(weak, y)
        plc = plc_loss(weak, strong, y, tau)
        with torch.no_grad():
            mask, target = plc_targets(weak, y, tau)
        loss = an + p.plc_weight * plc
        logs = {"plc_loss": plc.detach(), "plc_confident_fraction": mask.float().mean()}
        if stage1:
            loss = loss + 0.0 * out.embeddings.sum()  # keeps the projector in the graph (DDP)
        else:
            emb_w, emb_s = out.embeddings.split(b)
            c = emb_w.shape[1]
            pairs = torch.stack([emb_w, emb_s], dim=2).reshape(b * c, 2, -1)
            class_ids = torch.arange(c, device=pairs.device).repeat(b)
            feats, labels, ptr = queue_update(self.queue_feats, self.queue_labels, self.queue_ptr, pairs,
                                              target.reshape(-1), class_ids)
            lac = lac_loss(feats, labels, p.temperature)
            self.queue_feats, self.queue_labels, self.queue_ptr = feats.detach(), labels, ptr
            loss = loss + p.lac_weight * lac
            logs.update(lac_loss=lac.detach(), queue_fill=(labels > 0).float().mean())
        return StepOutput(loss, logs, flagged=target)  # the pseudo-positives among the unknowns

    def state_dict(self):
        return {"queue_feats": self.queue_feats, "queue_labels": self.queue_labels, "queue_ptr": self.queue_ptr}

    def load_state_dict(self, state):
        if state:
            dev = self.ctx.device
            self.queue_feats = state["queue_feats"].to(dev)
            self.queue_labels = state["queue_labels"].to(dev)
            self.queue_ptr = state["queue_ptr"].to(dev)
