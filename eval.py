"""
Evaluate a trained policy the way the paper does, and a few ways it does not.

Paper: Wen et al., "Entropy-Regularized Token-Level Policy Optimization for Language Agent Reinforcement",
arXiv 2402.06700, section 5 and table 2; ../shared/ETPO.md sections 1 and 8. The paper's metric is the highest
reward (ROC AUC) found within N environment steps, mean over 5 seeds, per dataset. For the program that reached
it, this file also reports the ROC AUC on the held-out rows that the reward never sees (env.py), the success rate
and the error rate at each step of an episode, next to the untrained model with the same reflection loop (the
paper's "Reflection" column) and plain scikit-learn classifiers. The paper's ETPO and PPO-KL columns are the
best reward found while training, within the run's environment steps: --runs reads it from train.py's run folders
(and runs the held-out check on that program), so one table holds Reflection, PPO-KL, ETPO and the baselines.
Extras: the perplexity of the reference and of the trained policy on a text file (the paper's table 3 check),
learning curves from metrics.jsonl and actions.jsonl, a per-token credit view of one program (Q, V, Q - V and the
KL to the reference at every token), and --export, which writes the trained policy, merged into its base model, as
a plain Hugging Face model folder.

    python eval.py --ckpt runs/cmc-CodeLlama-7b-hf-etpo/ckpt.pt --datasets cmc,credit_g --seeds 5 --steps 40
    python eval.py --model tiny --policies reference --datasets iris      # no checkpoint: the untrained model
    python eval.py --ckpt RUN/ckpt.pt --perplexity notes.txt --credit --curves RUN --plot curves.png
    python eval.py --runs RUN1,RUN2 --policies reference --steps 960   # table 2 (reference: the runs' base model)
    python eval.py --curves RUN1,RUN2 --plot curves.png     # learning curves alone (the plot needs matplotlib)
    python eval.py --ckpt RUN/ckpt.pt --export policy-model  # the policy as a plain Hugging Face model folder
"""

import argparse
import atexit
import csv
import html
import io
import json
import math
import os
import shutil
import sys

import numpy as np
import torch

import env
import etpo
import execution
import model
import sampling

parser = argparse.ArgumentParser(description="Best-of-N ROC AUC over datasets and seeds, and more.")
parser.add_argument("--ckpt", default=None, help="a checkpoint written by train.py")
parser.add_argument("--model", default=None,
                    help="the base model without --ckpt (e.g. tiny; with --runs, default: the model they trained)")
parser.add_argument("--policies", default=None, help="trained,reference (default: both with --ckpt)")
parser.add_argument("--datasets", default=None,
                    help="comma-separated dataset names (default: those of the --runs, or of the --ckpt's run, or cmc)")
parser.add_argument("--runs", default=None, help="comma-separated run folders of train.py: each adds the best reward "
                    "it found while training, the paper's ETPO and PPO-KL columns")
parser.add_argument("--seeds", type=int, default=5, help="repetitions per dataset (paper 5)")
parser.add_argument("--steps", type=int, default=40,
                    help="environment steps N per repetition (rounded up to a multiple of --n-envs)")
parser.add_argument("--n-envs", type=int, default=8, help="parallel episodes")
parser.add_argument("--temperature", type=float, default=None, help="default: the run's (tiny 1.0, else 0.5)")
parser.add_argument("--top-k", type=int, default=None, help="default: the run's (tiny 0, else 50)")
parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's (tiny 128, else 256)")
parser.add_argument("--data-dir", default="data", help="folder with the Kaggle datasets")
parser.add_argument("--openml-cache", default=None, help="openml cache folder")
parser.add_argument("--max-rows", type=int, default=None, help="rows kept of a larger dataset, 0 = all (default: "
                    "those the --runs or the --ckpt's run trained on, else CAAFE's 2000)")
