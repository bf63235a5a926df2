"""
ETPO: Entropy-Regularized Token-level Policy Optimization, as pure tensor functions.

Paper: Wen et al., "Entropy-Regularized Token-Level Policy Optimization for Language Agent
Reinforcement", arXiv 2402.06700. This file implements ../shared/ETPO.md sections 3-6:
the per-token soft value, the per-token soft Bellman targets (eq. 6), the Q regression, the
per-token policy update (eq. 7) and the Polyak average of the target Q-network.

Nothing here loads a model, reads a file or prints: every function takes tensors (an LLM's logits
or a table of parameters) and returns tensors, so the math can be tested exactly on vocabularies
small enough to enumerate (tests/test_etpo.py).

Departures from the paper:
1. Q is read as the residual of the Q-network's logits over the reference logits,
   Q(x, w) = l_Q(x)[w] - l_bar(x)[w] (ETPO.md section 5), so Q == 0 for every token at init.
2. token_targets can optionally use a lambda-return inside an action (ETPO.md section 6, "How fast
   credit travels"); lam = 0 (the default) is exactly the paper's one-step target.
3. conservative_penalty, an optional term of the Q loss (train.py --conservative; 0, the paper, by default)
   that keeps Q from rising on tokens no rollout tried.

Legend (shapes; B = batch of transitions, T = action tokens, padded; V = vocabulary):
    pi_logits   (B, T, V)  policy logits at the prefixes x_t^0 .. x_t^{T-1}; pi = softmax(pi_logits)
    ref_logits  (B, T, V)  reference (frozen base LLM) logits; pi_bar = softmax(ref_logits)
    q           (B, T, V)  soft Q of every next token, Q(x, w)
    beta        scalar     KL coefficient of the entropy-regularized objective (ETPO.md eq. 2)
    gamma       scalar     discount, applied only BETWEEN actions (eq. 6)
    tau         scalar     Polyak rate of the target Q-network
    values      (B, T)     V(x_t^j), soft value of the prefix after j action tokens, j = 0..T-1
    lengths     (B,)       L_t, real tokens of each action (1 <= L_t <= T)
    rewards     (B,)       r_t, the environment's reward of the whole action
    next_values (B,)       V(x_{t+1}^0), soft value of the next state's empty prefix
    dones       (B,)       1.0 if the episode ended after this action
    mask        (B, T)     1 (True) on real action tokens, 0 (False) on padding; bool or float
    y           (B, T)     regression targets of the Q-values of the taken tokens
"""

import math

import torch
import torch.nn.functional as F


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    # bf16 logits lose ~3 significant digits; every probability below is computed in fp32 (or fp64 in tests)
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x (B, T) over the real tokens (mask 1), 0 if there are none."""
    mask = mask.to(x)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def soft_value(pi_logits: torch.Tensor, q: torch.Tensor, ref_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Token-level soft value of each prefix, shape pi_logits.shape[:-1]."""
    logp = F.log_softmax(_at_least_float32(pi_logits), dim=-1)  # (..., V) log pi(w|x)
    ref_logp = F.log_softmax(_at_least_float32(ref_logits), dim=-1)  # (..., V) log pi_bar(w|x)
    pi = logp.exp()  # (..., V)
    # ETPO.md sec. 3: V(x) = sum_w pi(w|x) * Q(x, w) - beta * KL( pi(.|x) || pi_bar(.|x) )
    #                      = sum_w pi(w|x) * ( Q(x, w) - beta * (log pi(w|x) - log pi_bar(w|x)) )
    return (pi * (_at_least_float32(q) - beta * (logp - ref_logp))).sum(dim=-1)  # (...)


