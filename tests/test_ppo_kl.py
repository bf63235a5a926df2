"""
ppo_kl.py by hand: GAE's reversed loop against the brute-force sum, the KL-in-reward, the clipped surrogate on a
case small enough to compute on paper, and the coarse credit itself (every token of an action gets the same
advantage). The end-to-end run through train.py --algo ppo_kl is in tests/test_train.py.

Run: python -m pytest tests/test_ppo_kl.py -q
"""

import math

import pytest
import torch

from ppo_kl import action_kl, clipped_policy_loss, gae, taken_logp, value_loss


def test_gae_loop_equals_the_brute_force_sum():
    g = torch.Generator().manual_seed(0)
    K, N, gamma, lam = 5, 4, 0.9, 0.8
    rewards = torch.randn(K, N, generator=g, dtype=torch.float64)
    values = torch.randn(K, N, generator=g, dtype=torch.float64)
    last_values = torch.randn(N, generator=g, dtype=torch.float64)
    dones = (torch.rand(K, N, generator=g) < 0.3).double()
    advantages, returns = gae(rewards, values, dones, last_values, gamma, lam)
    # A_t = sum_{l >= 0} (gamma lam)^l delta_{t+l}, stopping after the first done; V(s_K) bootstraps the end
    for n in range(N):
        v_next = [values[t + 1, n] if t + 1 < K else last_values[n] for t in range(K)]
        delta = [rewards[t, n] + gamma * (1 - dones[t, n]) * v_next[t] - values[t, n] for t in range(K)]
        for t in range(K):
            expected, weight = 0.0, 1.0
            for u in range(t, K):
                expected += weight * delta[u]
                if dones[u, n]:
                    break
                weight *= gamma * lam
            assert float(advantages[t, n]) == pytest.approx(float(expected), abs=1e-12)
    assert torch.allclose(returns, advantages + values)


def test_gae_with_lambda_one_and_no_done_is_the_discounted_return_minus_value():
    rewards = torch.tensor([[1.0], [2.0], [3.0]])
    values = torch.tensor([[0.5], [0.25], [0.125]])
    adv, ret = gae(rewards, values, torch.zeros(3, 1), torch.tensor([4.0]), gamma=0.5, lam=1.0)
    assert float(ret[0, 0]) == pytest.approx(1 + 0.5 * 2 + 0.25 * 3 + 0.125 * 4)


def test_action_kl_sums_the_log_ratio_of_the_sampled_tokens():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.1, 0.2, 0.3]]))
    ref_logp = torch.log(torch.tensor([[0.25, 0.25, 0.1], [0.1, 0.1, 0.3]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert torch.allclose(action_kl(logp, ref_logp, mask), torch.tensor([math.log(2.0), math.log(2.0)]))


def test_taken_logp_reads_the_sampled_tokens_log_probability():
    # vocabulary of 3: logits log(1), log(2), log(5) give pi = 1/8, 2/8, 5/8 at every position, whatever bf16 holds
    logits = torch.log(torch.tensor([1.0, 2.0, 5.0])).repeat(2, 2, 1).bfloat16()  # (B=2, T=2, V=3)
    tokens = torch.tensor([[2, 0], [1, 2]])
    expected = torch.log(torch.tensor([[5 / 8, 1 / 8], [2 / 8, 5 / 8]]))
    logp = taken_logp(logits, tokens)
    assert logp.dtype == torch.float32 and torch.allclose(logp, expected, atol=1e-2)


def test_clipped_loss_by_hand():
    old_logp = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 0.5], [1.1, 0.7]])).requires_grad_(True)  # ratios
    advantages = torch.tensor([1.0, -2.0])
    mask = torch.ones(2, 2)
    loss = clipped_policy_loss(logp, old_logp, advantages, mask, clip=0.2)
    # action 0, A = +1: min(1.5, 1.2) = 1.2 and min(0.5, 0.8) = 0.5
    # action 1, A = -2: min(-2.2, -2.2) = -2.2 and min(-1.4, -1.6) = -1.6
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 2.2 - 1.6) / 4)
    loss.backward()
    # clipped tokens get no gradient; the others get -A * ratio / n
    expected = torch.tensor([[0.0, -1.0 * 0.5 / 4], [2.0 * 1.1 / 4, 0.0]])
    assert torch.allclose(logp.grad, expected)


def test_every_token_of_an_action_gets_the_same_advantage():
    logp = torch.zeros(3, 4, requires_grad=True)  # ratio 1 everywhere: no clipping
    advantages = torch.tensor([0.5, -1.0, 2.0])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    clipped_policy_loss(logp, torch.zeros(3, 4), advantages, mask).backward()
    grad = logp.grad
    for b in range(3):
        real = grad[b][mask[b] > 0]
        assert torch.allclose(real, torch.full_like(real, -float(advantages[b]) / 7))  # constant inside the action
    assert torch.equal(grad[mask == 0], torch.zeros(int((mask == 0).sum())))


def test_value_loss():
    assert float(value_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0]))) == pytest.approx(2.5)