parser.add_argument("--device", default=None, help="cuda or cpu")
parser.add_argument("--out", default="eval", help="folder for table.md, results.csv and the other outputs")
parser.add_argument("--perplexity", default=None, help="a text file: perplexity of the reference and the policy")
parser.add_argument("--credit", action="store_true", help="per-token Q, V, Q - V and KL of one program (ETPO)")
parser.add_argument("--curves", default=None, help="comma-separated run folders: their learning curves, as a table "
                    "and, with matplotlib installed, a plot")
parser.add_argument("--export", default=None, help="a new folder: write --ckpt's policy, merged into its base model, "
                    "as a plain Hugging Face model, and evaluate nothing")
parser.add_argument("--plot", default=None, help="PNG path for --curves (default OUT/curves.png)")
LAST_STEPS = 160  # a training run's first-attempt reward: the mean over its iterations within its last this many
# environment steps, a window of the same length for every algorithm (with the tiny preset: ETPO's last 5 iterations
# of 32 steps, PPO-KL's last one of 5 x 32)
OUT_OF_MEMORY = "the GPU ran out of memory; run again with a smaller --n-envs or --max-new-tokens"
ADAPTER_OF = {"trained": "policy", "reference": None}  # the adapter each policy runs with (None: the base)
BASELINES = {  # plain scikit-learn classifiers with default settings, a non-LLM reference
    "logistic_regression": "from sklearn.linear_model import LogisticRegression\n    model = LogisticRegression()",
    "random_forest": "from sklearn.ensemble import RandomForestClassifier\n    model = RandomForestClassifier()",
    "hist_gradient_boosting": "from sklearn.ensemble import HistGradientBoostingClassifier\n"
                              "    model = HistGradientBoostingClassifier()",
}


