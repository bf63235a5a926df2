"""
bench.py runs end to end on the CPU (tiny preset, small shapes): the model table, the environment table, the
reference-policy sampling table and the bf16 numerics table come out with numbers. Figures themselves are measured,
never asserted; what is asserted is how they relate (the static cache moves fewer bytes than the dynamic one, torch's
RMSNorm launches no more kernels than transformers', the MFU's FLOP formula equals torch's own count, every rollout
samples with one policy). A bad model,
dataset or checkpoint, or a sandbox that cannot start, ends with one sentence.

Run: python -m pytest tests/test_bench.py -q
"""

import json
import os
import re
import subprocess
import sys

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(*args, env=None):
    r = subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


# logs each of bench.py's rollouts: its prompts, its generator's seed (None: unseeded), the policy adapter's weights
# (summed) and the tokens it sampled
LOG_ROLLOUTS = """import json, os, sampling
sample_ids = sampling.sample_ids


def logged(lm, prompt_ids, *args, **kwargs):
    tokens, lengths = sample_ids(lm, prompt_ids, *args, **kwargs)
    seed = kwargs["generator"].initial_seed() if kwargs.get("generator") is not None else None
    policy = sum(float(p.double().abs().sum()) for p in lm.adapter_params("policy"))
    with open(os.environ["ROLLOUT_LOG"], "a") as f:
        f.write(json.dumps([prompt_ids.tolist(), seed, policy, tokens.tolist()]) + "\\n")
    return tokens, lengths


sampling.sample_ids = logged
"""


def test_model_benchmark_on_cpu(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(LOG_ROLLOUTS)
    log = tmp_path / "rollouts.jsonl"
    out = bench("--batch", "2", "--prompt-len", "32", "--action-len", "16", "--rollout-batches", "2", "--iters", "1",
                "--profile", env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), ROOT]),
                                  "ROLLOUT_LOG": str(log)})
    # every rollout samples with the policy of the first, although the update rows between them train its adapter,
    # and the seeded ones of the same prompts sample the same tokens, with either cache: the rows compare like with like
    rollouts = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rollouts) >= 9 and len({policy for _, _, policy, _ in rollouts}) == 1
    sampled = {}
    for prompt_ids, seed, _, tokens in rollouts:
        if seed is not None:
            sampled.setdefault((json.dumps(prompt_ids), seed), []).append(tokens)
    assert all(tokens == runs[0] for runs in sampled.values() for tokens in runs)
    # the record's provenance comes first: the command, the date and the versions
    assert re.search(r"^python bench.py --batch 2 .* --profile  # \d{4}-\d\d-\d\d, torch \S+, transformers \S+, "
                     r"Python 3\.\d+", out, re.M)
    assert re.search(r"\| rollout B=2, static cache \| [\d,]+ tok/s", out)
    assert re.search(r"\| rollout B=2, dynamic cache \| [\d,]+ tok/s", out)
    moved = {}
    for cache in ("static", "dynamic"):
        row = re.search(rf"\| decode step B=2, {cache} cache \| ([\d,]+) kernels, (\S+) GB moved \| \d+% of [\d,]+ "
                        r"tok/s at that traffic \((\d+)% of the roofline\) \|", out)
        assert int(row.group(1).replace(",", "")) > 50 and 0 < int(row.group(3)) < 100
        moved[cache] = float(row.group(2))
    assert moved["static"] < moved["dynamic"]  # the dynamic cache copies itself at every step
    norm = {}  # one bf16 RMSNorm, counted: torch's (fused on a GPU, the same operations on a CPU) is never more
    for label in ("transformers'", "torch's"):
        row = re.search(rf"\| RMSNorm, {label}, bf16 \| (\d+) kernels forward, (\d+) backward \| (\d+) \+ (\d+) "
                        r"bytes moved per value", out)
        norm[label] = tuple(map(int, row.groups()))
    assert 1 <= norm["torch's"][0] <= norm["transformers'"][0] and 1 <= norm["torch's"][1] <= norm["transformers'"][1]
    assert re.search(r"\| rollout B=2, one shared prompt, one prefill \| [\d,]+ tok/s \| [\d.]+x the speed", out)
    assert re.search(r"\| update B=2 P=32 T=16 \| [\d,]+ ms \| \d+% MFU", out)
    assert re.search(r"\| update B=2, one shared prompt, \d+ rows per sequence \| [\d,]+ ms \| [\d.]+x the speed", out)
    for how in ("micro-batches of 1 row", "gradient checkpointing"):  # the two ways train.py lowers an update's memory
        assert re.search(rf"\| update B=2, {how} \| [\d,]+ ms \| [\d.]+x the time of the whole batch at once", out)
    # the FLOP formula beside the MFU is exact: torch's own counter agrees on the matmuls to the last printed digit
    row = re.search(r"\| FLOP per update \| \S+ \(matmuls (\S+), attention \S+\) \| matmuls (\S+), attention (\S+) "
                    r"\(full scores\) counted by torch.utils.flop_counter", out)
    matmuls, counted, attention = row.groups()
    assert matmuls == counted
    # torch counts attention as full S x S scores, 4 B L S^2 d a forward, and a backward as 2.5 forwards: 6 forwards
    # and 2 backwards over S = P + T, 3 forwards over the next prompt (tiny: L = 2 layers, d = 96); the CPU kernel
    # in torch 2.15, not in 2.4 or 2.13
    full_scores = 4 * 2 * 2 * 96 * ((6 + 2 * 2.5) * (32 + 16) ** 2 + 3 * 32**2)
    assert attention in ("0", f"{full_scores:.4g}")
    # per transition: prompt ids (32 x 4 bytes, int32) and mask (32 x 1, bool), tokens (16 x 8, int64), mask
    # (16 x 1), y and ref logit (2 x 16 x 4, float32): 432 bytes (with int64 ids and masks and a float mask, 832)
    assert "| stored per transition | 0.4 KiB |" in out
    # train.py's copy before an update: three adapters and two AdamW states of two buffers each, float32 (tiny: 2
    # blocks of 7 projections, r = 16, 96 wide, 256 in the MLP: 32 x (4 x 192 + 3 x 352) LoRA weights an adapter)
    # and AdamW's step counts (28 float32 scalars per optimizer)
    copied = re.search(r"\| copy before an update, to the CPU \| [\d,]+ ms \| (\S+) GB: the adapters and the AdamW "
                       r"state, \S+ GB/s \|", out).group(1)
    assert float(copied) == float(f"{(7 * 32 * (4 * 192 + 3 * 352) + 2 * 28) * 4 / 1e9:.3g}")
    # the figures that say whether 7B trains fast on one GPU come first, so a run stopped by a time limit keeps them
    rows = ("| rollout B=2, static cache |", "| update B=2 P=32 T=16 |", "| stored per transition |",
            "| copy before an update, to the CPU |", "| rollout B=2, dynamic cache |",
            "| decode step B=2, static cache |", "| RMSNorm, transformers'", "| update B=2, one shared prompt,",
            "\nrollout B=2, static cache:\n")
    assert [out.index(r) for r in rows] == sorted(out.index(r) for r in rows)
    # --profile: torch.profiler's operator tables of a rollout and of an update, the matmuls among them
    for job in ("rollout B=2, static cache:", "update B=2:"):
        table = out.split(f"\n{job}\n")[1]
        assert "Self CPU time total" in table and "aten::mm" in table.split("Self CPU time total")[0]


