"""
Train an LLM coding agent with ETPO: `python train.py --dataset cmc` (or the PPO-KL baseline: `--algo ppo_kl`).

Paper: Wen et al., "Entropy-Regularized Token-Level Policy Optimization for Language Agent Reinforcement",
arXiv 2402.06700, Algorithm 1; ../shared/ETPO.md section 6. The loop below reads top to bottom as the paper's
algorithm: (1) roll out the policy in N parallel episodes, (2) execute the code, (3) compute per-token soft values
and targets with no gradient, (4) update the soft Q-network, (5) update the policy, (6) Polyak-average the target.

Departures from the paper (each is a flag; README "Departures from the paper"):
1. LoRA adapters on one frozen base (model.py) and AdamW at lr 1e-4, where the paper fine-tunes four full copies
   with Lion at lr 1e-6 (`--optimizer lion` runs Lion on the adapters, by default at about a third of AdamW's lr).
2. Q is the residual of the Q adapter's logits over the reference logits (ETPO.md section 5).
3. `--model tiny` uses its own defaults (PRESETS below), so a 2-core CPU learns something in minutes.
4. Optional lambda-return targets inside an action (--lam; 0 = the paper's one-step target, the default for real
   LLMs; the tiny preset uses 1, which measured far better, see the README) and several Q steps per batch.
5. Each adapter's gradient norm is clipped (--grad-clip 1.0).
6. Optional conservative Q penalty (--conservative; 0 = the paper, the default for real LLMs; the tiny preset uses
   0.5, which kept 90-iteration runs from diverging, see the README).

Both algorithms share everything but the update (etpo_update / ppo_kl_update below): the rollout, the environment,
logging, checkpoints and resume (run_folder.py: the run's folder, its lock, files written whole, stop signals).
PPO-KL rolls out --rollout-steps environment steps per iteration (default: the episode's step limit) so that GAE has
episodes to run over; ETPO needs one.
"""

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import env
import etpo
import execution
import lion
import model
import ppo_kl
import run_folder
import sampling

# -----------------------------------------------------------------------------------------------------------------
# configuration: argparse, defaults = the paper (ETPO.md section 6); None = the model preset's value
parser = argparse.ArgumentParser(description="ETPO: train an LLM to write scikit-learn code for a tabular dataset.")
# environment
parser.add_argument("--dataset", default="cmc", help=f"one of {', '.join(env.dataset_names())}, or path.csv[:target]")
parser.add_argument("--data-dir", default="data", help="folder with one sub-folder per Kaggle dataset")
parser.add_argument("--openml-cache", default=None, help="openml cache folder (sets OPENML_CACHE_DIR)")
parser.add_argument("--max-rows", type=int, default=env.MAX_ROWS, help="rows kept of a larger dataset, a shuffled "
                    "sample (CAAFE's 2000, as in the paper); 0 = every row (programs then fit longer: see --timeout)")
parser.add_argument("--n-envs", type=int, default=None, help="parallel episodes N (paper 8)")
parser.add_argument("--episode-steps", type=int, default=5, help="step limit of an episode (paper 5)")
parser.add_argument("--timeout", type=float, default=60.0, help="seconds one program may run")
parser.add_argument("--workers", type=int, default=None,
                    help="programs run in parallel (default: the cores this process may use)")
# model
parser.add_argument("--model", default="codellama/CodeLlama-7b-hf", help="Hugging Face id or path, or 'tiny'")
parser.add_argument("--lora-rank", type=int, default=16, help="rank r of the LoRA adapters (alpha = 2 r)")
parser.add_argument("--lora-targets", default=",".join(model.LLAMA_TARGETS),
                    help="comma-separated names of the linear layers given adapters (default: every Llama projection)")
parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
parser.add_argument("--micro-batch", type=int, default=0, help="rows per forward and backward of an update, 0 = all "
                    "of them (ETPO: B; PPO-KL: a minibatch): less memory, the same gradient (otherwise halved at each "
                    "update that runs out of GPU memory)")
parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing from the start: less memory, "
                    "more compute (otherwise on once micro-batches of one row run out of GPU memory)")
# rollout
parser.add_argument("--max-new-tokens", type=int, default=None, help="tokens per action (paper 256)")
parser.add_argument("--temperature", type=float, default=None, help="sampling temperature of rollouts (paper 0.5)")
parser.add_argument("--top-k", type=int, default=None, help="top-k of rollouts, 0 = off (paper 50)")
parser.add_argument("--cuda-graph", action="store_true", help="replay the rollout's decode step as a CUDA graph "
                    "(transformers 5; checked on the CPU, not yet timed on a GPU)")
# ETPO (and what PPO-KL shares with it)
parser.add_argument("--algo", default="etpo", choices=["etpo", "ppo_kl"], help="the algorithm")
parser.add_argument("--beta", type=float, default=None, help="KL coefficient beta (paper 0.01)")
parser.add_argument("--gamma", type=float, default=0.99, help="discount between actions (paper 0.99)")
parser.add_argument("--optimizer", default="adamw", choices=["adamw", "lion"],
                    help="the adapters' optimizer: AdamW, or Lion as in the paper's code (lion.py)")
