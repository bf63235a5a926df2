"""
PPO-KL: the paper's action-level baseline, as pure tensor functions (read it side by side with etpo.py).

Paper: Wen et al., "Entropy-Regularized Token-Level Policy Optimization for Language Agent Reinforcement",
arXiv 2402.06700, section 5 (the "PPO-KL" baseline inherited from RLHF); ../shared/ETPO.md section 7. The KL to
the reference goes into the reward of the whole action, a value function V(s_t) sees states (one value per
action, not per token), advantages come from GAE over environment steps, and EVERY token of an action gets the
same advantage in the clipped PPO surrogate: the "coarse credit" that ETPO's per-token targets replace.

How train.py uses it: the value function is a fourth LoRA adapter, `value`, on the same frozen base, with a
scalar linear head on the hidden state of the last prompt token (model.py; rows with one prompt run it once). It
shares nothing trainable with the policy, so the two losses never compete for the same weights, and it reads the
same prompt the policy reads.

Departures from the paper: none in the math; the value network is a LoRA adapter + head instead of a full copy.

Legend (shapes; N = parallel episodes, K = environment steps per rollout, B = K * N transitions):
    logp, ref_logp  (B, T)  log pi(w^j | x^{j-1}) and log pi_bar(w^j | x^{j-1}) of the sampled tokens
    mask            (B, T)  1 (True) on real action tokens, 0 (False) on padding; bool or float
    rewards         (K, N)  r_t; dones (K, N) 1.0 if the episode ended after step t
    values          (K, N)  V(s_t); last_values (N,) V(s_K) to bootstrap the steps after the rollout
    advantages      (B,)    one per ACTION, broadcast to its tokens
"""

import torch
import torch.nn.functional as F


def taken_logp(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log pi(w^j | x^{j-1}) of the sampled tokens (B, T), in float32, from the logits (B, T, V) that predict them."""
    return F.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None])[..., 0]


def action_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ETPO.md sec. 7: KL_t = sum_j ( log pi(w_t^j | x_t^{j-1}) - log pi_bar(w_t^j | x_t^{j-1}) ), shape (B,)."""
    return ((logp - ref_logp) * mask).sum(dim=1)


@torch.no_grad()
def gae(rewards, values, dones, last_values, gamma, lam):
    """Generalized advantage estimation over environment steps, as a reversed loop. Returns (advantages, returns),
    both (K, N). An episode that ended at step t (done) is not bootstrapped; the next row is a new episode."""
    K = rewards.shape[0]
    advantages = torch.zeros_like(rewards)  # (K, N)
    next_advantage = torch.zeros_like(rewards[0])  # (N,)
    next_values = last_values  # (N,) V(s_{t+1})
    for t in reversed(range(K)):
        not_done = 1.0 - dones[t]
        # delta_t = r_t + gamma * (1 - done_t) * V(s_{t+1}) - V(s_t)
        delta = rewards[t] + gamma * not_done * next_values - values[t]
        # A_t = delta_t + gamma * lam * (1 - done_t) * A_{t+1}
        next_advantage = delta + gamma * lam * not_done * next_advantage
        advantages[t] = next_advantage
        next_values = values[t]
    return advantages, advantages + values


def clipped_policy_loss(logp, old_logp, advantages, mask, clip=0.2):
    """PPO's clipped surrogate on per-token ratios, every token of an action weighted by the action's advantage:
    L = - mean_{real tokens} min( rho * A, clip(rho, 1 - eps, 1 + eps) * A ),  rho = pi_theta(w) / pi_old(w)."""
    ratio = torch.exp(logp - old_logp.detach())  # (B, T)
    adv = advantages.detach()[:, None]  # (B, 1): the SAME advantage for every token of the action
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * adv)  # (B, T)
    return -(surrogate * mask).sum() / mask.sum().clamp(min=1.0)


def value_loss(values, returns):
    """L_V = mean_t ( V(s_t) - R_t )^2 with R_t = A_t + V_old(s_t), the GAE return."""
    return ((values - returns.detach()) ** 2).mean()
