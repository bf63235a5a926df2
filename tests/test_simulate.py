"""
simulate.py on the tiny preset (small shapes): the update and the rollout simulated on fake tensors hold exactly the
bytes the same update and rollout hold on real tensors, with and without gradient checkpointing and with one shared
prompt (in micro-batches of one row, a little more); one simulation measures every batch size as a new one would;
the largest batch fits the budget and the next does not; one shared prompt costs fewer FLOPs and bytes; the by-module
ledger charges every kernel once, to the module whose forward runs it or to the backward pass.

Run: python -m pytest tests/test_simulate.py -q
"""

import os
import re
import subprocess
import sys

import pytest

import simulate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_simulate(*args):
    r = subprocess.run([sys.executable, "simulate.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.slow
def test_memory_simulation_matches_real_tensors():
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4.x reads the attention mask's values, which fake tensors do not have")
    out = run_simulate("--model", "tiny", "--batch", "2", "--prompt-len", "32", "--action-len", "16",
                   "--gpu-gib", "0.02", "--rollout-batches", "2")
    peaks = {}
    for label in ("no checkpointing", "gradient checkpointing"):
        # the update on fake tensors holds exactly the bytes the same update holds on real tensors
        row = re.search(rf"\| update B=2, {label}, on real tensors here \| ([\d,]+) bytes \| simulated: ([\d,]+) "
                        "bytes", out)
        real, simulated = row.groups()
        assert real == simulated and int(real.replace(",", "")) > 0
        peak, before, per_row = map(float, re.search(
            rf"\| update B=2, {label} \| (\S+) GiB \| (\S+) GiB \| (\S+) GiB \|", out).groups())
        assert before < peak and per_row > 0
        peaks[label] = peak
        # the largest B fits in the budget and the next one does not
        n, fits, needs = re.search(rf"B = (\d+) \({label}, (\S+) GiB; B = \d+ needs (\S+) GiB\)", out).groups()
        assert int(n) > 2 and float(fits) <= 0.02 <= float(needs)  # (printed to 3 digits: the next may round to it)
    assert peaks["gradient checkpointing"] < peaks["no checkpointing"]
    # the rollout: the fake one stops at its first sampled token, and its peak (the prefill's) is the real one's
    real, simulated = re.search(r"\| rollout B=2, on real tensors here \| ([\d,]+) bytes \| simulated: ([\d,]+) ",
                                out).groups()
    assert real == simulated and int(real.replace(",", "")) > 0
    assert re.search(r"\| rollout, static cache \| B = 2: \S+ GiB \|", out)
    flops = {}
    for shared in ("", ", one shared prompt"):
        kernels, moved, flops[shared] = re.search(rf"\| operators of one update B=2{shared} \| ([\d,]+) kernels \| "
                                                  r"(\S+) GB moved \| (\S+) FLOP in matmuls", out).groups()
        assert int(kernels.replace(",", "")) > 1000 and float(moved) > 0
    assert float(flops[", one shared prompt"]) < float(flops[""])  # the prompt runs once for both rows
    # in micro-batches of one row the fake update cannot see the padding a real one drops (simulate.print_real_check):
    # it holds a little more, and less than the update of both rows at once
    real, simulated = (int(n.replace(",", "")) for n in re.search(
        r"\| update B=2, micro-batches of 1 row, no checkpointing, on real tensors here \| ([\d,]+) bytes \| "
        r"simulated: ([\d,]+) bytes", out).groups())
    assert real <= simulated <= 1.01 * real
    peak = float(re.search(r"\| update B=2, micro-batches of 1 row, no checkpointing \| (\S+) GiB \|", out).group(1))
    assert peak < peaks["no checkpointing"]
    # the shared prompt's update holds exactly the bytes simulated too, and less than two prompts' update
    real, simulated = re.search(r"\| update B=2, one shared prompt, no checkpointing, on real tensors here \| "
                                r"([\d,]+) bytes \| simulated: ([\d,]+) bytes", out).groups()
    assert real == simulated
    two = re.search(r"\| update B=2, no checkpointing, on real tensors here \| ([\d,]+) bytes", out).group(1)
    assert int(real.replace(",", "")) < int(two.replace(",", ""))
    # one decode step: the fake one launches the kernels and moves the bytes of the real one; it reads every weight
    # and the filled slots of the static cache, P + T/2 = 40 of 48 at the action's middle step, whose bytes are
    # 2 (keys, values) x layers x B x slots x width
    row = re.search(r"\| decode step B=2, on real tensors here \| ([\d,]+) kernels, ([\d,]+) bytes moved \| "
                    r"simulated: ([\d,]+) kernels, ([\d,]+) bytes moved", out).groups()
    assert row[:2] == row[2:] and int(row[0].replace(",", "")) > 100
    moved, weights, cache, share = re.search(
        r"\| decode step B=2, static cache, P\+T/2 of P\+T slots read \| [\d,]+ kernels \| (\S+) GB moved: "
        r"weights (\S+) GB, KV cache (\S+) GB \| at most (\d+)% of the decode roofline", out).groups()
    config = simulate.load_config("tiny")
    width = config.num_key_value_heads * config.hidden_size // config.num_attention_heads
    assert float(cache) * 1e9 == pytest.approx(2 * config.num_hidden_layers * 2 * 40 * width * 2, rel=1e-3)  # bf16
    assert float(weights) + float(cache) < float(moved)
    assert abs(int(share) - 100 * float(weights) / float(moved)) <= 1


def test_one_simulation_measures_every_batch_size_as_a_new_one_would():
    # what an update leaves (adapters, AdamW state, gradients, the adapters' bf16 copies) does not depend on B, so the
    # table's search for the largest B reuses one model: each of its updates holds what a fresh simulation's would
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4.x reads the attention mask's values, which fake tensors do not have")
    config = simulate.load_config("tiny")
    one = simulate.Simulation(config, 8, 4)  # (a bigger B first: what it left would show in the smaller one's peak)
    assert [one.peaks(B) for B in (3, 1)] == [simulate.simulate(config, B, 8, 4) for B in (3, 1)]


def test_operators_count_what_a_lookup_reads():
    """An embedding, an index_select, an index and a gather read the entries they return (and their indices), not
    the whole table; a matmul reads both its inputs whole and writes its output."""
    import torch

    table, rows = torch.zeros(1000, 64), torch.tensor([1, 2, 3])  # float32 (4 bytes each), int64 indices (8 bytes)
    index = rows[:, None].expand(3, 64).contiguous()  # (3, 64): gather's index names every entry it reads
    b = torch.ones(8, 2)
    cases = [(lambda: torch.nn.functional.embedding(rows, table), 3 * 64 * 4 * 2 + 3 * 8),
             (lambda: table.index_select(0, rows), 3 * 64 * 4 * 2 + 3 * 8),
             (lambda: table[rows], 3 * 64 * 4 * 2 + 3 * 8),
             (lambda: table.gather(0, index), 3 * 64 * 4 * 2 + 3 * 64 * 8),
             (lambda: table[:4, :8] @ b, (4 * 8 + 8 * 2 + 4 * 2) * 4)]
    for op, moved in cases:
        with simulate.Operators() as ops:
            op()
        assert (ops.kernels, ops.bytes) == (1, moved)


def test_operators_by_module_charge_each_kernel_once_to_the_module_running_it():
    import torch

    import model

    lm = model.load("tiny", device="cpu")
    B, P, T = 2, 8, 4
    prompt_ids, prompt_mask = simulate.random_prompts(lm, B, P)
    tokens = torch.randint(3, lm.hf.config.vocab_size, (B, T))
    with lm.adapter("q"), simulate.OperatorsByModule(lm) as ops:
        loss = lm.action_logits(prompt_ids, prompt_mask, tokens, torch.ones(B, T)).logsumexp(-1).mean()
        loss.backward()
    charged = ops.by_module
    assert [sum(c[i] for c in charged.values()) for i in (0, 1)] == [ops.kernels, ops.bytes]  # each kernel once
    assert charged["Linear"][0] == len(lm.layers)  # one matmul per frozen projection; the LoRA terms are LoRALinear's
    assert charged["LoRALinear"][0] > 0 and charged["backward"][0] > 0 and charged["outside the model"][0] > 0
    norms = [m for m in lm.hf.modules() if isinstance(m, torch.nn.RMSNorm)]  # model.torch_rms_norm's, 2 per block + 1
    x = torch.randn(B, P + T, lm.hf.config.hidden_size)  # the shape every norm sees here
    with simulate.Operators() as one, torch.no_grad():
        norms[0](x)
    assert charged["RMSNorm"] == [len(norms) * one.kernels, len(norms) * one.bytes]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.hf.modules())  # the hooks are gone