def load_policy(args, run_models=()):
    """The model and its adapters from a checkpoint, or the bare model (--model, else the one the --runs trained);
    and the run's configuration."""
    config = {}
    if args.ckpt:
        try:
            ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=False)
            config, adapters = ckpt["config"], ckpt["adapters"]  # the base, LoRA shape and adapters the run trained
            if not {"model", "lora", "weights"} <= set(adapters):
                raise KeyError("adapters")
        except Exception as e:  # any unreadable file gets the same answer
            sys.exit(f"error: could not read the checkpoint {args.ckpt} ({type(e).__name__}); pass a ckpt.pt "
                     "that train.py wrote")
    name = config.get("model") or args.model or (run_models[0] if len(run_models) == 1 else None)
    if name is None:
        sys.exit("error: pass --ckpt RUN/ckpt.pt, or --model NAME to evaluate an untrained model"
                 + (f" (the --runs trained {' and '.join(run_models)})" if run_models else ""))
    if name == "codellama-7b-arch":
        sys.exit("error: codellama-7b-arch has random weights and no tokenizer (it is for bench.py and simulate.py): "
                 "evaluate codellama/CodeLlama-7b-hf")
    try:
        # without a checkpoint only the reference runs: no adapters
        lm = model.from_checkpoint(adapters, args.device) if args.ckpt else model.load(name, args.device, adapters=())
    except (ValueError, OSError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    tiny = name == "tiny"
    for key, tiny_value, paper_value in (("temperature", 1.0, 0.5), ("top_k", 0, 50), ("max_new_tokens", 128, 256)):
        if getattr(args, key) is None:
            setattr(args, key, config.get(key, tiny_value if tiny else paper_value))
    return lm, config


def run_policy(lm, adapter, dataset, sandbox, seed, args):
    """N environment steps of one policy, no training: best reward, its program, success and errors by step."""
    coding_env = env.CodingEnv(dataset, n_envs=args.n_envs, sandbox=sandbox, infill=lm.supports_infill)
    generator = torch.Generator(device=lm.device).manual_seed(seed)
    failures, attempts = np.zeros(coding_env.max_steps), np.zeros(coding_env.max_steps)
    successes, first_rewards = 0, []  # first_rewards: of the programs written from the task prompt
    while coding_env.env_steps < args.steps:
        _, _, texts = sampling.generate(lm, coding_env.prompts, adapter=adapter, max_new_tokens=args.max_new_tokens,
                                        temperature=args.temperature, top_k=args.top_k, stop_strings=env.STOP_STRINGS,
                                        generator=generator)
        _, _, _, infos = coding_env.step(texts)
        for info in infos:
            attempts[info["step"] - 1] += 1
            failures[info["step"] - 1] += info["error"] is not None
            successes += info["error"] is None
            if info["step"] == 1:
                first_rewards.append(info["reward"])
    errors = [f / a if a else float("nan") for f, a in zip(failures, attempts)]
    return {"best": coding_env.best_reward, "heldout": heldout_auc(sandbox, coding_env.best_code, dataset),
            "success": successes / coding_env.env_steps, "first_try": float(np.mean(first_rewards)),
            "errors_by_step": errors, "code": coding_env.best_code}


def training_run(run, sandbox, args):
    """The paper's metric for a trained method (table 2's ETPO and PPO-KL columns): the best reward that a train.py
    run found while training, within its environment steps; the held-out ROC AUC of that program; the share of its
    actions that ran (the mean of env/success_rate over its iterations); the mean reward of its first attempts in its
    last LAST_STEPS environment steps (env/first_try_reward), what the trained policy writes from the task prompt."""
    if os.path.isfile(os.path.join(run, "metrics.jsonl")) and not os.path.exists(os.path.join(run, "ckpt.pt")):
        sys.exit(f"error: {run} holds no checkpoint yet (train.py writes one every --save-every iterations and at "
                 "the end); pass runs that have saved one")
    try:
        ckpt = torch.load(os.path.join(run, "ckpt.pt"), map_location="cpu", weights_only=False)
        config, state = ckpt["config"], ckpt["env"]
        # (a run stopped abruptly may have logged iterations after its checkpoint)
        rows = [row for row in read_log(run, "metrics.jsonl") if row["it"] < ckpt["it"]]
    except Exception as e:  # a missing or foreign folder gets the same answer
        sys.exit(f"error: {run} is not a run folder of train.py ({type(e).__name__}); pass the --out of a run")
    max_rows = config.get("max_rows", env.MAX_ROWS)  # (runs saved before --max-rows had CAAFE's)
    dataset = load_dataset(config["dataset"], args, max_rows)
    starts = [0] + [row["env_steps"] for row in rows[:-1]]  # the environment step each iteration began after
    last = [row for row, start in zip(rows, starts) if start >= state["env_steps"] - LAST_STEPS] or rows[-1:]
    return {"dataset": dataset.name, "method": config["algo"], "seed": config["seed"], "best": state["best_reward"],
            "dataset_flag": config["dataset"], "max_rows": max_rows,  # what loads it again (a CSV's path)
            "model": config.get("model"),  # the base model, whose untrained self is the Reflection column
            "heldout": heldout_auc(sandbox, state["best_code"], dataset),
            "success": float(np.mean([row["env/success_rate"] for row in rows])),
            "first_try": float(np.mean([row["env/first_try_reward"] for row in last
                                        if row["env/first_try_reward"] is not None])),
            "errors_by_step": [], "code": state["best_code"], "steps": state["env_steps"]}


def heldout_auc(sandbox, code, dataset):
    """ROC AUC of a program on the held-out rows the reward never sees (env.py); nan where there is no program."""
    return float("nan") if code is None else sandbox.run([code], dataset, heldout=True)[0][0]


def load_dataset(name, args, max_rows):
    try:
        return env.load_dataset(name, args.data_dir, args.openml_cache, max_rows)
    except (ValueError, OSError, RuntimeError) as e:
        sys.exit(f"error: {e}")


def perplexity(lm, adapter, text, window=512):
    """exp(mean negative log-likelihood) of the text's tokens, in non-overlapping windows of `window` tokens."""
    ids = lm.tokenizer(text).input_ids
    nll, count = 0.0, 0
    with torch.no_grad(), lm.adapter(adapter):
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start : start + window + 1]], device=lm.device)  # (1, <= window + 1)
            logits = lm.hf(input_ids=chunk[:, :-1]).logits.float()  # (1, n, V)
            nll += float(torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum"))
            count += chunk.shape[1] - 1
    return math.exp(nll / max(count, 1))


def credit_view(lm, dataset, beta, args):
    """One program from the policy with, at every token, Q(x^{j-1}, w^j), V(x^{j-1}), Q - V and KL(pi || pi_bar)."""
    prompt = env.task_prompt(dataset, lm.supports_infill)
    tokens, lengths, _ = sampling.generate(lm, [prompt], adapter="policy", max_new_tokens=args.max_new_tokens,
                                           temperature=args.temperature, top_k=args.top_k,
                                           stop_strings=env.STOP_STRINGS,
                                           generator=torch.Generator(device=lm.device).manual_seed(0))
    prompt_ids, prompt_mask = lm.encode_prompts([prompt])
    mask = torch.ones_like(tokens, dtype=torch.float32)
    action = (prompt_ids, prompt_mask, tokens, mask)
    with torch.no_grad():
        with lm.adapter(None):
            ref_logits = lm.action_logits(*action)  # (1, T, V)
        with lm.adapter("policy"):
            pi_logits = lm.action_logits(*action)
        with lm.adapter("q"):
            q = etpo.q_from_logits(lm.action_logits(*action), ref_logits)
        v = etpo.soft_value(pi_logits, q, ref_logits, beta)[0]  # (T,) V(x^{j-1})
        q_taken = q.gather(-1, tokens[..., None])[0, :, 0]  # (T,) Q(x^{j-1}, w^j)
        kl = etpo.kl_and_entropy(pi_logits, ref_logits)[0][0]  # (T,) KL(pi || pi_bar) at each prefix
    rows = [(lm.decode(tokens[0, j : j + 1]), float(q_taken[j]), float(v[j]), float(kl[j]))
            for j in range(int(lengths[0]))]
    return rows


def render_credit(rows, path):
    """Print the credit view as a table, and write it to path as an HTML file (green: Q > V, red: Q < V)."""
    lines = [f"{'token':>16} {'Q':>8} {'V':>8} {'Q - V':>8} {'KL':>8}"]
    lines += [f"{tok!r:>16} {q:8.4f} {v:8.4f} {q - v:+8.4f} {kl:8.4f}" for tok, q, v, kl in rows]
    scale = max([abs(q - v) for _, q, v, _ in rows] + [1e-6])
    spans = []
    for tok, q, v, kl in rows:
        a = min(1.0, abs(q - v) / scale)
        color = f"rgba(0,160,0,{a:.2f})" if q >= v else f"rgba(200,0,0,{a:.2f})"
        title = f"Q={q:.4f} V={v:.4f} Q-V={q - v:+.4f} KL={kl:.4f}"
        spans.append(f'<span style="background:{color}" title="{title}">{html.escape(tok)}</span>')
    print("\n".join(lines))
    write_result(path, "<html><body><p>Per-token credit: green where Q &gt; V, red where Q &lt; V (hover for values)."
                 f"</p><pre>{''.join(spans)}</pre></body></html>\n")


def read_log(run, name):
    """The rows of one of a run's logs, metrics.jsonl (one per iteration) or actions.jsonl (one per action), but a last
    line cut short."""
    with open(os.path.join(run, name)) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def cells(blocks, reduce, form):
    """One table cell per block: reduce() of its values in the format form, or "-" for a block without any."""
    return [format(reduce(values), form) if values else "-" for values in blocks]


def curve_table(run_dirs):
    """The learning curves as text: each run's mean reward of first attempts (the programs written from the task
    prompt) in each block of LAST_STEPS environment steps, by the step its iterations began after (a run's last block
    may be shorter; in a run of whole blocks it is the window that --runs reports); then, from the actions.jsonl of
    the runs that have one, the share of reflections (the actions after a failure) that ran in each block; then how
    far the policy went: its KL to the reference (mean over the block's iterations) and, for ETPO, the largest
    q/rare_mass, which rises before a run diverges (README, "Longer runs")."""
    first, fixed, kl, rare = {}, {}, {}, {}
    for run in run_dirs:
        rows = read_log(run, "metrics.jsonl")
        starts = [0] + [row["env_steps"] for row in rows[:-1]]  # the environment step each iteration began after
        block = {row["it"]: start // LAST_STEPS for row, start in zip(rows, starts)}  # iteration -> its block
        count = math.ceil(rows[-1]["env_steps"] / LAST_STEPS) if rows else 0  # (none before its first iteration)

        def per_block(key):  # the key's values in each block's iterations
            return [[row[key] for row in rows if block[row["it"]] == k and row.get(key) is not None]
                    for k in range(count)]

        first[run] = cells(per_block("env/first_try_reward"), np.mean, "+.2f")
        kl[run] = cells(per_block("policy/kl_ref"), np.mean, ".3f")
        if any("q/rare_mass" in row for row in rows):  # (ETPO logs it, PPO-KL does not)
            rare[run] = cells(per_block("q/rare_mass"), max, ".3f")
        if os.path.isfile(os.path.join(run, "actions.jsonl")):  # (a run of an earlier train.py has none)
            ran = [[] for _ in range(count)]
            for action in read_log(run, "actions.jsonl"):
                if action["step"] > 1 and action["it"] in block:  # (the iterations that metrics.jsonl logged whole)
                    ran[block[action["it"]]].append(action["error"] is None)
            fixed[run] = cells(ran, np.mean, ".2f")
    width = max(len(curve) for curve in first.values())

    def table(title, curves):
        header = ["| run | " + " | ".join(f"{LAST_STEPS * k + 1}-{LAST_STEPS * (k + 1)}" for k in range(width)) + " |",
                  "|---" * (width + 1) + "|"]
        return "\n".join([title] + header + [f"| {run} | " + " | ".join(curve + ["-"] * (width - len(curve))) + " |"
                                             for run, curve in curves.items()])

    text = table(f"mean reward of first attempts in each block of {LAST_STEPS} environment steps:", first)
    if fixed:
        text += "\n\n" + table("share of reflections that ran (fixed the error they were shown) in each block:", fixed)
    text += "\n\n" + table("KL to the reference, mean over each block's iterations:", kl)
    if rare:
        text += "\n\n" + table("largest q/rare_mass in each block (ETPO: pi*'s mass on the tokens the reference gives "
                               "less than 1e-3):", rare)
    return text


def learning_curves(run_dirs, plot, out):
    """Print curve_table's table and, when matplotlib (optional) is installed, plot mean reward against environment
    steps, one line per run, as a PNG at --plot (or OUT/curves.png)."""
    print(curve_table(run_dirs))
    path = plot or os.path.join(out, "curves.png")
    try:
        import matplotlib
    except ImportError:
        print(f"(no plot at {path}: it needs matplotlib, which the requirements leave out)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in run_dirs:
        rows = read_log(run, "metrics.jsonl")
        ax.plot([r["env_steps"] for r in rows], [r["env/reward_mean"] for r in rows], label=os.path.basename(run))
    ax.set_xlabel("environment steps")
    ax.set_ylabel("mean reward")
    ax.legend()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120, bbox_inches="tight")
    write_result(path, png.getvalue(), "pass another file to --plot" if plot else "pass another folder to --out")
    print(f"wrote {path}")


def markdown_table(results, names, methods, key):
    """Datasets x methods, the mean of results[key] over seeds ± their sample standard deviation ("-" where a method
    did not run on a dataset; the value alone where it ran once, as a scikit-learn baseline does), and an average row
    of the means (over every dataset, so "-" for a method that misses one)."""
    cell = {}
    for d in names:
        for m in methods:
            values = [r[key] for r in results if r["dataset"] == d and r["method"] == m]
            if values:  # one value has no spread to show: "± 0.0000" would claim that seeds agree
                spread = f" ± {np.std(values, ddof=1):.4f}" if len(values) > 1 else ""
                cell[d, m] = (float(np.mean(values)), f"{np.mean(values):.4f}{spread}")
    lines = ["| dataset | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    lines += [f"| {d} | " + " | ".join(cell[d, m][1] if (d, m) in cell else "-" for m in methods) + " |"
              for d in names]
    averages = [f"{np.mean([cell[d, m][0] for d in names]):.4f}" if all((d, m) in cell for d in names) else "-"
                for m in methods]
    return "\n".join(lines + ["| average | " + " | ".join(averages) + " |"])


def report(results, methods, titles, out):
    """Print the tables (key, title) and write them to OUT/table.md, and every row to OUT/results.csv."""
    names = list(dict.fromkeys(r["dataset"] for r in results))
    tables = [f"{title}, mean ± std over seeds:\n" + markdown_table(results, names, methods, key)
              for key, title in titles]
    print("\n\n" + "\n\n".join(tables))
    write_result(os.path.join(out, "table.md"), "\n\n".join(tables) + "\n")
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["dataset", "method", "seed", "best_auc", "heldout_auc", "success_rate", "first_try_reward",
                     "error_rate_by_step"])
    for r in results:
        errors = " ".join(f"{e:.3f}" for e in r["errors_by_step"])
        writer.writerow([r["dataset"], r["method"], r["seed"], r["best"], r["heldout"], r["success"], r["first_try"],
                         errors])
    write_result(os.path.join(out, "results.csv"), rows.getvalue())


def write_result(path, data, elsewhere="pass another folder to --out"):
    """Write one of the evaluation's files (text or bytes) whole, after what it holds was printed: a full disk ends
    the evaluation in one sentence and leaves no half-written file. elsewhere: how to name another path."""
    try:
        with open(path, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
    except OSError as e:
        if os.path.isfile(path):
            os.remove(path)
        sys.exit(f"error: could not write {path} ({e.strerror or e}), whose results are printed above: free some "
                 f"space, or {elsewhere}")


def check_arguments(args):
    """Values, files and folders named on the command line are checked now, not after an hour of evaluation: one
    sentence each. Returns the text of --perplexity (None without it)."""
    for names, least, rule in ((("seeds", "steps", "n_envs", "max_new_tokens"), 1, "must be positive"),
                               (("temperature", "top_k", "max_rows"), 0, "must be 0 or more")):  # not a traceback
        for name in names:
            if getattr(args, name) is not None and getattr(args, name) < least:  # None: the run's own value
                sys.exit(f"error: --{name.replace('_', '-')} {getattr(args, name)} {rule}")
    if args.credit and not args.ckpt:  # (and the checkpoint's Q adapter, once it is loaded)
        sys.exit("error: --credit needs an ETPO checkpoint (--ckpt of a run with --algo etpo)")
    if args.policies and set(args.policies.split(",")) - {"trained", "reference", ""}:
        sys.exit(f"error: --policies {args.policies} names a policy other than trained and reference")
    if args.policies and "trained" in args.policies.split(",") and not args.ckpt:
        sys.exit("error: --policies trained needs --ckpt")
    text = None
    if args.perplexity:
        try:
            with open(args.perplexity, encoding="utf-8") as f:
                text = f.read()
            problem = None if text.strip() else "it is empty"
        except (OSError, UnicodeDecodeError) as e:
            problem = type(e).__name__
        if problem:
            sys.exit(f"error: no text to read at {args.perplexity} ({problem}); pass a UTF-8 text file to "
                     "--perplexity, or drop the flag")
    for run in args.curves.split(",") if args.curves else []:
        if not os.path.isfile(os.path.join(run, "metrics.jsonl")):
            sys.exit(f"error: {run} holds no metrics.jsonl; pass run folders of train.py to --curves")
        if os.path.getsize(os.path.join(run, "metrics.jsonl")) == 0:  # a run that ended before its first iteration
            sys.exit(f"error: {run} has logged no iteration yet; pass runs that have finished one to --curves")
    return text


def export(args):
    """--export: the trained policy as a model of its own (model.save_merged), for use without this code."""
    if not args.ckpt:
        sys.exit("error: --export needs --ckpt RUN/ckpt.pt, the run whose policy to write")
    if os.path.exists(args.export) and (not os.path.isdir(args.export) or os.listdir(args.export)):
        sys.exit(f"error: {args.export} exists and is not an empty folder: pass a new folder to --export")
    from safetensors import SafetensorError

    lm, _ = load_policy(args)
    try:
        model.save_merged(lm, "policy", args.export)
    except (OSError, SafetensorError) as e:  # a folder that cannot be created, a full disk (safetensors' own error
        # when it is the weights that do not fit): no half model is left, whose config.json would load without weights
        shutil.rmtree(args.export, ignore_errors=True)
        reason = getattr(e, "strerror", None) or str(e).partition("\n")[0][:100]
        sys.exit(f"error: could not write the model to {args.export} ({reason}): free some space, or pass another "
                 "folder to --export")
    print(f"wrote the policy of {args.ckpt} ({lm.name} with its adapter merged) to {args.export}; load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({args.export!r})")


def evaluate(lm, policies, datasets, sandbox, args, results):
    """Every policy on every dataset for --seeds seeds, then the scikit-learn baselines; appends one row per run
    to results. Returns None, or why it stopped mid-way (Ctrl-C, the GPU out of memory), so that the tables
    still get the runs finished before it."""
    try:
        for dataset in datasets:
            for policy in policies:
                for seed in range(args.seeds):
                    r = run_policy(lm, ADAPTER_OF[policy], dataset, sandbox, seed, args)
                    results.append({"dataset": dataset.name, "method": policy, "seed": seed, **r})
                    print(f"{dataset.name} {policy} seed {seed}: best {r['best']:.4f} held-out {r['heldout']:.4f} "
                          f"success {r['success']:.2f}", flush=True)
            for method, body in BASELINES.items():  # deterministic: one run stands for every seed
                source = f"{env.SIGNATURE}    {body}\n    model.fit(x_train, y_train)\n    return model\n"
                (reward, _), heldout = sandbox.run([source], dataset)[0], heldout_auc(sandbox, source, dataset)
                results.append({"dataset": dataset.name, "method": method, "seed": 0, "best": reward,
                                "heldout": heldout, "success": 1.0, "first_try": reward, "errors_by_step": [],
                                "code": source})
    except KeyboardInterrupt:
        return "stopped by Ctrl-C"
    except torch.cuda.OutOfMemoryError:  # the rollouts hold B x (P + T) keys and values: B is --n-envs
        return OUT_OF_MEMORY
    return None


def main():
    args = parser.parse_args()
    text = check_arguments(args)
    if args.export:
        return export(args)
    made_out = not os.path.exists(args.out)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        sys.exit(f"error: cannot create the output folder {args.out} ({e.strerror}): pass another --out")
    if made_out:  # an evaluation that ends before writing (a bad checkpoint, say) leaves no empty folder behind
        atexit.register(lambda: os.path.isdir(args.out) and not os.listdir(args.out) and os.rmdir(args.out))
    if args.curves and not (args.ckpt or args.model or args.runs or args.perplexity or args.credit):
        learning_curves(args.curves.split(","), args.plot, args.out)
        return  # the curves alone: nothing to evaluate
    runs = args.runs.split(",") if args.runs else []
    policies = args.policies or ("trained,reference" if args.ckpt else "" if runs and not args.model else "reference")
    policies = [p for p in policies.split(",") if p]
    sandbox = execution.Sandbox()
    results = [training_run(run, sandbox, args) for run in runs]  # one row per dataset, method and seed
    if len({(r["dataset"], r["method"], r["seed"]) for r in results}) < len(results):
        sys.exit("error: two of the --runs are the same method on the same dataset with the same seed; pass one of "
                 "them (a cell of the table is the mean over seeds of one method)")
    # the rows of each dataset: those its runs trained on (a table compares methods on the same rows), else --max-rows
    rows_of = {}
    for r in results:
        if rows_of.setdefault(r["dataset_flag"], r["max_rows"]) != r["max_rows"]:
            sys.exit(f"error: the --runs on {r['dataset']} trained with --max-rows {rows_of[r['dataset_flag']]} and "
                     f"{r['max_rows']}, and a table compares methods on the same rows: pass runs of one --max-rows")
        if args.max_rows not in (None, r["max_rows"]):
            sys.exit(f"error: --max-rows {args.max_rows} differs from the {r['max_rows']} that the --runs on "
                     f"{r['dataset']} trained with, and a table compares methods on the same rows: drop the flag")
    run_models = sorted({r["model"] for r in results if r["model"]})
    lm, config = load_policy(args, run_models) if policies or args.perplexity or args.credit else (None, {})
    if args.credit and "q" not in lm.names:  # a PPO-KL checkpoint
        sys.exit("error: --credit needs an ETPO checkpoint (--ckpt of a run with --algo etpo)")
    trained_methods = list(dict.fromkeys(r["method"] for r in results))
    budgets = "/".join(str(n) for n in sorted({r["steps"] for r in results}))  # environment steps of the runs
    methods = policies + trained_methods + list(BASELINES)
    default = ",".join(dict.fromkeys(r["dataset_flag"] for r in results)) or config.get("dataset", "cmc")
    max_rows = args.max_rows if args.max_rows is not None else config.get("max_rows", env.MAX_ROWS)
    datasets = [load_dataset(name, args, rows_of.get(name, max_rows))
                for name in (args.datasets or default).split(",")]  # all, before any runs
    for dataset in datasets:
        print("data:", dataset.summary)
    stopped = evaluate(lm, policies, datasets, sandbox, args, results)
    sandbox.close()
    if stopped and not results:
        sys.exit(f"error: {stopped}")

    # the tables, shaped like the paper's table 2: datasets x methods, mean +- std over seeds
    budget = [f"{', '.join(policies)} within {args.steps} environment steps"] if policies else []
    budget += [f"{', '.join(trained_methods)} while training, within {budgets} environment steps"] if runs else []
    first_try = "mean reward of first attempts, the programs written from the task prompt"
    if runs:
        first_try += f" ({', '.join(trained_methods)}: in the last {LAST_STEPS} environment steps of training)"
    best = "best ROC AUC (the paper's metric)" + (f": {'; '.join(budget)}" if budget else "")
    heldout = "held-out ROC AUC of that best program (rows the reward never saw)"
    report(results, methods, [("best", best), ("heldout", heldout), ("success", "share of actions that ran"),
                              ("first_try", first_try)], args.out)
    if stopped:  # (a missing cell reads "-")
        sys.exit(f"error: {stopped}; {args.out}/table.md and results.csv hold the runs finished before it")
    if args.perplexity:
        for policy in policies:
            print(f"perplexity of {policy} on {args.perplexity}: {perplexity(lm, ADAPTER_OF[policy], text):.4f}")
    if args.credit:
        rows = credit_view(lm, datasets[0], config["beta"], args)
        render_credit(rows, os.path.join(args.out, "credit.html"))
    if args.curves:
        learning_curves(args.curves.split(","), args.plot, args.out)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # while the model loads, say (an evaluation's runs write the tables of those finished)
        sys.exit("error: stopped by Ctrl-C")
    except torch.cuda.OutOfMemoryError:  # --perplexity or --credit
        sys.exit(f"error: {OUT_OF_MEMORY}")
    except execution.SandboxError as e:  # a full temporary folder, say
        sys.exit(f"error: {e}")