@torch.no_grad()
def token_targets(values, lengths, rewards, next_values, dones, gamma, lam=0.0, q_target_taken=None):
    """Per-token soft Bellman targets y (B, T) of ETPO eq. 6; zero on padding.

    Token index j (0-based) is token w^{j+1}; its Q is Q(x^j, w^{j+1}) and its target is
        j + 1 <  L :  y^{j+1} = V(x^{j+1})                               (no reward, NO discount)
        j + 1 == L :  y^L     = r + gamma * (1 - done) * V(x_{t+1}^0)    (reward, discount between actions)
        j + 1 >  L :  0                                                  (padding)
    With lam > 0 (a departure, ETPO.md sec. 6), the target inside an action is the lambda-return
        y^{j+1} = V(x^{j+1}) + lam * ( y^{j+2} - Q_target(x^{j+1}, w^{j+2}) ),
    which needs q_target_taken[b, j] = Q_target(x^j, w^{j+1}) (B, T). lam = 0 is the one-step target.
    """
    B, T = values.shape
    values = _at_least_float32(values)
    y = torch.zeros_like(values)  # (B, T)
    # ETPO eq. 6, last token: y = r_t + gamma * (1 - done_t) * V(x_{t+1}^0)
    y_last = rewards.to(values) + gamma * (1.0 - dones.to(values)) * next_values.to(values)  # (B,)
    last = lengths.long() - 1  # (B,) index of the last real token
    y_next = torch.zeros(B, dtype=values.dtype, device=values.device)  # (B,) y of token j + 1
    for j in reversed(range(T)):  # backwards, so the lambda-return can reuse y of token j + 1
        if j + 1 < T:
            # ETPO eq. 6, inside the action: y = V(x_t^{j+1}); optionally + lam * (y^{j+2} - Q_target(x^{j+1}, w^{j+2}))
            inside = values[:, j + 1]  # (B,)
            if lam > 0.0:
                inside = inside + lam * (y_next - q_target_taken[:, j + 1].to(values))
        else:
            inside = torch.zeros(B, dtype=values.dtype, device=values.device)
        y_j = torch.where(j == last, y_last, torch.where(j < last, inside, torch.zeros_like(inside)))  # (B,)
        y[:, j] = y_j
        y_next = y_j
    return y


def q_loss(q_taken: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, huber_delta: float = None):
    """Mean over real tokens of the squared (or Huber) error between Q(x^{j-1}, w^j) and y^j."""
    # ETPO.md sec. 3: L_Q = mean_{real tokens} ( Q(x_t^{j-1}, w_t^j) - y_t^j )^2
    q_taken = _at_least_float32(q_taken)
    targets = targets.detach().to(q_taken)
    if huber_delta is None:
        err = (q_taken - targets) ** 2  # (B, T)
    else:  # the official code uses Huber with delta 10 (and a factor 1/2 on the square part)
        err = F.huber_loss(q_taken, targets, reduction="none", delta=huber_delta)  # (B, T)
    return _masked_mean(err, mask)


def conservative_penalty(q: torch.Tensor, ref_logits: torch.Tensor, tokens: torch.Tensor, beta: float,
                         mask: torch.Tensor):
    """Mean over real tokens of V*(x) - Q(x, w_taken): a departure that keeps Q from rising on tokens no rollout tried.

    V*(x) = beta * log sum_w pi_bar(w|x) exp(Q(x, w) / beta) is the soft value of pi* under Q, so the gradient with
    respect to Q(x, .) is pi*(.|x) - onehot(w_taken): Q goes down where pi* puts mass the data did not visit and up
    on the token that was taken (conservative Q-learning, Kumar et al., arXiv 2006.04779, with pi_bar as the prior).
    """
    ref_logp = F.log_softmax(_at_least_float32(ref_logits.detach()), dim=-1)  # (B, T, V)
    q = _at_least_float32(q)
    v_star = beta * torch.logsumexp(ref_logp + q / beta, dim=-1)  # (B, T) V*(x) = beta log E_pi_bar[exp(Q / beta)]
    q_taken = q.gather(-1, tokens[..., None])[..., 0]  # (B, T) Q(x, w_taken)
    return _masked_mean(v_star - q_taken, mask)


