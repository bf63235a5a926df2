"""
Measure ETPO's hot loop against the machine's own limits (in the spirit of nanoGPT's bench.py).

On a CUDA GPU it builds the `codellama-7b-arch` preset (CodeLlama-7B's exact shapes, random bf16 weights, no download)
and reports: rollout tokens/s with the static KV cache that sampling.py uses and with transformers' dynamic one, against
the decode roofline (weight bytes per step over the HBM bandwidth measured here); the kernels and the bytes moved per
decode step, and the tokens/s that traffic allows; the milliseconds and MFU of one full ETPO update against the bf16
matmul rate measured here; peak memory of both, the largest batch that fits, the update in micro-batches and with
gradient checkpointing (how train.py lowers its memory), the bytes stored per transition between the rollout and the
update, and the time of train.py's copy of the adapters and AdamW state to the CPU before each update. On a CPU it
runs the `tiny` preset, so CI can smoke-test it. The update it times is simulate.update (train.py's steps 3-6 on random
tokens); simulate.py counts the same update's memory and operators on fake tensors, without a GPU.

    python bench.py                                    # the model: rollout, update, memory
    python bench.py --env cmc --openml-cache DIR       # the environment: 16 programs, cold and warm reward cache
    python bench.py --sample breast_cancer --model tiny  # the reference policy: runnable share of 256 programs
    python bench.py --numerics RUN/ckpt.pt             # bf16 against float32: the error of Q and of pi*
    python bench.py --profile                          # the same, then the top operators of a rollout and an update
    python simulate.py                                 # memory of an update and a rollout, simulated (no GPU)
"""

import argparse
import contextlib
import copy
import math
import sys
import time

import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import env
import etpo
import execution
import model
import sampling
import tiny
from simulate import (Operators, adamw, batch_sizes, counted_flops, random_prompts, simulate, simulate_rollout,
                      step_weight_bytes, update)

parser = argparse.ArgumentParser(description="Benchmark ETPO's rollout and update, or the environment.")
parser.add_argument("--model", default=None, help="default: codellama-7b-arch on CUDA, tiny on CPU")
parser.add_argument("--batch", type=int, default=8, help="transitions per update B")
parser.add_argument("--prompt-len", type=int, default=512, help="prompt tokens P")
parser.add_argument("--action-len", type=int, default=256, help="action tokens T")
parser.add_argument("--rollout-batches", type=batch_sizes, default="8,32",
                    help="batch sizes for the rollout measurement")
parser.add_argument("--iters", type=int, default=3, help="timed repetitions (after one warm-up)")
parser.add_argument("--max-batch", action="store_true", help="also search the largest B whose update fits (CUDA)")
parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators of a rollout "
                    "and of an update")
parser.add_argument("--transformers-norm", action="store_true", help="keep transformers' RMSNorm instead of "
                    "torch's fused one (model.torch_rms_norm): the figures before it")
parser.add_argument("--env", default=None, help="benchmark the environment on this dataset instead of the model")
parser.add_argument("--sample", default=None, help="sample programs from the reference policy on this dataset")
parser.add_argument("--samples", type=int, default=256, help="programs to sample (--sample), 64 rows at a time")
parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (--sample)")
parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (--sample)")
parser.add_argument("--numerics", default=None, help="a train.py checkpoint: its Q in bf16 against float32")
parser.add_argument("--openml-cache", default=None, help="openml cache folder")
parser.add_argument("--data-dir", default="data", help="folder with the Kaggle datasets")
parser.add_argument("--workers", type=int, default=2, help="programs run in parallel (--env)")
parser.add_argument("--max-rows", type=int, default=env.MAX_ROWS, help="rows kept of a larger dataset, 0 = all "
                    "(--env, --sample; train.py's flag)")
args = parser.parse_args()
for name in ("batch", "prompt_len", "action_len", "iters", "workers", "samples"):  # one sentence, not a ZeroDivision
    if getattr(args, name) < 1:
        sys.exit(f"error: --{name.replace('_', '-')} {getattr(args, name)} must be positive")
if args.max_rows < 0:
    sys.exit(f"error: --max-rows {args.max_rows} must be 0 or more")
