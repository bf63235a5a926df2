"""
lion.py: two Lion steps on four weights, enumerated by hand (arXiv 2302.06675, Algorithm 2, lr 0.1, betas 0.9 and
0.99), where the momentum outweighs a small gradient of the other sign, and a weight with no gradient stays; a state
saved between the steps and loaded into a new optimizer continues the same (train.py's checkpoints and its copy
before an update that may run out of GPU memory).

Run: python -m pytest tests/test_lion.py -q
"""

import torch

from lion import Lion

G1 = [0.5, -0.1, 0.5, 0.0]
G2 = [-0.04, 0.0, -0.05, 0.0]


def step(opt, p, g):
    p.grad = torch.tensor(g, dtype=torch.float64)
    opt.step()


def test_two_steps_by_hand():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64))
    opt = Lion([p], lr=0.1)
    # step 1, m = 0: c = 0.1 g = (0.05, -0.01, 0.05, 0), so theta moves by -0.1 sign(c); m = 0.01 g
    step(opt, p, G1)
    assert torch.allclose(p.data, torch.tensor([0.9, -1.9, 0.4, 3.0], dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.allclose(opt.state[p]["exp_avg"], torch.tensor([0.005, -0.001, 0.005, 0.0], dtype=torch.float64),
                          rtol=0, atol=1e-15)
    # step 2: c = 0.9 m + 0.1 g = (0.0045 - 0.004, -0.0009 + 0, 0.0045 - 0.005, 0) = (0.0005, -0.0009, -0.0005, 0):
    # the first weight keeps its direction against a gradient of the other sign, the third turns back, the fourth
    # (no gradient, no momentum) stays
    step(opt, p, G2)
    assert torch.allclose(p.data, torch.tensor([0.8, -1.8, 0.5, 3.0], dtype=torch.float64), rtol=0, atol=1e-15)
    # m = 0.99 m + 0.01 g = (0.00495 - 0.0004, -0.00099, 0.00495 - 0.0005, 0)
    assert torch.allclose(opt.state[p]["exp_avg"], torch.tensor([0.00455, -0.00099, 0.00445, 0.0],
                                                                dtype=torch.float64), rtol=0, atol=1e-15)


def test_a_saved_state_continues_the_same():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64))
    opt = Lion([p], lr=0.1)
    step(opt, p, G1)
    q = torch.nn.Parameter(p.detach().clone())
    resumed = Lion([q], lr=0.1)
    resumed.load_state_dict(opt.state_dict())
    step(opt, p, G2)
    step(resumed, q, G2)
    assert torch.equal(p, q) and torch.equal(opt.state[p]["exp_avg"], resumed.state[q]["exp_avg"])
