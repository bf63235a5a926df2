"""
Lion, the optimizer of the paper's code, for the adapters (`python train.py --optimizer lion`; AdamW is the default).

Paper: Wen et al., "Entropy-Regularized Token-Level Policy Optimization for Language Agent Reinforcement", arXiv
2402.06700, whose official hyper-parameters (../shared/ETPO.md section 6) train with Lion at lr 1e-6. Lion: Chen et al.,
"Symbolic Discovery of Optimization Algorithms", arXiv 2302.06675, Algorithm 2. Each step moves every weight by exactly
lr, in the direction of the sign of an interpolation of its gradient and its momentum, and keeps one state tensor per
weight where AdamW keeps two. README, "Lion, the paper's optimizer", compares the two on the tiny model.

Departures from the paper:
1. No weight decay (as train.py's AdamW), and it trains LoRA adapters, not full copies, so train.py's default rate
   is its own: about a third of AdamW's, the upper end of the 3 to 10 times less that the Lion paper advises
   (its section 5).
"""

import torch


class Lion(torch.optim.Optimizer):

    def __init__(self, params, lr, betas=(0.9, 0.99)):
        super().__init__(params, dict(lr=lr, betas=betas))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p)
                m = self.state[p]["exp_avg"]  # the momentum, p's shape
                # Lion: theta <- theta - lr * sign(beta1 * m + (1 - beta1) * g)
                p.add_(torch.sign(m.lerp(p.grad, 1 - beta1)), alpha=-group["lr"])
                # Lion: m <- beta2 * m + (1 - beta2) * g
                m.lerp_(p.grad, 1 - beta2)