fused_norm = not args.transformers_norm  # model.torch_rms_norm's fused RMSNorm, as train.py runs
started = time.perf_counter()
cuda = torch.cuda.is_available()
device = torch.device("cuda" if cuda else "cpu")


@contextlib.contextmanager
def user_input():
    """A bad --model, dataset or checkpoint, or a sandbox that cannot start, ends with one sentence, as in train.py,
    instead of a traceback."""
    try:
        yield
    except (ValueError, OSError, RuntimeError) as e:
        sys.exit(f"error: {e}")


def failure(e):
    """An exception in one line for a table row: its type, and its message's first line if it has one."""
    message = str(e).partition("\n")[0][:100]
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


def sync():
    if cuda:
        torch.cuda.synchronize()


def peak_memory():
    return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else "CUDA only"


def timed(fn, iters):
    """Mean seconds of fn() over iters runs, after one warm-up run."""
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters


if args.env:  # ----------------------------------------------------------------------------------------------------
    with user_input():
        dataset = env.load_dataset(args.env, args.data_dir, args.openml_cache, args.max_rows)
    programs = [env.SIGNATURE + body for body in tiny.training_corpus()[:16]]  # varied, some broken, like a policy's
    sandbox = execution.Sandbox(workers=args.workers)
    t0 = time.perf_counter()
    with user_input():  # and a sandbox that cannot start (a full temporary folder)
        results = sandbox.run(programs, dataset)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    sandbox.run(programs, dataset)
    warm = time.perf_counter() - t0
    sandbox.close()
    ok = sum(error is None for _, error in results)
    print("| dataset | rows | programs | runnable | workers | cold (s) | warm cache (s) |\n" + "|---" * 7 + "|")
    print(f"| {dataset.name} | {len(dataset.y) + len(dataset.y_test)} | {len(programs)} | {ok} | {args.workers} | "
          f"{cold:.2f} | {warm:.4f} |")
    raise SystemExit

if args.sample:  # -------------------------------------------------------------------------------------------------
    with user_input():
        dataset = env.load_dataset(args.sample, args.data_dir, args.openml_cache, args.max_rows)
        t0 = time.perf_counter()
        lm = model.load(args.model or ("codellama/CodeLlama-7b-hf" if cuda else "tiny"), device=device,
                        fused_norm=fused_norm, adapters=())  # the reference samples: no adapters
    load_s = time.perf_counter() - t0
    generator = torch.Generator(device=device).manual_seed(args.seed)
    prompt = env.task_prompt(dataset, lm.supports_infill)
    texts = []
    for start in range(0, args.samples, 64):  # one draw of 64 programs varies a lot: 21 to 38 runnable (tiny)
        texts += sampling.generate(lm, [prompt] * min(64, args.samples - start), adapter=None,
                                   max_new_tokens=args.action_len, temperature=args.temperature,
                                   stop_strings=env.STOP_STRINGS, generator=generator)[2]
    sandbox = execution.Sandbox(workers=args.workers)
    with user_input():
        results = sandbox.run([env.program(t, lm.supports_infill) for t in texts], dataset)
    sandbox.close()
    n = len(results)
    runnable = sum(error is None for _, error in results) / n
    rewards = torch.tensor([reward for reward, _ in results], dtype=torch.float64)
    # standard errors of the mean over the n samples: sqrt(p (1 - p) / n) and std(r) / sqrt(n)
    print(f"| model | dataset | temperature | programs | runnable | distinct | mean reward | load (s) |\n"
          f"|---|---|---|---|---|---|---|---|\n| {lm.name} | {dataset.name} | {args.temperature} | {n} "
          f"| {runnable:.2f} ± {(runnable * (1 - runnable) / n) ** 0.5:.2f} | {len(set(texts))} "
          f"| {rewards.mean():+.3f} ± {rewards.std() / n ** 0.5:.3f} | {load_s:.1f} |")
    raise SystemExit