@pytest.mark.slow
def test_environment_and_sampling_benchmarks():
    out = bench("--env", "iris", "--max-rows", "100")  # 100 of its 150 rows
    assert re.search(r"\| iris \| 100 \| 16 \| \d+ \| 2 \| [\d.]+ \| [\d.]+ \|", out)
    out = bench("--sample", "iris", "--model", "tiny", "--action-len", "96", "--samples", "80")  # 64 rows, then 16
    runnable, error, distinct, reward, reward_error = re.search(
        r"\| tiny \| iris \| 1.0 \| 80 \| (\S+) ± (\S+) \| (\d+) \| ([+-][\d.]+) ± (\S+) \|", out).groups()
    assert 0 <= float(runnable) <= 1 and 1 <= int(distinct) <= 80 and -1 <= float(reward) <= 1
    p = float(runnable)  # its standard error, as printed: sqrt(p (1 - p) / n)
    assert abs(float(error) - (p * (1 - p) / 80) ** 0.5) <= 0.006 and float(reward_error) >= 0


def test_numerics_benchmark_on_a_checkpoint(ckpt):
    out = bench("--numerics", ckpt)
    assert "| tiny, iris | float32 model | bf16, float32 head | bf16 logits |" in out
    errors = re.search(r"\| mean abs error of Q at the taken tokens \| (\S+) \| (\S+) \| (\S+) \|", out).groups()
    assert float(errors[0]) == 0.0 and float(errors[2]) > 0.0  # the float32 model against itself; bf16 rounding
    for beta in ("0.01", "0.05", "0.2"):
        assert re.search(rf"\| KL\(pi\*_float32 .+\), beta {beta} \| 0.0000 \| \S+ \| \S+ \|", out)


@pytest.mark.parametrize("args,phrase", [
    (["--model", "NO_SUCH_FOLDER"], "there is no model folder"),
    (["--sample", "nope", "--model", "tiny"], "unknown dataset 'nope'"),
    (["--numerics", "BAD"], "could not read the checkpoint"),
    (["--iters", "0"], "--iters 0 must be positive"),
    (["--rollout-batches", "0"], "'0' is not a comma-separated list of positive batch sizes"),  # argparse's line
    (["--env", "iris", "FULL"], "the sandbox could not start"),
])
def test_bad_input_ends_with_one_sentence(args, phrase, tmp_path, full_temporary_folder):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "sitecustomize.py").write_text(full_temporary_folder)  # FULL: on PYTHONPATH
    paths = {"NO_SUCH_FOLDER": str(tmp_path / "no-such-model"), "BAD": str(tmp_path / "bad.pt")}
    python_path = os.pathsep.join([str(tmp_path), ROOT] if "FULL" in args else [ROOT])
    r = subprocess.run([sys.executable, "bench.py", *(paths.get(a, a) for a in args if a != "FULL")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": python_path})
    assert r.returncode != 0 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert re.match(r"(bench\.py: )?error: ", last) and phrase in last, r.stderr[-2000:]
