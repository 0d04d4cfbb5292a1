"""The reward model's and DPO's losses (PPO's and the rest of its math are in ``rlmf/ppo_math``).

Every function is plain tensor math, tested against hand-computed values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_reward_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Bradley-Terry: -log sigmoid(r_chosen - r_rejected - margin), averaged over pairs.

    ``margin`` (optional, >= 0) asks for a larger gap where the teacher's ratings were further
    apart (Llama-2's margin loss); zero gives the plain Bradley-Terry loss.
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Share of pairs whose chosen response scores strictly higher."""
    return (chosen > rejected).float().mean()


def response_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """Sum over each row's response tokens of log p(token | the tokens before it): (B,).

    ``logits`` (B, L, V) from the model on ``input_ids`` (B, L); ``response_mask`` (B, L) is 1 on
    the tokens to score (the response and its EOS), 0 on the prompt and padding.
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    taken = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (taken * response_mask[:, 1:].to(taken.dtype)).sum(-1)


def dpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    kind: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al., 2023) or IPO (Azar et al., 2023) over pairs of sequence log-probs.

    With h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)):

    * ``sigmoid``: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h), eps the label
      smoothing (conservative DPO: the chance that a label is flipped);
    * ``ipo``: (h - 1 / (2 beta))^2, which does not push h to infinity on separable pairs.
      On the summed log-probs it is given (:func:`response_logprobs`), as in Azar et al.; TRL
      divides each log-prob by the answer's length first, so the same ``beta`` asks for a
      margin per token there and per sequence here.

    Returns (mean loss, implicit rewards of chosen, of rejected), the rewards being
    beta x (log pi - log pi_ref), detached.
    """
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    if kind == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(
            -beta * h
        )
    elif kind == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {kind!r}")
    return (
        losses.mean(),
        (beta * (chosen - ref_chosen)).detach(),
        (beta * (rejected - ref_rejected)).detach(),
    )