if args.numerics:  # ----------------------------------------------------------------------------------------------
    # the same trained adapters on the base in float32 (the truth) and in bf16 (what a GPU runs), on 16 actions the
    # policy samples: how far Q = l_Q - l_bar and pi* = softmax(log pi_bar + Q / beta) move, with the float32 LM
    # head that model.py uses and with logits rounded to bf16 as the model itself would return them
    try:
        ckpt = torch.load(args.numerics, map_location="cpu", weights_only=False)
        config, adapters = ckpt["config"], ckpt["adapters"]
    except Exception as e:  # any unreadable file gets the same answer, as in train.py and eval.py
        sys.exit(f"error: could not read the checkpoint {args.numerics} ({type(e).__name__}); pass a ckpt.pt that "
                 "train.py wrote")
    with user_input():
        lm32 = model.from_checkpoint(adapters, device, fused_norm=fused_norm)
        dataset = env.load_dataset(config["dataset"], args.data_dir, args.openml_cache,
                                   config.get("max_rows", env.MAX_ROWS))
    lm32.hf.float()
    lm16 = copy.deepcopy(lm32)
    lm16.hf.to(torch.bfloat16)
    for layer in lm16.layers:  # the adapters stay float32 masters, as in training
        layer.A.float()
        layer.B.float()
    prompts = [env.task_prompt(dataset, lm32.supports_infill)] * 16
    torch.manual_seed(0)
    tokens, lengths, _ = sampling.generate(lm32, prompts, max_new_tokens=64)
    prompt_ids, prompt_mask = lm32.encode_prompts(prompts)
    mask = torch.arange(tokens.shape[1], device=device)[None] < lengths[:, None]
    action = (prompt_ids, prompt_mask, tokens, mask)

    @torch.no_grad()
    def q_and_ref(lm, rounded):
        logits = {}
        for name in ("q", None):
            with lm.adapter(name):
                logits[name] = lm.action_logits(*action)
                if rounded:
                    logits[name] = logits[name].bfloat16().float()
        return etpo.q_from_logits(logits["q"], logits[None]), logits[None]

    truth = q_and_ref(lm32, False)
    runs = {"float32 model": truth, "bf16, float32 head": q_and_ref(lm16, False), "bf16 logits": q_and_ref(lm16, True)}
    taken = lambda q: q.gather(-1, tokens[..., None])[..., 0][mask.bool()]  # noqa: E731
    betas = sorted({0.01, 0.05, config["beta"]})
    print(f"| {config['model']}, {dataset.name} | " + " | ".join(runs) + " |\n" + "|---" * (len(runs) + 1) + "|")
    print("| mean abs error of Q at the taken tokens | "
          + " | ".join(f"{(taken(q) - taken(truth[0])).abs().mean():.4f}" for q, _ in runs.values()) + " |")
    for beta in betas:
        p = etpo.log_pi_star(*truth, beta)  # KL(pi*_float32 || pi*) = sum_w pi*_float32 (log pi*_float32 - log pi*)
        kl = [(p.exp() * (p - etpo.log_pi_star(q, ref, beta))).sum(-1)[mask.bool()].mean() for q, ref in runs.values()]
        print(f"| KL(pi*_float32 \\|\\| pi*), beta {beta} | " + " | ".join(f"{k:.4f}" for k in kl) + " |")
    raise SystemExit

# ----------------------------------------------------------------------------------------------------------------
# the machine's limits: bf16 (fp32 on CPU) matmul rate and memory bandwidth, measured here
name = args.model or ("codellama-7b-arch" if cuda else "tiny")
dtype = torch.bfloat16 if cuda else torch.float32


def matmul_rate(n):
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, 10)  # FLOP/s


def copy_bandwidth(nbytes):
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * nbytes / timed(lambda: y.copy_(x), 10)  # bytes read + written per second


peak_flops = matmul_rate(8192 if cuda else 1024)
bandwidth = copy_bandwidth(2**30 if cuda else 2**26)

with user_input():
    lm = model.load(name, device=device, fused_norm=fused_norm)
cfg = lm.hf.config
V, d, L = cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers
weight_bytes = sum(p.numel() * p.element_size() for p in lm.hf.parameters())  # base and all adapters
step_bytes = step_weight_bytes(lm)  # what a decode step reads of them: the base and the policy adapter
linear_params = sum(layer.base.weight.numel() for layer in lm.layers)  # every projection of every block
# what a record in BENCHMARKS.md needs beside the figures: the command, the date and the versions
print(f"python {' '.join(sys.argv)}  # {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, transformers "
      f"{transformers.__version__}, Python {sys.version.split()[0]}")