parser.add_argument("--lr", type=float, default=None,
                    help="learning rate of the adapters (AdamW 1e-4, Lion 3e-5; paper: Lion, 1e-6, on full copies)")
parser.add_argument("--tau", type=float, default=None, help="Polyak rate of the target Q adapter (paper 0.005)")
parser.add_argument("--q-steps", type=int, default=None, help="Q gradient steps per batch (paper 1)")
parser.add_argument("--lam", type=float, default=None, help="lambda of the in-action target, 0 = paper's one-step")
parser.add_argument("--grad-clip", type=float, default=1.0, help="clip each adapter's gradient norm, 0 = off")
parser.add_argument("--huber-delta", type=float, default=None, help="Huber loss for Q (official code: 10); default MSE")
parser.add_argument("--conservative", type=float, default=None,
                    help="weight alpha of a conservative Q penalty (etpo.conservative_penalty; paper 0)")
# PPO-KL only
parser.add_argument("--rollout-steps", type=int, default=None, help="env steps per iteration (ETPO 1, PPO-KL 5)")
parser.add_argument("--gae-lambda", type=float, default=0.95, help="GAE lambda over environment steps")
parser.add_argument("--clip", type=float, default=0.2, help="PPO clip range epsilon")
parser.add_argument("--ppo-epochs", type=int, default=4, help="passes over each rollout")
parser.add_argument("--minibatches", type=int, default=4, help="minibatches per pass")
# run
parser.add_argument("--steps", type=int, default=None, help="environment-step budget (paper 500)")
parser.add_argument("--out", default=None, help="run folder (default runs/DATASET-MODEL-ALGO)")
parser.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
parser.add_argument("--seed", type=int, default=0, help="random seed")
parser.add_argument("--sample-every", type=int, default=5, help="print a generated program every this many iterations")
parser.add_argument("--save-every", type=int, default=5, help="write the checkpoint every this many iterations")
args = parser.parse_args()
# the flags set on the command line: parsed again into a namespace that holds a marker for every flag, over which
# argparse writes no default
unset = object()
given = {k for k, v in vars(parser.parse_args(namespace=argparse.Namespace(**dict.fromkeys(vars(args), unset)))).items()
         if v is not unset}

PRESETS = {  # values a flag left at None takes: the paper's for real LLMs, small-and-fast ones for the tiny model
    "paper": dict(n_envs=8, max_new_tokens=256, temperature=0.5, top_k=50, beta=0.01, lr=1e-4, tau=0.005, q_steps=1,
                  lam=0.0, conservative=0.0, steps=500),
    "tiny": dict(n_envs=32, max_new_tokens=128, temperature=1.0, top_k=0, beta=0.2, lr=1e-3, tau=0.05, q_steps=2,
                 lam=1.0, conservative=0.5, steps=32 * 30),
}
LION_LR = {"paper": 3e-5, "tiny": 3e-4}  # --optimizer lion's lr, about a third of AdamW's (README, "Lion, the paper's
# optimizer")
preset = "tiny" if args.model == "tiny" else "paper"
for key, value in PRESETS[preset].items():
    if getattr(args, key) is None:
        setattr(args, key, LION_LR[preset] if key == "lr" and args.optimizer == "lion" else value)
if args.rollout_steps is None:
    args.rollout_steps = 1 if args.algo == "etpo" else args.episode_steps
model_name = os.path.basename(args.model.rstrip("/"))
out = args.out or os.path.join("runs", f"{env.folder_name(args.dataset)}-{model_name}-{args.algo}")
folder = run_folder.RunFolder(out)  # the lock, the checkpoint, the logs, one-sentence errors, stop signals
fail = folder.fail
# until the loop, where folder.stop_on_signals takes over, Ctrl-C (while the model loads, say) quits at once
signal.signal(signal.SIGINT, lambda signum, frame: fail("stopped by Ctrl-C before the first iteration", at_once=True))

checkpoint = folder.checkpoint(args.resume)  # None for a new run
if checkpoint is not None:
    saved = checkpoint["config"]
    keep = {"steps", "out", "resume", "sample_every", "save_every", "device", "workers", "data_dir", "openml_cache",
            "checkpointing", "micro_batch", "cuda_graph"}  # how to run, not what: these may change when a run continues
    saved.setdefault("conservative", 0.0)  # runs saved before the flag existed had no penalty
    saved.setdefault("optimizer", "adamw")  # and trained with AdamW
    saved.setdefault("max_rows", env.MAX_ROWS)  # and on at most CAAFE's 2000 rows
    for key in sorted(given - keep):  # a flag that would be silently overridden by the saved value
        if key in saved and getattr(args, key) != saved[key]:
            fail(f"--{key.replace('_', '-')} {getattr(args, key)} differs from the {saved[key]} this run started "
                 "with, and a resumed run keeps its configuration: drop the flag, or start a new run with another "
                 "--out")
    for key, value in saved.items():
        if key not in keep or (key == "steps" and key not in given):  # the run's budget, unless --steps changes it
            setattr(args, key, value)  # the run continues with the configuration it started with
