"""False-negative identification diagnostics, computed against the hidden full labels.

Methods that reject, correct or pseudo-label unannotated entries call :meth:`FalseNegativeMeter.update`
with a (B, C) boolean matrix of the entries they acted on. Counts stay on the device (no host sync per
step) and are turned into precision / recall / F1 once per epoch:

* an *assumed negative* is an unannotated entry (observed label 0);
* a *false negative* is an assumed negative whose full label is 1;
* precision = false negatives among the flagged entries / flagged entries;
* recall = flagged false negatives / all false negatives seen;
* base rate = false negatives / assumed negatives (the precision of flagging at random);
* FN/TN ratio = flagged false negatives / flagged true negatives (the paper's Fig. 3b).
"""

from __future__ import annotations

import torch


class FalseNegativeMeter:
    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.active = False
        self.reset()

    def reset(self) -> None:
        zeros = lambda: torch.zeros((), dtype=torch.float64, device=self.device)
        self.flagged = zeros()
        self.flagged_fn = zeros()
        self.false_negatives = zeros()
        self.assumed_negatives = zeros()
        self._means: dict[str, list[torch.Tensor]] = {}
        self._values: dict[str, torch.Tensor] = {}

    def update(self, flagged: torch.Tensor, observed: torch.Tensor, full: torch.Tensor) -> None:
        """Count one batch. ``flagged`` (B, C) bool: entries the method rejected or relabelled."""
        self.active = True
        unannotated = observed == 0
        false_negative = unannotated & (full > 0)
        flagged = flagged & unannotated
        self.flagged += flagged.sum()
        self.flagged_fn += (flagged & false_negative).sum()
        self.false_negatives += false_negative.sum()
        self.assumed_negatives += unannotated.sum()

    def add_mean(self, name: str, values: torch.Tensor, weights: torch.Tensor) -> None:
        """Accumulate a weighted mean (e.g. the mean logit gap of false negatives) without syncing."""
        self.active = True
        total, count = self._means.setdefault(name, [torch.zeros((), dtype=torch.float64, device=self.device),
                                                      torch.zeros((), dtype=torch.float64, device=self.device)])
        total += (values.double() * weights.double()).sum()
        count += weights.double().sum()

    def set_value(self, name: str, value: torch.Tensor | float) -> None:
        """Record the latest value of a scalar (e.g. the gap threshold tau)."""
        self.active = True
        self._values[name] = torch.as_tensor(value).detach()

    def summary(self) -> dict[str, float]:
        flagged, tp = self.flagged.item(), self.flagged_fn.item()
        fn, assumed = self.false_negatives.item(), self.assumed_negatives.item()
        precision = tp / flagged if flagged else 0.0
        recall = tp / fn if fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out = {
            "fn_flagged": flagged,
            "fn_precision": precision,
            "fn_recall": recall,
            "fn_f1": f1,
            "fn_base_rate": fn / assumed if assumed else 0.0,
            "fn_tn_ratio": tp / (flagged - tp) if flagged - tp else 0.0,
        }
        for name, (total, count) in self._means.items():
            out[name] = (total / count).item() if count.item() else float("nan")
        for name, value in self._values.items():
            out[name] = float(value.float().mean().item())
        self.reset()
        return out
