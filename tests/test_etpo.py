"""
Exact tests of etpo.py on token MDPs small enough to enumerate by hand.

The toy MDP: vocabulary {a, b, EOS}; an action is a token sequence that ends at EOS or after L_MAX
tokens; two environment steps (s_0, then a "reflection" state s_1 = (s_0, a_0) unless a_0 succeeded);
rewards, done flags and the reference pi_bar depend on the state and the prefix. Everything is float64
so the comparisons hold to 1e-9, well inside the 1e-6 the issue asks for.

Run: python -m pytest tests/test_etpo.py -q
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from etpo import (conservative_penalty, policy_loss, polyak_update, q_from_logits, q_loss, rare_token_mass, soft_value,
                  token_stats, token_targets)

A, B_, EOS = 0, 1, 2
VOCAB = 3
L_MAX = 3


def all_actions(l_max=L_MAX):
    """Every action: token tuples cut at the first EOS, or of length l_max without one (|V|^L enumeration)."""
    actions = set()
    for seq in itertools.product(range(VOCAB), repeat=l_max):
        cut = seq.index(EOS) + 1 if EOS in seq else l_max
        actions.add(seq[:cut])
    return sorted(actions)


class ToyMDP:
    """Two-step token MDP with random (seeded) rewards, done flags and reference logits."""

    def __init__(self, seed=0, l_max=L_MAX, gamma=0.9, ref_scale=2.0):
        self.g = torch.Generator().manual_seed(seed)
        self.l_max, self.gamma = l_max, gamma
        self.actions = all_actions(l_max)
        self.s0 = ("s0",)
        self.s1 = [("s1", a) for a in self.actions]  # one reflection state per failed first action
        self._ref, self._reward = {}, {}
        for s in [self.s0] + self.s1:
            for prefix in self.prefixes():
                self._ref[(s, prefix)] = ref_scale * torch.randn(VOCAB, generator=self.g, dtype=torch.float64)
            for a in self.actions:
                self._reward[(s, a)] = float(torch.rand((), generator=self.g, dtype=torch.float64) * 2 - 1)

    def prefixes(self):
        """Prefixes at which a token is still to be chosen (no EOS yet, shorter than l_max)."""
        return [p for n in range(self.l_max) for p in itertools.product((A, B_), repeat=n)]

    def ref_logits(self, s, prefix):
        return self._ref[(s, tuple(prefix))]

    def reward(self, s, a):
        return self._reward[(s, a)]

    def step(self, s, a):
        """(reward, done, next state): s_0 ends on a positive reward, s_1 always ends (step limit 2)."""
        r = self.reward(s, a)
        if s == self.s0 and r <= 0:
            return r, False, ("s1", a)
        return r, True, None

    def action_logprob(self, logits_fn, s, a):
        """log pi(a|s) = sum_j log pi(w^j | x^{j-1}), the autoregressive chain."""
        return sum(float(F.log_softmax(logits_fn(s, a[:j]), -1)[a[j]]) for j in range(len(a)))


def action_level_soft_optimal(mdp, beta):
    """ETPO.md sec. 2 by brute force over all actions: V*(s) = beta * log sum_a pi_bar(a|s) exp(Q*(s,a)/beta)."""

    def v_star(s):
        qs = []
        for a in mdp.actions:
            r, done, s_next = mdp.step(s, a)
            qs.append(r + (0.0 if done else mdp.gamma * v_star(s_next)[0]))
        log_ref = torch.tensor([mdp.action_logprob(mdp.ref_logits, s, a) for a in mdp.actions], dtype=torch.float64)
        return float(beta * torch.logsumexp(log_ref + torch.tensor(qs, dtype=torch.float64) / beta, 0)), qs

    return v_star


def batch_of_actions(mdp, s, value_of_prefix, value_of_state, reward_fn=None):
    """All actions of state s as one padded batch: the tensors token_targets takes."""
    n, T = len(mdp.actions), mdp.l_max
    values = torch.zeros(n, T, dtype=torch.float64)
    lengths, rewards, next_values, dones = (torch.zeros(n, dtype=torch.float64) for _ in range(4))
    for b, a in enumerate(mdp.actions):
        for j in range(len(a)):
            values[b, j] = value_of_prefix(s, a[:j])
        r, done, s_next = mdp.step(s, a)
        if reward_fn is not None:
            r = reward_fn(s, a)
        lengths[b], rewards[b], dones[b] = len(a), r, float(done)
        next_values[b] = 0.0 if done else value_of_state(s_next)
    return values, lengths.long(), rewards, next_values, dones


def run_token_backup(mdp, beta, policy_logits_fn=None, discount_inside=False, sweeps=12, reward_fn=None):
    """Iterate the per-token soft Bellman update (soft_value + token_targets) on a Q table to its fixed point.

    policy_logits_fn=None uses pi = pi* of the current Q (pi* ~ pi_bar * exp(Q / beta)); otherwise a fixed policy.
    Returns V(s_0^0) and the Q table.
    """
    states = [mdp.s0] + mdp.s1
    q = {(s, p): torch.zeros(VOCAB, dtype=torch.float64) for s in states for p in mdp.prefixes()}

    def pi_logits(s, prefix):
        if policy_logits_fn is not None:
            return policy_logits_fn(s, prefix)
        return mdp.ref_logits(s, prefix) + q[(s, tuple(prefix))] / beta  # log pi* up to a constant

    def v(s, prefix):
        return float(soft_value(pi_logits(s, prefix), q[(s, tuple(prefix))], mdp.ref_logits(s, prefix), beta))

    for _ in range(sweeps):
        new_q = {k: t.clone() for k, t in q.items()}
        for s in states:
            batch = batch_of_actions(mdp, s, v, lambda s_next: v(s_next, ()), reward_fn)
            y = token_targets(*batch, gamma=mdp.gamma)  # (n, T)
            if discount_inside:  # the paper's ETPO (Disc.) ablation: gamma applied between tokens too
                lengths = batch[1]
                inside = torch.arange(mdp.l_max)[None, :] + 1 < lengths[:, None]
                y = torch.where(inside, mdp.gamma * y, y)
            for b, a in enumerate(mdp.actions):
                for j in range(len(a)):
                    new_q[(s, a[:j])][a[j]] = y[b, j]
        q = new_q
    return v(mdp.s0, ()), q


@pytest.mark.parametrize("seed,beta", [(0, 0.5), (1, 0.1), (2, 2.0)])
def test_per_token_update_reaches_action_level_soft_optimum(seed, beta):
    mdp = ToyMDP(seed=seed)
    v_star, _ = action_level_soft_optimal(mdp, beta)(mdp.s0)
    v_token, _ = run_token_backup(mdp, beta)
    assert v_token == pytest.approx(v_star, abs=1e-6)
    # more sweeps change nothing: it is a fixed point
    assert run_token_backup(mdp, beta, sweeps=20)[0] == pytest.approx(v_token, abs=1e-12)
    # discounting inside the action ("ETPO (Disc.)") converges elsewhere
    v_disc, _ = run_token_backup(mdp, beta, discount_inside=True)
    assert abs(v_disc - v_star) > 1e-3


class OneStepMDP(ToyMDP):
    """One state, and every action ends the episode with reward = a given action-level Q(s, a)."""

    def __init__(self, q_action, **kw):
        super().__init__(**kw)
        self.s1, self.q_action = [], q_action

    def step(self, s, a):
        return self.q_action[a], True, None


def test_chained_targets_equal_action_level_value_for_any_policy():
    beta = 0.7
    g = torch.Generator().manual_seed(7)
    q_action = {a: float(torch.randn((), generator=g, dtype=torch.float64)) for a in all_actions()}
    mdp = OneStepMDP(q_action, seed=3)
    policy = {(mdp.s0, p): torch.randn(VOCAB, generator=g, dtype=torch.float64) for p in mdp.prefixes()}
    # the last token's target is the action-level Q(s, a) itself (reward = Q, done); the fixed policy is arbitrary
    v_token, _ = run_token_backup(mdp, beta, policy_logits_fn=lambda s, p: policy[(s, tuple(p))])
    # action level: E_{a~pi}[Q(s,a)] - beta * KL(pi(a|s) || pi_bar(a|s)), enumerated over all actions
    f64 = dict(dtype=torch.float64)
    logp = torch.tensor([mdp.action_logprob(lambda s, p: policy[(s, tuple(p))], mdp.s0, a) for a in mdp.actions], **f64)
    ref_logp = torch.tensor([mdp.action_logprob(mdp.ref_logits, mdp.s0, a) for a in mdp.actions], **f64)
    assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-12)  # the enumeration covers every action
    qa = torch.tensor([q_action[a] for a in mdp.actions], dtype=torch.float64)
    expected = float((logp.exp() * (qa - beta * (logp - ref_logp))).sum())
    assert v_token == pytest.approx(expected, abs=1e-9)


def test_soft_value_matches_hand_computation_and_upcasts_bf16():
    pi_logits = torch.tensor([math.log(0.5), math.log(0.25), math.log(0.25)])
    ref_logits = torch.tensor([math.log(0.25), math.log(0.25), math.log(0.5)])
    q = torch.tensor([1.0, -1.0, 2.0])
    beta = 0.3
    kl = 0.5 * math.log(2.0) + 0.25 * math.log(0.5)
    expected = 0.5 * 1.0 + 0.25 * -1.0 + 0.25 * 2.0 - beta * kl
    assert float(soft_value(pi_logits, q, ref_logits, beta)) == pytest.approx(expected, abs=1e-6)
    bf16 = [t.bfloat16()[None, None] for t in (pi_logits, q, ref_logits)]
    out = soft_value(bf16[0], bf16[1], bf16[2], beta)
    assert out.dtype == torch.float32 and out.shape == (1, 1)


def test_policy_loss_gradient_is_kl_to_optimal_policy_and_minimizer_is_pi_star():
    g = torch.Generator().manual_seed(0)
    B, T, V, beta = 2, 3, 5, 0.4
    ref_logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    q = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    theta = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    n = mask.sum()

    loss = policy_loss(theta, q, ref_logits, beta, mask)
    loss.backward()
    assert q.grad is None  # Q is held fixed

    # analytic: d KL(softmax(theta) || p*) / d theta_k = pi_k * (log pi_k - log p*_k - KL), averaged over real tokens
    log_star = F.log_softmax(ref_logits + q.detach() / beta, -1)  # (B, T, V) pi* ~ pi_bar * exp(Q / beta)
    log_pi = F.log_softmax(theta.detach(), -1)
    pi = log_pi.exp()
    kl = (pi * (log_pi - log_star)).sum(-1, keepdim=True)
    grad = pi * (log_pi - log_star - kl) * mask[..., None] / n
    assert torch.allclose(theta.grad, grad, atol=1e-12)
    # and the loss is KL(pi || pi*) minus the log-partition constant
    log_z = torch.logsumexp(F.log_softmax(ref_logits, -1) + q.detach() / beta, -1)
    assert loss.item() == pytest.approx(float(((kl[..., 0] - log_z) * mask).sum() / n), abs=1e-12)

    # minimizer: at pi = pi*, the gradient vanishes and any other policy has a larger loss
    at_star = log_star.clone().requires_grad_(True)
    loss_star = policy_loss(at_star, q, ref_logits, beta, mask)
    loss_star.backward()
    assert at_star.grad.abs().max() < 1e-12
    for _ in range(20):
        other = log_star + 0.3 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
        assert policy_loss(other, q, ref_logits, beta, mask).item() > loss_star.item()
    # gradient descent from a random policy reaches pi*
    theta = torch.zeros(B, T, V, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.1)
    for _ in range(2000):
        opt.zero_grad()
        policy_loss(theta, q, ref_logits, beta, torch.ones(B, T, dtype=torch.float64)).backward()
        opt.step()
    assert torch.allclose(F.softmax(theta.detach(), -1), log_star.exp(), atol=1e-3)


def test_conservative_penalty_gradient_is_pi_star_minus_taken_token():
    g = torch.Generator().manual_seed(1)
    B, T, V, beta = 2, 3, 4, 0.3
    ref_logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    q = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.tensor([[2, 0, 3], [1, 1, 0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    loss = conservative_penalty(q, ref_logits, tokens, beta, mask)
    loss.backward()
    # by hand at one prefix: V* = beta * log sum_w pi_bar(w) exp(Q(w) / beta), penalty = V* - Q(taken)
    pi_bar = F.softmax(ref_logits[0, 1], -1)
    qd = q.detach()
    v_star = beta * math.log(sum(float(pi_bar[w]) * math.exp(float(qd[0, 1, w]) / beta) for w in range(V)))
    # d penalty / d Q(x, .) = (pi*(.|x) - onehot(taken)) / real tokens, zero on padding
    pi_star = F.softmax(ref_logits + q.detach() / beta, -1)
    grad = (pi_star - F.one_hot(tokens, V)) * mask[..., None] / mask.sum()
    assert torch.allclose(q.grad, grad, atol=1e-12)
    assert q.grad[0, 2].abs().max() == 0.0
    one_prefix = conservative_penalty(q[:1, 1:2].detach(), ref_logits[:1, 1:2], tokens[:1, 1:2], beta,
                                      torch.ones(1, 1, dtype=torch.float64))
    assert one_prefix.item() == pytest.approx(v_star - float(qd[0, 1, 0]), abs=1e-12)
    # Q far above on the taken token alone: pi* is one-hot on it and the penalty is beta * log pi_bar(taken)
    peaked = torch.zeros(1, 1, V, dtype=torch.float64)
    peaked[0, 0, 2] = 50.0
    assert conservative_penalty(peaked, ref_logits[:1, :1], tokens[:1, :1], beta,
                                torch.ones(1, 1, dtype=torch.float64)).item() == pytest.approx(
        beta * math.log(float(F.softmax(ref_logits[0, 0], -1)[2])), abs=1e-9)


def test_rare_token_mass_by_hand():
    # one prefix, pi_bar = (0.9, 0.0995, 0.0005): only token 2 is rare (< 1e-3)
    ref_logits = torch.log(torch.tensor([[[0.9, 0.0995, 0.0005]]], dtype=torch.float64))
    mask = torch.ones(1, 1, dtype=torch.float64)
    assert rare_token_mass(torch.zeros(1, 1, 3, dtype=torch.float64), ref_logits, 0.2, mask).item() == \
        pytest.approx(0.0005, abs=1e-12)  # Q = 0: pi* = pi_bar
    q = torch.tensor([[[0.0, 0.0, 1.0]]], dtype=torch.float64)  # Q = 1 on the rare token, beta 0.2: weight e^5
    w = 0.0005 * math.exp(5.0)
    assert rare_token_mass(q, ref_logits, 0.2, mask).item() == pytest.approx(w / (0.9 + 0.0995 + w), abs=1e-12)


def test_token_targets_edge_cases():
    values = torch.tensor([[10.0, 11.0, 12.0, 13.0], [20.0, 21.0, 22.0, 23.0], [30.0, 31.0, 32.0, 33.0]])
    lengths = torch.tensor([4, 1, 2])  # L_b = T, L_b = 1, padded
    rewards = torch.tensor([1.0, 2.0, 3.0])
    next_values = torch.tensor([5.0, 6.0, 7.0])
    dones = torch.tensor([0.0, 1.0, 0.0])
    gamma = 0.5
    y = token_targets(values, lengths, rewards, next_values, dones, gamma)
    expected = torch.tensor(
        [
            [11.0, 12.0, 13.0, 1.0 + 0.5 * 5.0],  # inside: the next prefix's V, undiscounted; last: r + gamma V'
            [2.0, 0.0, 0.0, 0.0],  # L = 1 and done: only the reward, no bootstrap; padding is 0
            [31.0, 3.0 + 0.5 * 7.0, 0.0, 0.0],  # padding after the last token is 0
        ]
    )
    assert torch.equal(y, expected)
    assert not y.requires_grad
    # the reward enters only at the last token, gamma only at the action boundary
    y2 = token_targets(values, lengths, rewards + 100.0, next_values, dones, gamma=0.9)
    changed = (y2 != y).float()
    assert torch.equal(changed, torch.tensor([[0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.float32))
    # values[:, 0] = V(s_t) is never a target of the same action
    values2 = values.clone()
    values2[:, 0] = -99.0
    assert torch.equal(token_targets(values2, lengths, rewards, next_values, dones, gamma), y)


def test_lambda_targets_zero_is_one_step_and_one_carries_reward_to_first_token():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(2, 4, generator=g, dtype=torch.float64)
    q_tgt = torch.randn(2, 4, generator=g, dtype=torch.float64)
    lengths, rewards = torch.tensor([4, 3]), torch.tensor([0.7, -1.0], dtype=torch.float64)
    nv, dones = torch.tensor([0.3, 0.2], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    one_step = token_targets(values, lengths, rewards, nv, dones, 0.9)
    assert torch.equal(token_targets(values, lengths, rewards, nv, dones, 0.9, lam=0.0, q_target_taken=q_tgt), one_step)
    y = token_targets(values, lengths, rewards, nv, dones, 0.9, lam=1.0, q_target_taken=q_tgt)
    # lam = 1 telescopes: y^1 = y^L + sum_{k=1}^{L-1} ( V(x^k) - Q_target(x^k, w^{k+1}) )
    for b in range(2):
        L = int(lengths[b])
        expected = one_step[b, L - 1] + sum(values[b, k] - q_tgt[b, k] for k in range(1, L))
        assert float(y[b, 0]) == pytest.approx(float(expected), abs=1e-12)
        assert float(y[b, L - 1]) == pytest.approx(float(one_step[b, L - 1]), abs=1e-12)


@pytest.mark.parametrize("lam", [0.3, 0.8])
def test_lambda_targets_are_the_lambda_weighted_n_step_targets(lam):
    # the forward view, computed independently of token_targets' backward recursion: the n-step target of token j
    # (0-based; it trains Q(x^j, w^{j+1})) follows the action n - 1 tokens further, each step adding
    # V(x^k) - Q_target(x^k, w^{k+1}), then bootstraps from V(x^{j+n}), or ends with the last token's y^L;
    # y_j = (1 - lam) sum_{n=1}^{N-1} lam^{n-1} G_n + lam^{N-1} G_N, N = L - j (the steps to the action's end)
    g = torch.Generator().manual_seed(1)
    values = torch.randn(3, 5, generator=g, dtype=torch.float64)
    q_tgt = torch.randn(3, 5, generator=g, dtype=torch.float64)
    lengths, rewards = torch.tensor([5, 3, 1]), torch.tensor([0.7, -1.0, 0.4], dtype=torch.float64)
    nv, dones = torch.tensor([0.3, 0.2, -0.5], dtype=torch.float64), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    y = token_targets(values, lengths, rewards, nv, dones, 0.9, lam=lam, q_target_taken=q_tgt)
    for b in range(3):
        L = int(lengths[b])
        y_last = float(rewards[b] + 0.9 * (1 - dones[b]) * nv[b])
        for j in range(L):
            N = L - j

            def G(n):  # the n-step target of token j
                end = values[b, j + n] if j + n < L else y_last
                return float(sum(values[b, k] - q_tgt[b, k] for k in range(j + 1, j + n)) + end)

            expected = (1 - lam) * sum(lam ** (n - 1) * G(n) for n in range(1, N)) + lam ** (N - 1) * G(N)
            assert float(y[b, j]) == pytest.approx(expected, abs=1e-12)
        assert torch.equal(y[b, L:], torch.zeros(5 - L, dtype=torch.float64))  # padding


def test_q_loss_masks_padding_and_huber_option():
    q_taken = torch.tensor([[1.0, 2.0, 100.0], [0.0, 0.0, 0.0]], requires_grad=True)
    targets = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert q_loss(q_taken, targets, mask).item() == pytest.approx((1 + 4 + 9) / 3)
    # Huber, delta 1: 0.5 * 1, then |e| - 0.5 for |e| > 1
    assert q_loss(q_taken, targets, mask, huber_delta=1.0).item() == pytest.approx((0.5 + 1.5 + 2.5) / 3)


def test_q_is_zero_at_init_and_polyak_averages():
    ref = torch.randn(2, 3, 7).bfloat16()
    assert torch.equal(q_from_logits(ref.clone(), ref), torch.zeros(2, 3, 7))
    target = [torch.zeros(3), torch.ones(2, 2)]
    online = [torch.ones(3), torch.zeros(2, 2)]
    polyak_update(target, online, tau=0.25)
    assert torch.allclose(target[0], torch.full((3,), 0.25)) and torch.allclose(target[1], torch.full((2, 2), 0.75))


def test_token_stats_kl_and_entropy():
    pi_logits = torch.log(torch.tensor([[[0.5, 0.5, 1e-30]]]))
    ref_logits = torch.log(torch.tensor([[[0.25, 0.25, 0.5]]]))
    kl, ent = token_stats(pi_logits, ref_logits, torch.ones(1, 1))
    assert float(kl) == pytest.approx(math.log(2.0), abs=1e-6) and float(ent) == pytest.approx(math.log(2.0), abs=1e-6)


def test_full_update_learns_pi_star_on_a_toy_token_mdp():
    """Sampled tokens -> targets from the target Q -> Q regression, policy loss, Polyak: converges to pi*."""
    beta = 0.5
    mdp = ToyMDP(seed=4, l_max=2, gamma=0.9, ref_scale=0.5)
    states = [mdp.s0] + mdp.s1
    nodes = [(s, p) for s in states for p in mdp.prefixes()]
    index = {k: i for i, k in enumerate(nodes)}
    ref = torch.stack([mdp.ref_logits(s, p) for s, p in nodes])  # (N, V) reference logits of every prefix
    theta = ref.clone().requires_grad_(True)  # policy logits, starting at pi_bar (like a zero LoRA)
    q_res = torch.zeros_like(ref, requires_grad=True)  # Q-network logits minus ref: Q == 0 at init
    q_tgt = torch.zeros_like(ref)
    opt_q = torch.optim.Adam([q_res], lr=0.05)
    opt_pi = torch.optim.Adam([theta], lr=0.05)
    g = torch.Generator().manual_seed(0)

    def sample_action(s):
        a = []
        while len(a) < mdp.l_max and (not a or a[-1] != EOS):
            probs = F.softmax(theta[index[(s, tuple(a))]].detach(), -1)
            a.append(int(torch.multinomial(probs, 1, generator=g)))
        return tuple(a)

    for _ in range(600):
        # 1. roll out 16 episodes with pi_theta
        trans = []
        for _ in range(16):
            s = mdp.s0
            while s is not None:
                a = sample_action(s)
                r, done, s_next = mdp.step(s, a)
                trans.append((s, a, r, done, s_next))
                s = None if done else s_next
        n, T = len(trans), mdp.l_max
        idx = torch.zeros(n, T, dtype=torch.long)  # (n, T) node of prefix x^j
        tokens = torch.zeros(n, T, dtype=torch.long)
        mask = torch.zeros(n, T, dtype=torch.float64)
        next_idx = torch.zeros(n, dtype=torch.long)
        for b, (s, a, r, done, s_next) in enumerate(trans):
            for j in range(len(a)):
                idx[b, j], tokens[b, j], mask[b, j] = index[(s, a[:j])], a[j], 1.0
            next_idx[b] = index[(s_next, ())] if s_next is not None else 0
        lengths = mask.sum(1).long()
        rewards = torch.tensor([t[2] for t in trans], dtype=torch.float64)
        dones = torch.tensor([float(t[3]) for t in trans], dtype=torch.float64)
        # 2. targets with the target Q-network: V at every prefix and at the next state's empty prefix
        with torch.no_grad():
            values = soft_value(theta[idx], q_tgt[idx], ref[idx], beta)  # (n, T)
            next_values = soft_value(theta[next_idx], q_tgt[next_idx], ref[next_idx], beta)  # (n,)
            y = token_targets(values, lengths, rewards, next_values, dones, mdp.gamma)
        # 3. Q regression on the sampled tokens, then the policy loss with the online Q, then Polyak
        opt_q.zero_grad()
        q_taken = q_res[idx].gather(-1, tokens[..., None])[..., 0]  # (n, T) Q(x^j, w^{j+1})
        q_loss(q_taken, y, mask).backward()
        opt_q.step()
        opt_pi.zero_grad()
        policy_loss(theta[idx], q_res[idx], ref[idx], beta, mask).backward()
        opt_pi.step()
        polyak_update([q_tgt], [q_res.detach()], tau=0.1)

    # compare the learned action distribution with the action-level soft-optimal one, pi*(a|s) for s_0
    v_star_fn = action_level_soft_optimal(mdp, beta)
    v0, q0 = v_star_fn(mdp.s0)
    log_ref = torch.tensor([mdp.action_logprob(mdp.ref_logits, mdp.s0, a) for a in mdp.actions], dtype=torch.float64)
    pi_star = torch.exp(log_ref + (torch.tensor(q0, dtype=torch.float64) - v0) / beta)
    assert float(pi_star.sum()) == pytest.approx(1.0, abs=1e-9)
    learned = torch.exp(
        torch.tensor(
            [mdp.action_logprob(lambda s, p: theta[index[(s, tuple(p))]].detach(), mdp.s0, a) for a in mdp.actions],
            dtype=torch.float64,
        )
    )
    tv = 0.5 * float((learned - pi_star).abs().sum())
    start = torch.exp(log_ref)
    assert 0.5 * float((start - pi_star).abs().sum()) > 0.1  # the problem is not trivial
    print(f'TV(start, pi*) = {0.5 * float((start - pi_star).abs().sum()):.3f}, TV(learned, pi*) = {tv:.4f}')
    assert tv < 0.02