checks = [  # a value out of range ends here with one sentence, not with a division by zero or a NaN mid-run
    (("n_envs", "episode_steps", "rollout_steps", "max_new_tokens", "lora_rank", "q_steps", "ppo_epochs", "minibatches",
      "save_every", "workers", "beta", "lr", "timeout", "huber_delta"), lambda v: v > 0, "must be positive"),
    (("gamma", "tau", "lam", "gae_lambda", "clip"), lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
    (("temperature", "top_k", "conservative", "grad_clip", "sample_every", "micro_batch", "max_rows"),
     lambda v: v >= 0, "must be 0 or more")]
for names, ok, rule in checks:
    for name in names:
        if getattr(args, name) is not None and not ok(getattr(args, name)):  # None: the default (all usable cores, MSE)
            fail(f"--{name.replace('_', '-')} {getattr(args, name)} {rule}")
batch = args.n_envs * args.rollout_steps  # derived numbers, computed once: transitions per iteration
iterations = args.steps // batch
if iterations < 1:
    fail(f"--steps {args.steps} is less than one iteration ({batch} environment steps): raise --steps or lower "
         "--n-envs")
if checkpoint is not None and checkpoint["it"] >= iterations:  # said before the model loads
    fail(f"{out} has run its {checkpoint['it']} iterations ({checkpoint['env']['env_steps']} environment steps) "
         "already: to train on, pass a larger --steps with --resume")
adapters = ("policy", "q", "q_target") if args.algo == "etpo" else ("policy", "value")
# micro-batches and gradient checkpointing: as the flags say, or as the run lowered them for good when an update ran
# out of GPU memory (in this run or before its checkpoint; update_within_memory below)
micro_batch = min([m for m in (args.micro_batch, checkpoint and checkpoint.get("micro_batch")) if m] or [0])
checkpointing = args.checkpointing or bool(checkpoint and checkpoint.get("checkpointing"))
print("config:", json.dumps(vars(args)))
print(f"derived: {iterations} iterations of {args.rollout_steps} x {args.n_envs} environment steps; run folder {out}"
      + (f"; micro-batches of {micro_batch} row{'s' * (micro_batch > 1)}, as the run lowered them when its update "
         "ran out of GPU memory"
         if micro_batch != args.micro_batch else "")
      + ("; gradient checkpointing on, as the run turned it on when its update ran out of GPU memory"
         if checkpointing and not args.checkpointing else ""))

# -----------------------------------------------------------------------------------------------------------------
# seed, environment, model, optimizers
random.seed(args.seed)
np.random.seed(args.seed)
torch.manual_seed(args.seed)
try:
    dataset = env.load_dataset(args.dataset, args.data_dir, args.openml_cache, args.max_rows)
except (ValueError, OSError, RuntimeError) as e:
    fail(str(e))
print("data:", dataset.summary)
folder.lock()  # before the model loads, too
try:
    if args.model == "codellama-7b-arch":  # bench.py's preset: it would fail at the first prompt, after a 7B build
        fail("codellama-7b-arch has random weights and no tokenizer (it is for bench.py and simulate.py): train "
             "codellama/CodeLlama-7b-hf")
    if args.cuda_graph and model.resolve_device(args.device).type != "cuda":  # said before a 7B model loads
        fail("--cuda-graph needs a CUDA GPU and this run is not on one: drop the flag")
    lm = model.load(args.model, device=args.device, r=args.lora_rank, alpha=2 * args.lora_rank,
                    targets=args.lora_targets.split(","), checkpointing=checkpointing, adapters=adapters)
except (ValueError, OSError, RuntimeError) as e:
    fail(str(e))
device = lm.device
generator = torch.Generator(device=device).manual_seed(args.seed)  # the rollouts' sampling
sandbox = execution.Sandbox(workers=args.workers)
coding_env = env.CodingEnv(dataset, n_envs=args.n_envs, max_steps=args.episode_steps, sandbox=sandbox,
                           infill=lm.supports_infill, timeout=args.timeout)
if args.algo == "etpo":
    etpo.polyak_update(lm.adapter_params("q_target"), lm.adapter_params("q"), tau=1.0)  # phi_bar <- phi
trained = ("policy", "q") if args.algo == "etpo" else ("policy", "value")  # q_target only moves by Polyak
optimizers = {name: lion.Lion(lm.adapter_params(name), lr=args.lr) if args.optimizer == "lion"
              else torch.optim.AdamW(lm.adapter_params(name), lr=args.lr, weight_decay=0.0) for name in trained}
start_it = 0
if checkpoint is not None:
    try:
        lm.load_adapter_state(checkpoint["adapters"])
    except ValueError as e:
        fail(str(e))
    for name, opt in optimizers.items():
        opt.load_state_dict(checkpoint["optimizers"][name])
    coding_env.load_state_dict(checkpoint["env"])
    sandbox.cache.update(checkpoint["reward_cache"])
    random.setstate(checkpoint["rng"]["python"])
    np.random.set_state(checkpoint["rng"]["numpy"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    start_it = checkpoint["it"]
    try:
        generator.set_state(checkpoint["rng"]["generator"].to("cpu"))
    except RuntimeError:  # the state of a generator on another device (--device may change when a run continues: a
        # run saved on a GPU, resumed on the CPU, or back) does not fit this one, whose numbers it could not repeat
        generator.manual_seed(args.seed + start_it)
        print(f"warning: this run was saved on another kind of device than {device.type}, whose sampling generator "
              f"cannot continue it: the rollouts sample from seed {args.seed + start_it} from here, so the run no "
              "longer repeats one that was never stopped")
    print(f"resumed from {folder.ckpt_path} at iteration {start_it} ({coding_env.env_steps} environment steps)")
folder.start_logs(["metrics.jsonl", "actions.jsonl"], start_it)  # one line per iteration; one per action


def save_checkpoint(it):
    """Everything needed to continue exactly: adapters (never the base), optimizers, RNG states, env counters."""
    state = {"adapters": lm.adapter_state(), "optimizers": {k: o.state_dict() for k, o in optimizers.items()}, "it": it,
             "config": vars(args), "checkpointing": checkpointing, "micro_batch": micro_batch,
             "env": coding_env.state_dict(), "reward_cache": sandbox.cache,
             "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                     "generator": generator.get_state()}}
    folder.save_checkpoint(state)


folder.stop_on_signals()  # Ctrl-C, SIGTERM, SIGUSR1: finish the iteration, save, exit (a second one: quit now)


@contextlib.contextmanager
def gpu_advice(stage, prompt_tokens=None):
    """A CUDA out-of-memory error (in the update, only in micro-batches of one row with gradient checkpointing on:
    update_within_memory), or with --cuda-graph any error in the rollout (its graph has been checked on the CPU, not
    yet on a GPU), ends the run with one sentence of advice instead of a traceback; the checkpoint on disk (written
    only between iterations) is left as it was. prompt_tokens: the batch's longest prompt, which the update's memory
    grows with."""
    resume = folder.resume_command()
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        prompts = f" with prompts of up to {prompt_tokens} tokens" if prompt_tokens else ""
        fail(f"the GPU ran out of memory in {stage} at B = {batch}{prompts}: start a new run with a smaller --n-envs "
             "or --max-new-tokens (README, 'Memory, simulated', gives the peak by batch size and prompt length)")
    except Exception as e:
        if not (args.cuda_graph and stage == "the rollout"):
            raise
        message = str(e).partition("\n")[0][:160]  # (a bare assert has none)
        fail(f"the rollout's CUDA graph failed ({type(e).__name__}{': ' + message if message else ''}); continue "
             f"without --cuda-graph{f' ({resume})' if resume else ''}")


tty = sys.stdout.isatty()
SAMPLE_LINES = 24  # of a sampled program, printed every --sample-every iterations
bad_updates, t_start, best_seen = 0, time.time(), coding_env.best_reward

# -----------------------------------------------------------------------------------------------------------------
# the updates: ETPO (Algorithm 1, steps 3-6) and the PPO-KL baseline; each returns (all losses finite, metrics)


def optimizer_step(name, loss):
    """Clip the adapter's gradient norm and step its optimizer; a non-finite loss skips the step."""
    if not torch.isfinite(loss):
        return False
    if args.grad_clip:
        torch.nn.utils.clip_grad_norm_(lm.adapter_params(name), args.grad_clip)
    optimizers[name].step()
    return True


def micro_batches(prompts, on="cpu"):
    """The rows of a batch with these prompt texts in micro-batches of --micro-batch rows (all of them, as one slice,
    when it is 0), one forward and backward each, as index tensors on the device `on`. The rows are taken prompt by
    prompt, so that rows with one prompt land in one micro-batch and share their prompt's forward there
    (model.AdapterLM.action_logits). A loss that is a mean over the batch is the sum over its micro-batches of each
    one's mean times its share, so their gradients add up to the batch's: the same step, and only one micro-batch's
    activations held at a time."""
    if not micro_batch:
        return [slice(0, len(prompts))]
    order = torch.tensor([row for rows in model.rows_by_prompt(prompts) for row in rows], device=on)  # (b,)
    return list(order.split(micro_batch))


def rows_of(action, rows):
    """The rows (a slice, or a tensor of indices) of an action: prompt ids, prompt mask, tokens, mask, prompt texts."""
    prompt_ids, prompt_mask, tokens, mask, prompts = action
    # the texts need the indices on the host: one read-back per forward, beside the one action_logits makes anyway
    # (its rows' prompt lengths), where an index left on the CPU would wait once for every tensor it indexes
    texts = prompts[rows] if isinstance(rows, slice) else [prompts[i] for i in rows.tolist()]
    return prompt_ids[rows], prompt_mask[rows], tokens[rows], mask[rows], texts


def etpo_targets(action, lengths, rewards, dones, next_prompts):
    """3. no gradient: soft values V(x_t^j) at every action prefix and V(x_{t+1}^0), then the per-token targets y.
    pi is the policy's own distribution (temperature 1) here and in step 5; the rollout's temperature and top-k only
    chose which prefixes were visited, and the Q regression is valid for any behaviour policy. Returns y (B, T), the
    reference logits (B, T, V) and their value at the taken tokens (B, T), and the statistics to log (tensors)."""
    _, _, tokens, mask, _ = action
    with torch.no_grad():
        with lm.adapter(None):
            ref_logits = lm.action_logits(*action)  # (B, T, V) pi_bar
        with lm.adapter("policy"):
            pi_logits = lm.action_logits(*action)  # (B, T, V)
        with lm.adapter("q_target"):
            q_tgt = etpo.q_from_logits(lm.action_logits(*action), ref_logits)  # (B, T, V) Q_target(x^j, .)
        values = etpo.soft_value(pi_logits, q_tgt, ref_logits, args.beta)  # (B, T) V(x^j), j = 0..T-1
        q_tgt_taken = q_tgt.gather(-1, tokens[..., None])[..., 0]  # (B, T) Q_target(x^j, w^{j+1})
        kl_ref, entropy = etpo.token_stats(pi_logits, ref_logits, mask)
        rare_mass = etpo.rare_token_mass(q_tgt, ref_logits, args.beta, mask)  # the early sign of a diverging run
        ref_taken = ref_logits.gather(-1, tokens[..., None])[..., 0].float()  # (B, T) l_bar(x^j)[w^{j+1}]
        del pi_logits, q_tgt  # from here on, per-token scalars (B, T) and the reference logits for step 5
        next_values = torch.zeros_like(rewards)  # (B,) V(x_{t+1}^0); 0 where done (it is multiplied by 1 - done)
        live = torch.nonzero(dones == 0).flatten()
        if len(live):
            next_ids, next_mask = lm.encode_prompts([next_prompts[i] for i in live.tolist()])
            with lm.adapter(None):
                next_ref = lm.last_logits(next_ids, next_mask)  # (n, V)
            with lm.adapter("policy"):
                next_pi = lm.last_logits(next_ids, next_mask)
            with lm.adapter("q_target"):
                next_q = etpo.q_from_logits(lm.last_logits(next_ids, next_mask), next_ref)
            next_values[live] = etpo.soft_value(next_pi, next_q, next_ref, args.beta)
        # ETPO eq. 6: y = V(x^{j+1}) inside the action, y = r + gamma * (1 - done) * V(x_{t+1}^0) on its last token
        y = etpo.token_targets(values, lengths, rewards, next_values, dones, args.gamma, lam=args.lam,
                               q_target_taken=q_tgt_taken)  # (B, T)
    stats = {"policy/kl_ref": kl_ref, "policy/entropy": entropy, "q/rare_mass": rare_mass}  # read back at the end
    return y, ref_logits, ref_taken, stats


def etpo_update(action, lengths, rewards, dones, next_prompts):
    # simulate.update repeats these forwards and optimizer steps on random tokens for bench.py: change both together
    _, _, tokens, mask, prompts = action  # prompts: the texts; rows with one prompt share its forward
    # the whole batch (a slice), or micro-batches of rows taken prompt by prompt, on the GPU before the update queues
    # any work there (an index on the CPU is copied over, after all the work queued before it, at every use)
    parts = micro_batches(prompts, on=device)
    # 3. no gradient: the per-token targets y (B, T) of ETPO eq. 6, and the reference logits (B, T, V)
    y, ref_logits, ref_taken, stats = etpo_targets(action, lengths, rewards, dones, next_prompts)

    # 4. Q update on the q adapter: regress Q(x^{j-1}, w^j) = l_Q[w] - l_bar[w] on the sampled tokens to y (the mean
    # over real tokens: each micro-batch's mean times its share of the tokens)
    losses_q, finite, q_taken = [], True, torch.zeros_like(y)  # q_taken (B, T): Q of the taken tokens, logged
    for _ in range(args.q_steps):
        optimizers["q"].zero_grad(set_to_none=True)
        loss_q = 0.0
        for rows in parts:
            share = mask[rows].sum() / mask.sum()
            with lm.adapter("q"):
                q_logits = lm.action_logits(*rows_of(action, rows))  # (b, T, V)
                taken = q_logits.gather(-1, tokens[rows][..., None])[..., 0].float() - ref_taken[rows]  # (b, T)
                loss = etpo.q_loss(taken, y[rows], mask[rows], args.huber_delta)
                if args.conservative:  # optional departure: + alpha * mean( V*(x) - Q(x, w_taken) )
                    q_all = etpo.q_from_logits(q_logits, ref_logits[rows])  # (b, T, V)
                    loss = loss + args.conservative * etpo.conservative_penalty(q_all, ref_logits[rows], tokens[rows],
                                                                                 args.beta, mask[rows])
                (loss * share).backward()
            loss_q = loss_q + loss.detach() * share
            q_taken[rows] = taken.detach()
        finite &= optimizer_step("q", loss_q)
        losses_q.append(loss_q.item())

    # 5. policy update on the policy adapter: KL(pi_theta || pi*) with pi* ~ pi_bar * exp(Q / beta), Q held fixed
    # (the reference logits are kept from step 3: B x T x V float32, 262 MB at B=8 for CodeLlama)
    optimizers["policy"].zero_grad(set_to_none=True)
    loss_pi = 0.0
    for rows in parts:
        part, share = rows_of(action, rows), mask[rows].sum() / mask.sum()
        with torch.no_grad(), lm.adapter("q"):
            q = etpo.q_from_logits(lm.action_logits(*part), ref_logits[rows])  # (b, T, V) online Q
        with lm.adapter("policy"):
            loss = etpo.policy_loss(lm.action_logits(*part), q, ref_logits[rows], args.beta, mask[rows])
            (loss * share).backward()
        loss_pi = loss_pi + loss.detach() * share
    finite &= optimizer_step("policy", loss_pi)

    # 6. Polyak: phi_bar <- (1 - tau) * phi_bar + tau * phi
    etpo.polyak_update(lm.adapter_params("q_target"), lm.adapter_params("q"), args.tau)
    return finite, {"loss/q": float(np.mean(losses_q)), "loss/pi": loss_pi.item(),
                    **{key: value.item() for key, value in stats.items()},
                    # how far back credit has travelled: Q of the first and of the last tokens
                    "q/first_token": float(q_taken[:, 0].mean()),
                    "q/last_token": float(q_taken.gather(1, (lengths - 1)[:, None]).mean())}


def ppo_kl_update(action, lengths, rewards, dones, next_prompts):
    prompt_ids, prompt_mask, tokens, mask, prompts = action
    K, N = args.rollout_steps, args.n_envs
    # 3. no gradient: log-probabilities of the sampled tokens, the KL inside the reward, V(s_t), GAE
    with torch.no_grad():
        with lm.adapter(None):
            ref_logits = lm.action_logits(*action)  # (B, T, V)
        with lm.adapter("policy"):
            pi_logits = lm.action_logits(*action)
        kl_ref, entropy = etpo.token_stats(pi_logits, ref_logits, mask)
        old_logp, ref_logp = ppo_kl.taken_logp(pi_logits, tokens), ppo_kl.taken_logp(ref_logits, tokens)  # (B, T)
        del pi_logits, ref_logits
        kl = ppo_kl.action_kl(old_logp, ref_logp, mask)  # (B,) KL_t of each action
        shaped = (rewards - args.beta * kl).view(K, N)  # ETPO.md sec. 7: the action's reward is r_t - beta * KL_t
        with lm.adapter("value"):
            values = lm.state_value(prompt_ids, prompt_mask, prompts).view(K, N)  # (K, N) V(s_t)
            last_ids, last_mask = lm.encode_prompts(next_prompts[-N:])
            last_values = lm.state_value(last_ids, last_mask, next_prompts[-N:])  # (N,) V(s_K), bootstraps the rest
        advantages, returns = ppo_kl.gae(shaped, values, dones.view(K, N), last_values, args.gamma, args.gae_lambda)
        advantages, returns = advantages.flatten(), returns.flatten()  # (B,) one per action
        if len(advantages) > 1:  # per-batch, as cleanrl ppo.py (one action has no std: it stays as it is)
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

    # 4-5. epochs of minibatches: the clipped surrogate on the policy adapter, the value loss on the value adapter,
    # each minibatch in micro-batches (the surrogate is a mean over real tokens, the value loss over rows)
    losses_pi, losses_v, finite = [], [], True
    for _ in range(args.ppo_epochs):
        for mb in torch.randperm(K * N).chunk(args.minibatches):
            parts = [mb[part] for part in micro_batches([prompts[i] for i in mb.tolist()])]  # (b,) rows each
            optimizers["policy"].zero_grad(set_to_none=True)
            loss_pi = 0.0
            for rows in parts:
                share = mask[rows].sum() / mask[mb].sum()
                with lm.adapter("policy"):
                    logp = ppo_kl.taken_logp(lm.action_logits(*rows_of(action, rows)), tokens[rows])  # (b, T)
                    loss = ppo_kl.clipped_policy_loss(logp, old_logp[rows], advantages[rows], mask[rows], args.clip)
                    (loss * share).backward()
                loss_pi = loss_pi + loss.detach() * share
            finite &= optimizer_step("policy", loss_pi)
            optimizers["value"].zero_grad(set_to_none=True)
            loss_v = 0.0
            for rows in parts:
                share = len(rows) / len(mb)
                with lm.adapter("value"):
                    part_ids, part_mask, _, _, part_prompts = rows_of(action, rows)
                    loss = ppo_kl.value_loss(lm.state_value(part_ids, part_mask, part_prompts), returns[rows])
                    (loss * share).backward()
                loss_v = loss_v + loss.detach() * share
            finite &= optimizer_step("value", loss_v)
            losses_pi.append(loss_pi.item())
            losses_v.append(loss_v.item())
    return finite, {"loss/v": float(np.mean(losses_v)), "loss/pi": float(np.mean(losses_pi)),
                    "policy/kl_ref": kl_ref.item(), "policy/entropy": entropy.item(), "ppo/action_kl": kl.mean().item()}


update = etpo_update if args.algo == "etpo" else ppo_kl_update


def update_within_memory(*transitions):
    """update(*transitions), and if it runs out of GPU memory, the same update again with less: in micro-batches of
    half as many rows, down to one row (no extra compute with B prompts), then with gradient checkpointing too (one
    more forward per backward). What it lowers stays lowered for the run (and its resumptions). Before each new
    attempt the adapters, the optimizers' state and torch's RNG go back to the copy taken on the CPU before the
    update, so that no step is taken twice (for CodeLlama-7B about 1.1 GB a copy: three adapters of 40 M float32
    parameters and two AdamW states of two each)."""
    global checkpointing, micro_batch
    most = batch if args.algo == "etpo" else math.ceil(batch / args.minibatches)  # the rows of a whole forward
    lowest = lambda: checkpointing and min(micro_batch or most, most) == 1  # noqa: E731 (nothing left to lower)
    if lowest():
        return update(*transitions)  # an out-of-memory error ends the run (gpu_advice)
    weights, rng = lm.adapter_state(), torch.get_rng_state()
    states = {name: cpu_copy(opt.state_dict()) for name, opt in optimizers.items()}
    while True:
        try:
            return update(*transitions)
        except torch.cuda.OutOfMemoryError:
            if lowest():
                raise
        # (here, once the error's traceback has let go of the failed attempt's tensors)
        lm.load_adapter_state(weights)
        for name, opt in optimizers.items():
            opt.load_state_dict(states[name])
            opt.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)
        rows = min(micro_batch or most, most)  # of one forward in the attempt that failed
        if rows > 1:
            micro_batch = (rows + 1) // 2
            how = (f"in micro-batches of {micro_batch} row{'s' * (micro_batch > 1)}, which stay for the rest of the "
                   "run (--micro-batch sets them from the start)")
        else:
            model.checkpoint_activations(lm.hf)
            checkpointing = True
            how = ("with gradient checkpointing, which stays on for the rest of the run (--checkpointing turns it "
                   "on from the start)")
        print(f"warning: iteration {it + 1}: the update ran out of GPU memory at B = {batch} with prompts of up to "
              f"{transitions[0][0].shape[1]} tokens; it runs again {how}")


def cpu_copy(state):
    """A copy on the CPU of an optimizer's state_dict, whose tensors are the optimizer's own."""
    return {"state": {i: {k: v.to("cpu", copy=True) for k, v in s.items()} for i, s in state["state"].items()},
            "param_groups": state["param_groups"]}


# -----------------------------------------------------------------------------------------------------------------
# the loop
loss_key = "loss/q" if args.algo == "etpo" else "loss/v"
for it in range(start_it, iterations):
    t0 = time.time()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # perf/gpu_peak_gib: this iteration's peak, rollout or update
    # 1-2. roll out pi_theta (the policy adapter) in N parallel episodes for K environment steps; execute the code:
    # reward r_t (ROC AUC or -1), done_t and the next state s_{t+1} (K = 1 for ETPO)
    steps, t_rollout, t_env = [], 0.0, 0.0
    for _ in range(args.rollout_steps):
        prompts = list(coding_env.prompts)
        t1 = time.time()
        bar = tqdm(total=args.max_new_tokens, desc="rollout (tokens)", leave=False, disable=not tty)
        with gpu_advice("the rollout"), bar:
            tokens, lengths, texts = sampling.generate(lm, prompts, adapter="policy",
                                                       max_new_tokens=args.max_new_tokens,
                                                       temperature=args.temperature, top_k=args.top_k,
                                                       stop_strings=env.STOP_STRINGS, generator=generator,
                                                       progress=bar, cuda_graph=args.cuda_graph)
        t_rollout += time.time() - t1
        t1 = time.time()
        with tqdm(total=1, desc=f"running {len(texts)} programs", leave=False, disable=not tty):
            try:
                rewards, dones, next_prompts, infos = coding_env.step(texts)
            except execution.SandboxError as e:
                resume = folder.resume_command()
                fail(f"{e}; then continue with {resume}" if resume else str(e))
        t_env += time.time() - t1
        steps.append((prompts, tokens, lengths, rewards, dones, next_prompts, infos))
    # the K x N transitions as one batch B, step-major: row k * N + n is episode n at step k
    prompts_k, tokens_k, lengths_k, rewards_k, dones_k, next_prompts_k, infos_k = zip(*steps)  # K of each
    T = max(t.shape[1] for t in tokens_k)
    tokens = torch.cat([F.pad(t, (0, T - t.shape[1]), value=lm.tokenizer.pad_token_id) for t in tokens_k])  # (B, T)
    lengths = torch.cat(lengths_k)  # (B,)
    rewards = np.concatenate(rewards_k)  # (B,)
    rewards_t = torch.tensor(rewards, dtype=torch.float32, device=device)
    dones_t = torch.tensor(np.concatenate(dones_k), dtype=torch.float32, device=device)  # (B,)
    prompts = [p for step in prompts_k for p in step]  # (B,) every episode's first step has the same prompt
    next_prompts = [p for step in next_prompts_k for p in step]  # (B,) s_{t+1} of each transition
    infos = [info for step in infos_k for info in step]  # (B,)
    prompt_ids, prompt_mask = lm.encode_prompts(prompts)  # (B, P)
    mask = torch.arange(T, device=device)[None] < lengths[:, None]  # (B, T) bool: the real tokens

    # 3-6. the algorithm's update
    t1 = time.time()
    with gpu_advice("the update", prompt_ids.shape[1]):
        finite, stats = update_within_memory((prompt_ids, prompt_mask, tokens, mask, prompts), lengths, rewards_t,
                                             dones_t, next_prompts)
    t_update = time.time() - t1  # its statistics are read back (.item()), so the device has finished its work

    # -------------------------------------------------------------------------------------------------------------
    # logging, best program, checkpoint, NaN guard
    if not finite:
        bad_updates += 1
        print(f"warning: iteration {it}: a non-finite loss ({stats}); that update was skipped")
        if bad_updates >= 3:
            save_checkpoint(it + 1)
            fail(f"{bad_updates} non-finite losses in a row; the last good state is in {folder.ckpt_path}: "
                 "lower --lr or raise --beta and resume")
    else:
        bad_updates = 0
    elapsed = time.time() - t_start
    n_done = it + 1 - start_it
    success = np.array([info["error"] is None for info in infos])
    first = np.array([info["step"] == 1 for info in infos])  # first attempts, from the task prompt s_0
    metrics = {"it": it, "env_steps": coding_env.env_steps, "env/reward_mean": float(rewards.mean()),
               "env/success_rate": float(success.mean()), "env/auc_best": coding_env.best_reward,
               "env/first_try_reward": float(rewards[first].mean()) if first.any() else None,
               "env/episodes": coding_env.episodes, **stats,
               "perf/tokens_per_s": float(lengths.sum()) / t_rollout, "perf/iter_s": time.time() - t0,
               "perf/rollout_s": t_rollout, "perf/env_s": t_env, "perf/update_s": t_update,
               "perf/shared_prompt": sum(len(rows) for rows in model.rows_by_prompt(prompts) if len(rows) > 1)
               / len(prompts),  # rows whose prompt another row has too
               "perf/prompt_tokens": prompt_ids.shape[1],  # the longest prompt: the update's memory grows with it
               "perf/gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
               "perf/checkpointing": checkpointing, "perf/micro_batch": micro_batch,
               "time_s": elapsed}
    folder.append_line("metrics.jsonl", json.dumps(metrics))
    actions = [{"it": it, "episode": row % args.n_envs, "step": int(info["step"]), "tokens": n,
                "reward": float(info["reward"]), "error": info["error"], "code": info["code"]}
               for row, (info, n) in enumerate(zip(infos, lengths.tolist()))]
    folder.append_line("actions.jsonl", "\n".join(json.dumps(action) for action in actions))
    eta = elapsed / n_done * (iterations - it - 1)
    print(f"it {it + 1}/{iterations} | steps {coding_env.env_steps} | reward {metrics['env/reward_mean']:+.3f} | "
          f"success {metrics['env/success_rate']:.2f} | best {coding_env.best_reward:.4f} | "
          f"{loss_key[5:].upper()} {metrics[loss_key]:.4f} | pi {metrics['loss/pi']:+.3f} | "
          f"kl {metrics['policy/kl_ref']:.4f} | H {metrics['policy/entropy']:.3f} | "
          f"{metrics['perf/tokens_per_s']:.0f} tok/s | {elapsed:.0f}s | ETA {eta:.0f}s"
          + (f" | {metrics['perf/gpu_peak_gib']:.1f} GiB" if metrics["perf/gpu_peak_gib"] is not None else ""),
          flush=True)
    if coding_env.best_reward > best_seen:
        best_seen = coding_env.best_reward
        header = (f"# ROC AUC {best_seen:.4f} on {dataset.name} (mean of 5 random 50/50 splits), iteration {it + 1}, "
                  f"environment step {coding_env.env_steps}\n")
        folder.replace_file("best_code.py", lambda f: f.write((header + coding_env.best_code).encode()))
    if args.sample_every and (it + 1) % args.sample_every == 0:
        # the n-th sample: a first attempt when n is odd, a reflection (if the batch has one) when n is even, from a
        # row that moves along the batch
        n = (it + 1) // args.sample_every
        rows = [b for b, action in enumerate(actions) if (action["step"] > 1) == (n % 2 == 0)] or range(len(actions))
        row = rows[n // 2 % len(rows)]
        action, code = actions[row], actions[row]["code"].rstrip().splitlines()  # one line of actions.jsonl
        if len(code) > SAMPLE_LINES:
            code = code[:SAMPLE_LINES] + [f"    ... (cut at {SAMPLE_LINES} of {len(code)} lines)"]
        error = action["error"]
        result = f"reward {action['reward']:.4f}" if error is None else f"error: {error.splitlines()[-1]}"
        print(f"--- sample (episode {action['episode']}, step {action['step']}), after:\n"
              f"{env.prompt_tail(prompts[row])}\n--- its action:\n" + "\n".join(code) + f"\n--- {result}")
    last = it + 1 == iterations
    if last or folder.stop_requested or (it + 1) % args.save_every == 0:
        save_checkpoint(it + 1)
    if folder.stop_requested:
        print(f"saved {folder.ckpt_path} at iteration {it + 1}; continue with --resume --out {out}")
        break

sandbox.close()
print(f"done: best ROC AUC {coding_env.best_reward:.4f} on {dataset.name}; files in {out}")