print(f"{name} on {torch.cuda.get_device_name() if cuda else 'CPU'}: {weight_bytes / 1e9:.3g} GB of weights "
      f"({step_bytes / 1e9:.3g} GB read per decode step), "
      f"matmul {peak_flops / 1e12:.1f} TFLOP/s, memory bandwidth {bandwidth / 1e9:.0f} GB/s (measured)"
      + (", transformers' RMSNorm" if args.transformers_norm else ""))


# ----------------------------------------------------------------------------------------------------------------
# The figures come in order of need, each row printed as soon as it is measured: first the four that say whether
# 7B trains fast on one GPU (1-4: rollout tokens/s, update MFU, peak memory and largest B, bytes per transition),
# then the comparisons that explain them (5-9), then the CUDA graph, which had never run on a GPU when this was
# written, the profile, and last the largest batch with one shared prompt, the longest search. A run stopped by a time
# limit, or broken by the graph, keeps every row before.


def row(line):
    print(line, flush=True)


row("| what | figure | against | peak memory |\n|---|---|---|---|")
torch.manual_seed(0)
batches = {B: random_prompts(lm, B, args.prompt_len) for B in args.rollout_batches}
tok_s = {}  # (variant, B) -> tokens/s, for the rows that compare with it
variants = {"static cache": {}, "dynamic cache": {"cache": "dynamic"},  # sampling.py's default, transformers' cache,
            "static cache + CUDA graph": {"cuda_graph": True}}  # and the static one's step replayed (CUDA only)


def rollout_rows(variant):
    """1. rollout: tokens/s of sampling.sample_ids with the KV cache at every B, against the decode roofline."""
    for B, (prompt_ids, prompt_mask) in batches.items():
        lengths = []
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        def rollout():  # the same seed for every variant, so they sample the same tokens
            generator = torch.Generator(device).manual_seed(0)
            lengths.append(sampling.sample_ids(lm, prompt_ids, prompt_mask, "policy", args.action_len,
                                               temperature=1.0, generator=generator, **variants[variant])[1])

        try:
            seconds = timed(rollout, args.iters)
        except Exception as e:  # a variant that fails (the untried CUDA graph, say) costs its own rows only
            row(f"| rollout B={B}, {variant} | failed: {failure(e)} | | |")
            continue
        tokens = float(torch.stack(lengths).float().mean(0).sum())  # tokens per rollout (tiny stops at EOS)
        tok_s[variant, B] = tokens / seconds
        # decode roofline: every step reads the weights once, so steps/s <= bandwidth / their bytes (KV ignored)
        roofline = B * bandwidth / step_bytes
        row(f"| rollout B={B}, {variant} | {tok_s[variant, B]:,.0f} tok/s | {tok_s[variant, B] / roofline:.0%} of "
            f"{roofline:,.0f} tok/s roofline | {peak_memory()} |")


rollout_rows("static cache")

# ----------------------------------------------------------------------------------------------------------------
# 2. one full ETPO update: milliseconds, MFU, peak memory (the first run, timed's warm-up, creates the AdamW state)
B, P, T = args.batch, args.prompt_len, args.action_len
untrained = lm.adapter_state()  # the updates below move the adapters; every rollout samples with these
optimizers = adamw(lm)
if cuda:
    torch.cuda.reset_peak_memory_stats()
bytes_per_transition = []
seconds = timed(lambda: bytes_per_transition.append(update(lm, optimizers, B, P, T)), args.iters)
peak = peak_memory()

# FLOPs of one update, counted matmul by matmul (2 FLOPs per multiply-add). N = weights of every projection of every
# block, N_lora = LoRA weights of one adapter (r * (in + out) per projection), N_0 = layer 0's q, k, v projections
# (their input is the frozen embedding, so no gradient flows into it), S = tokens per row, K = logits kept per row.
lora_params = sum(layer.A["policy"].numel() + layer.B["policy"].numel() for layer in lm.layers)
first_qkv = [m for n, m in lm.hf.named_modules() if isinstance(m, model.LoRALinear)
             and n.startswith("model.layers.0.self_attn.") and n.split(".")[-1] in ("q_proj", "k_proj", "v_proj")]