def policy_loss(pi_logits: torch.Tensor, q: torch.Tensor, ref_logits: torch.Tensor, beta: float, mask: torch.Tensor):
    """Per-token policy loss of ETPO eq. 7, exact over the vocabulary; mean over real tokens."""
    logp = F.log_softmax(_at_least_float32(pi_logits), dim=-1)  # (B, T, V) log pi_theta(w|x)
    ref_logp = F.log_softmax(_at_least_float32(ref_logits.detach()), dim=-1)  # (B, T, V)
    q = _at_least_float32(q.detach())  # (B, T, V), Q held fixed
    # ETPO eq. 7: L_pi = E_x[ KL( pi_theta(.|x) || pi*(.|x) ) ],  pi*(w|x) ~ pi_bar(w|x) * exp(Q(x, w) / beta)
    #                  = E_x[ sum_w pi_theta(w|x) * ( log pi_theta(w|x) - log pi_bar(w|x) - Q(x, w) / beta ) ] + const
    per_token = (logp.exp() * (logp - ref_logp - q / beta)).sum(dim=-1)  # (B, T)
    return _masked_mean(per_token, mask)


def q_from_logits(q_logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """ETPO.md sec. 5: Q(x, w) = l_Q(x)[w] - l_bar(x)[w], exactly 0 while the Q adapter is zero."""
    return _at_least_float32(q_logits) - _at_least_float32(ref_logits)


@torch.no_grad()
def polyak_update(target_params, online_params, tau: float) -> None:
    """ETPO.md sec. 6: phi_bar <- (1 - tau) * phi_bar + tau * phi, in place."""
    for target, online in zip(target_params, online_params, strict=True):
        target.lerp_(online.to(target.dtype), tau)  # target + tau * (online - target)


def kl_and_entropy(pi_logits: torch.Tensor, ref_logits: torch.Tensor):
    """Per prefix, shape pi_logits.shape[:-1]: KL(pi(.|x) || pi_bar(.|x)) and the entropy H(pi(.|x))."""
    logp = F.log_softmax(_at_least_float32(pi_logits), dim=-1)  # (..., V)
    ref_logp = F.log_softmax(_at_least_float32(ref_logits), dim=-1)  # (..., V)
    pi = logp.exp()
    # KL(pi || pi_bar) = sum_w pi(w|x) * (log pi(w|x) - log pi_bar(w|x));  H(pi) = - sum_w pi(w|x) * log pi(w|x)
    return (pi * (logp - ref_logp)).sum(-1), -(pi * logp).sum(-1)


def token_stats(pi_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor):
    """Mean over real tokens of KL(pi || pi_bar) and of the entropy of pi, for logging."""
    kl, entropy = kl_and_entropy(pi_logits, ref_logits)  # (B, T) each
    return _masked_mean(kl, mask), _masked_mean(entropy, mask)


def log_pi_star(q: torch.Tensor, ref_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """log pi*(w|x), shape q.shape: the policy target of ETPO eq. 7."""
    ref_logp = F.log_softmax(_at_least_float32(ref_logits), dim=-1)  # (..., V) log pi_bar(w|x)
    # ETPO eq. 7: pi*(w|x) = pi_bar(w|x) * exp(Q(x, w) / beta) / sum_w' pi_bar(w'|x) * exp(Q(x, w') / beta)
    return F.log_softmax(ref_logp + _at_least_float32(q) / beta, dim=-1)


def rare_token_mass(q: torch.Tensor, ref_logits: torch.Tensor, beta: float, mask: torch.Tensor, rare: float = 1e-3):
    """Mean over real tokens of the mass that pi* ~ pi_bar * exp(Q / beta) puts on tokens the reference gives less than
    `rare`, for logging: Q rising on tokens no rollout tried (and 1 / beta amplifying it) shows here first."""
    rare_tokens = F.log_softmax(_at_least_float32(ref_logits), dim=-1) < math.log(rare)  # (B, T, V)
    mass = (log_pi_star(q, ref_logits, beta).exp() * rare_tokens).sum(-1)  # (B, T)
    return _masked_mean(mass, mask)
