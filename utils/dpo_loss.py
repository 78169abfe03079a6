"""Per-example soft labels in TRL's DPO loss (conservative DPO with eps_i = 1 - soft_label_i).

A pair's ``soft_label`` p_i = P(chosen is better) in [0.5, 1] comes from its judge (1.0 for a
program checker, the pmi judge's probability otherwise). TRL 1.16 has only one global
``label_smoothing``, and its ``sigmoid`` loss ignores it. Here the ``sigmoid`` part of the loss
is, per pair,

    -(1 - eps_i) * log sigmoid(beta * h_i) - eps_i * log sigmoid(-beta * h_i)
        = -log sigmoid(beta * h_i) + eps_i * beta * h_i,

h_i = (log pi - log pi_ref)(chosen_i) - (log pi - log pi_ref)(rejected_i), because
log sigmoid(x) - log sigmoid(-x) = x. So the soft loss is TRL's own loss plus
``w_sigmoid * mean_i(eps_i * beta * h_i)``: the trainer runs TRL's ``compute_loss`` unchanged
(every other term, e.g. ``sft``, and every metric stay TRL's) and adds that correction. h_i
needs the policy's sequence log-probs WITH their graph, which TRL computes inside one 300-line
method; rather than copy it, a forward hook records the outputs of the model calls that
method makes (the policy first, then the reference unless the reference log-probs were
precomputed and arrive in the batch) and h_i is summed from them exactly as TRL sums them.
With every soft_label 1.0 the correction is 0 and the loss is TRL's.

Data flow: the ``soft_label`` column is kept through TRL's column pruning (added to the
signature columns), the collator is wrapped to stack it into a tensor, and it is taken out of
the batch before TRL sees it (the model would get it as a keyword otherwise).
"""

from __future__ import annotations

from typing import Any

import torch
from trl import DPOTrainer

SOFT_LABEL = "soft_label"


class SoftLabelCollator:
    """TRL's preference collator plus a float tensor of the pairs' soft labels."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = self.inner(examples)
        if examples and SOFT_LABEL in examples[0]:
            out[SOFT_LABEL] = torch.tensor([float(e[SOFT_LABEL]) for e in examples])
        return out


class SoftLabelDPOTrainer(DPOTrainer):
    """``DPOTrainer`` whose ``sigmoid`` loss is smoothed per pair by the dataset's soft labels."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "sigmoid" not in self.loss_types:
            raise ValueError(f"soft labels smooth the sigmoid loss; loss_type is {self.loss_types}")
        if self.ld_alpha is not None or self.f_divergence_type != "reverse_kl":
            raise ValueError("soft labels need ld_alpha=None and f_divergence_type='reverse_kl'")
        if self.use_weighting:
            raise ValueError("soft labels do not combine with use_weighting (WPO)")
        self.sigmoid_weight = float(
            sum(
                w for t, w in zip(self.loss_types, self.loss_weights, strict=True) if t == "sigmoid"
            )
        )
        self.data_collator = SoftLabelCollator(self.data_collator)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if SOFT_LABEL not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, SOFT_LABEL]

    def compute_ref_log_probs(self, model: Any, inputs: dict[str, Any]) -> Any:
        return super().compute_ref_log_probs(model, _without_soft_label(inputs))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        soft = inputs.get(SOFT_LABEL)
        inputs = _without_soft_label(inputs)
        if soft is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        calls: list[Any] = []
        net = self.accelerator.unwrap_model(model)
        handle = net.register_forward_hook(lambda _m, _a, out: calls.append(out))
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            handle.remove()
        loss, outputs = result if return_outputs else (result, None)
        h = self._logratio_margin(inputs, calls)
        eps = (1.0 - soft).to(device=h.device, dtype=h.dtype)
        loss = loss + self.sigmoid_weight * (eps * self.beta * h).mean()
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["soft_label"].append(self.accelerator.gather(soft).mean().item())
        return (loss, outputs) if return_outputs else loss

    def _logratio_margin(self, inputs: dict[str, Any], calls: list[Any]) -> torch.Tensor:
        """h_i per pair, from the recorded forwards, summed as ``DPOTrainer._compute_loss`` does."""
        need = 1 if self.precompute_ref_logps else 2
        if len(calls) < need or any(getattr(c, "log_probs", None) is None for c in calls[:need]):
            raise RuntimeError(
                f"expected {need} fused forward(s) (policy, reference) inside TRL's loss, saw "
                f"{len(calls)}: the installed TRL computes the DPO loss differently"
            )
        seq_len = inputs["completion_mask"].size(1) - 1

        def sums(out: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return out.log_probs[:, -seq_len:].sum(dim=1).chunk(2, dim=0)

        chosen, rejected = sums(calls[0])
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = sums(calls[1])
        return (chosen - ref_chosen.to(chosen.device)) - (rejected - ref_rejected.to(chosen.device))


def _without_soft_label(inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in inputs.items() if k != SOFT_LABEL}