first_params = sum(layer.base.weight.numel() for layer in first_qkv)
first_lora_in = sum(layer.A["policy"].numel() for layer in first_qkv)  # r * in of their LoRA A


def forward_flops(S, K, lora):  # forward of B rows: 2 S (N + N_lora if an adapter is on) + 2 K d V (the LM head,
    # in float32 on bf16 values: TF32 tensor cores on a GPU)
    return B * (2 * S * (linear_params + lora * lora_params) + 2 * K * d * V)


def backward_flops(S, K):
    # the frozen base computes input gradients only: 2 S (N - N_0) + 2 K d V; LoRA computes weight gradients,
    # 2 S N_lora, and input gradients, 2 S (N_lora - r * in of layer 0's q, k, v)
    return B * (2 * S * (linear_params - first_params) + 2 * K * d * V + 2 * S * (2 * lora_params - first_lora_in))


def attention_flops(S):  # causal: QK^T and AV over S^2 / 2 query-key pairs, 2 d FLOPs each, in every layer
    return B * 2 * L * S * S * d


# step 3: ref, policy, q_target forwards over the action (S = P + T, K = T) and over the next prompt (S = P,
# K = 1); step 4: q forward + backward; step 5: q forward, policy forward + backward. A backward of the attention
# costs twice its forward (dQ, dK, dV and the scores' gradient).
matmul_flops = (5 * forward_flops(P + T, T, 1) + forward_flops(P + T, T, 0) + 2 * backward_flops(P + T, T)
                + 2 * forward_flops(P, 1, 1) + forward_flops(P, 1, 0))
flops = matmul_flops + (6 + 2 * 2) * attention_flops(P + T) + 3 * attention_flops(P)
with FlopCounterMode(display=False) as counter:  # torch's own count of the same update, to check the formula
    update(lm, optimizers, B, P, T)
# Its matmuls must equal the formula's exactly; it counts attention as full S x S scores (no causal half) with a
# backward of 2.5 forwards, on a CPU only in torch 2.15 (not in 2.4 or 2.13; simulate.counted_flops).
counted_matmuls, counted_attention = counted_flops(counter)
row(f"| update B={B} P={P} T={T} | {seconds * 1e3:,.0f} ms | {flops / seconds / peak_flops:.0%} MFU "
    f"({flops / seconds / 1e12:.1f} TFLOP/s) | {peak} |")
row(f"| FLOP per update | {flops:.4g} (matmuls {matmul_flops:.4g}, attention {flops - matmul_flops:.4g}) "
    f"| matmuls {counted_matmuls:.4g}, attention {counted_attention:.4g} (full scores) counted by "
    "torch.utils.flop_counter | |")

# 3. what a transition keeps between the rollout and the update
row(f"| stored per transition | {bytes_per_transition[-1] / 1024:.1f} KiB | tokens (int64), mask (bool), y and "
    f"the ref logit of the taken token (float32), prompt ids (int32) and mask (bool) | |")

# 3b. train.py's copy before each update while it can still lower its memory (update_within_memory): the adapters and
# the AdamW state to the CPU, from which an update that runs out of GPU memory runs again


def copy_to_cpu():  # every tensor train.py copies, as one list
    adapters = [p for weights in lm.adapter_state()["weights"].values() for p in weights]
    states = [s for opt in optimizers.values() for s in opt.state_dict()["state"].values()]  # one per parameter
    return adapters + [v.to("cpu", copy=True) for s in states for v in s.values()]


copy_seconds = timed(copy_to_cpu, args.iters)
copy_bytes = sum(t.numel() * t.element_size() for t in copy_to_cpu())
row(f"| copy before an update, to the CPU | {copy_seconds * 1e3:,.0f} ms | {copy_bytes / 1e9:.3g} GB: the adapters and "
    f"the AdamW state, {copy_bytes / copy_seconds / 1e9:.2g} GB/s | |")


def largest_batch(shared):
    """4. (and 12.) the largest B whose update fits (CUDA): double from B until one runs out of memory, then
    bisect."""

    def fits(rows):
        try:
            update(lm, optimizers, rows, P, T, shared)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    low, high = 0, B  # the largest B known to fit, and the next to try (then: the smallest known not to)
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    row(f"| largest update batch (P={P}, T={T}{', one shared prompt' if shared else ''}) | B = {low} fits, {high} "
        "does not | | |")


if args.max_batch and cuda:
    largest_batch(shared=False)

# 4b. the two ways train.py lowers an update's memory when it runs out (update_within_memory): micro-batches, which
# add no FLOPs with B prompts but run smaller matmuls, then gradient checkpointing, which recomputes each block's
# forward
for micro, checkpointing in [*((m, False) for m in dict.fromkeys([max(1, B // 4), 1])), (0, True)]:
    if checkpointing:
        model.checkpoint_activations(lm.hf)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    lowered = timed(lambda: update(lm, optimizers, B, P, T, micro_batch=micro), args.iters)
    how = "gradient checkpointing" if checkpointing else f"micro-batches of {micro} row{'s' * (micro > 1)}"
    row(f"| update B={B}, {how} | {lowered * 1e3:,.0f} ms | {lowered / seconds:.2f}x the time of the whole batch at "
        f"once ({flops / lowered / peak_flops:.0%} MFU) | {peak_memory()} |")
disable = getattr(lm.hf, "activation_checkpointing_disable", None) or lm.hf.gradient_checkpointing_disable  # (5.25's
disable()  # name, and the one before) back to the update as train.py starts it
lm.hf.eval()
lm.load_adapter_state(untrained)  # the rollouts' policy again: the tiny model, trained on, would stop at EOS elsewhere

# ----------------------------------------------------------------------------------------------------------------
# 5. transformers' torch.cat cache, for comparison with the static one
rollout_rows("dynamic cache")

# 6. one more rollout of each cache at the last B, counted: the prefill and one forward per further token (a CUDA
# graph's replays are invisible to a dispatch mode; they replay the static cache's kernels)
rollout_B = list(batches)[-1]
prompt_ids, prompt_mask = batches[rollout_B]
bounds = {}
for variant in ("static cache", "dynamic cache"):
    with Operators() as ops:
        generator = torch.Generator(device).manual_seed(0)
        steps = int(sampling.sample_ids(lm, prompt_ids, prompt_mask, "policy", args.action_len, temperature=1.0,
                                        generator=generator, **variants[variant])[1].max())
    # what the operators move per token, the prefill's share included; at that traffic and the bandwidth measured
    # here, B tokens take (bytes per step) / bandwidth seconds, so at best the roofline times weights / bytes moved
    per_step = ops.bytes / steps
    bounds[variant] = bound = rollout_B * bandwidth / per_step
    achieved = tok_s.get((variant, rollout_B), math.nan)  # nan if that rollout failed above
    row(f"| decode step B={rollout_B}, {variant} | {ops.kernels / steps:,.0f} kernels, {per_step / 1e9:.3g} GB "
        f"moved | {achieved / bound:.0%} of {bound:,.0f} tok/s at that traffic ({step_bytes / per_step:.0%} of the "
        "roofline) | |")

# 7. one RMSNorm at CodeLlama's width, counted: transformers' and torch's (model.torch_rms_norm, a fused kernel
# forward and backward on a GPU), in bf16; a 7B forward runs 65 of them per token
for label, norm in (("transformers'", LlamaRMSNorm(4096)), ("torch's", model.torch_rms_norm(LlamaRMSNorm(4096)))):
    norm.to(device, torch.bfloat16).requires_grad_(False)  # frozen, as in the model
    x = torch.randn(1024, 4096, device=device, dtype=torch.bfloat16, requires_grad=True)  # (tokens, d)
    grad = torch.randn_like(x)
    with Operators() as forward:
        y = norm(x)
    with Operators() as backward:
        y.backward(grad)
    row(f"| RMSNorm, {label}, bf16 | {forward.kernels} kernels forward, {backward.kernels} backward | "
        f"{forward.bytes / x.numel():.0f} + {backward.bytes / x.numel():.0f} bytes moved per value | |")

# 8. all rows with one prompt (an episode's first step): the rollout with a prefill per row and with one in all
# (sample_ids' prompts), and the update, which runs the prompt once per sequence of model.rows_per_sequence rows
one_ids, one_mask = prompt_ids[:1].expand(rollout_B, -1), prompt_mask[:1].expand(rollout_B, -1)  # (B, P)
one_tok_s = {}
for shared in (False, True):
    lengths = []
    seconds_one = timed(lambda: lengths.append(sampling.sample_ids(
        lm, one_ids, one_mask, "policy", args.action_len, temperature=1.0,
        generator=torch.Generator(device).manual_seed(0), prompts=["one prompt"] * rollout_B if shared else None)[1]),
        args.iters)
    one_tok_s[shared] = float(torch.stack(lengths).float().mean(0).sum()) / seconds_one
row(f"| rollout B={rollout_B}, one shared prompt, one prefill | {one_tok_s[True]:,.0f} tok/s | "
    f"{one_tok_s[True] / one_tok_s[False]:.2f}x the speed with a prefill per row ({one_tok_s[False]:,.0f} tok/s) | |")
if cuda:
    torch.cuda.reset_peak_memory_stats()
shared_seconds = timed(lambda: update(lm, optimizers, B, P, T, shared=True), args.iters)
row(f"| update B={B}, one shared prompt, {model.rows_per_sequence(cfg, P, T)} rows per sequence | "
    f"{shared_seconds * 1e3:,.0f} ms | {seconds / shared_seconds:.2f}x the speed with B prompts | "
    f"{peak_memory()} |")
lm.load_adapter_state(untrained)  # (for the CUDA graph's rollouts and the profile's)

if cuda:  # 9. the same update and rollouts on fake tensors (python simulate.py), next to the peaks measured above
    try:
        simulated = f"{simulate(lm.hf.config, B, P, T, fused_norm=fused_norm)[1] / 2**30:.2f} GiB"
        rollouts = ", ".join(f"B={n}: {simulate_rollout(lm.hf.config, n, P, T, fused_norm=fused_norm) / 2**30:.2f} GiB"
                             for n in batches)
    except Exception as e:  # a failure here costs these two rows, not the CUDA graph's and the profile's after them
        simulated = rollouts = f"failed: {failure(e)}"
    row(f"| update B={B} peak memory, simulated on fake tensors | {simulated} | measured {peak} | |")
    row(f"| rollout peak memory, simulated on fake tensors | {rollouts} | measured above | |")

    # 10. the static cache's decode step replayed as a CUDA graph: the same kernels and bytes, one launch
    rollout_rows("static cache + CUDA graph")
    if ("static cache + CUDA graph", rollout_B) in tok_s:
        bound = bounds["static cache"]
        row(f"| decode step B={rollout_B}, static cache + CUDA graph | one graph launch | "
            f"{tok_s['static cache + CUDA graph', rollout_B] / bound:.0%} of {bound:,.0f} tok/s at that traffic | |")

if args.profile:  # where the time goes: the operators that take most of it, on the device and in Python's thread
    from torch.profiler import ProfilerActivity, profile

    jobs = {f"rollout B={rollout_B}, static cache": lambda: sampling.sample_ids(lm, prompt_ids, prompt_mask,
                                                                                "policy", args.action_len),
            f"update B={B}": lambda: update(lm, optimizers, B, P, T)}
    for job, fn in jobs.items():
        with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
            fn()
            sync()
        print(f"\n{job}:\n" + prof.key_averages().table(
            sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=12))

if args.max_batch and cuda:  # 12. the largest update batch with one shared prompt, last: its search runs the largest
    # updates of all (about 310 rows of them on an 80 GB card, twice as many on a 141 GB one, by the simulated
    # peaks), so a time limit costs this row alone
    row("\n| what | figure | against | peak memory |\n|---|---|---|---|")
    largest_batch(shared=True)
print(f"\nbench.py took {time.perf_counter() - started:.0f} s")  # for planning a run on a GPU lent for minutes
