"""
eval.py on the tiny model: the table has a row per dataset plus the average and a column per method, with
numbers in range; the CSV holds every seed; the perplexity of the reference on its own samples is finite,
reproducible and lower than on the same words shuffled; the per-token credit view renders; --runs reports a
training run's best reward, the held-out AUC of its best program, its success rate and its last first attempts' reward,
as the paper's ETPO column; --export writes the policy as a plain Hugging Face model with the adapter's logits. A
bad checkpoint, flag value or path, and running out of GPU memory, end with one sentence. (That the held-out AUC
uses rows the reward never sees is tested in tests/test_env.py.)

Run: python -m pytest tests/test_eval.py -q
"""

import argparse
import csv
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_table_csv_and_credit_view(ckpt, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("def build_model(x_train, y_train):\n    return None\n" * 5)
    out = tmp_path / "eval"
    r = run("eval.py", "--ckpt", ckpt, "--datasets", "iris,wine", "--seeds", "2", "--steps", "8", "--n-envs", "4",
            "--max-new-tokens", "64", "--out", str(out), "--perplexity", str(text), "--credit")
    assert r.returncode == 0, r.stderr[-2000:]
    table = (out / "table.md").read_text().split("\n\n")[0].splitlines()
    methods = ["trained", "reference", "logistic_regression", "random_forest", "hist_gradient_boosting"]
    assert table[1] == "| dataset | " + " | ".join(methods) + " |"
    assert [line.split(" | ")[0] for line in table[3:]] == ["| iris", "| wine", "| average"]
    for line in table[3:5]:
        cells = line.strip("| ").split(" | ")[1:]  # one per method
        means = [float(cell.split(" ± ")[0]) for cell in cells]
        assert len(means) == 5 and all(-1.0 <= m <= 1.0 for m in means)
        assert all(0.5 < m <= 1.0 for m in means[2:])  # the scikit-learn baselines always run
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2 + 2 * 3  # datasets x (policies x seeds + baselines)
    assert all(-1.0 <= float(row["best_auc"]) <= 1.0 for row in rows)
    # every cell of every table from the CSV: the mean over seeds ± the sample standard deviation (n - 1), the value
    # alone for a baseline, which runs once
    spreads = []
    for table, key in zip((out / "table.md").read_text().split("\n\n"),
                          ("best_auc", "heldout_auc", "success_rate", "first_try_reward")):
        for line in table.splitlines()[3:5]:
            dataset, *cells = line.strip("| ").split(" | ")
            for method, cell in zip(methods, cells):
                values = [float(row[key]) for row in rows if (row["dataset"], row["method"]) == (dataset, method)]
                mean, std = sum(values) / len(values), np.std(values, ddof=1) if len(values) > 1 else None
                assert cell == f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else ""), (key, line)
                spreads += [std] if std is not None else []
    assert len(spreads) == 4 * 2 * 2 and max(spreads) > 0  # two seeds that differ somewhere: n - 1 is tested
    perplexities = re.findall(r"perplexity of (\w+) on .*: ([\d.]+)", r.stdout)
    assert [p[0] for p in perplexities] == ["trained", "reference"] and all(float(p[1]) > 1 for p in perplexities)
    html = (out / "credit.html").read_text()
    assert html.count("<span") >= 1 and "Q=" in html and "KL=" in html
    assert re.search(r"token\s+Q\s+V\s+Q - V\s+KL", r.stdout)


def test_training_runs_as_the_papers_columns(ckpt, tmp_path):
    run_dir = os.path.dirname(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["env"]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    success = [row["env/success_rate"] for row in rows]
    first_try = [row["env/first_try_reward"] for row in rows if row["env/first_try_reward"] is not None]  # 16 steps
    out = tmp_path / "eval"
    r = run("eval.py", "--runs", run_dir, "--out", str(out))  # no model: only the run and the baselines
    assert r.returncode == 0, r.stderr[-2000:]
    best, heldout, ran, first = [t.splitlines() for t in (out / "table.md").read_text().split("\n\n")]
    assert best[0].startswith("best ROC AUC (the paper's metric): etpo while training, within 16 environment steps")
    assert best[1] == "| dataset | etpo | logistic_regression | random_forest | hist_gradient_boosting |"
    assert best[3].startswith(f"| iris | {state['best_reward']:.4f} | ")
    assert ran[3].startswith(f"| iris | {sum(success) / len(success):.4f} | ")
    assert first[3].startswith(f"| iris | {sum(first_try) / len(first_try):.4f} | ")
    assert 0.0 <= float(heldout[3].split(" | ")[1].split(" ")[0]) <= 1.0
    with open(out / "results.csv") as f:
        methods = [row["method"] for row in csv.DictReader(f)]
    assert methods == ["etpo", "logistic_regression", "random_forest", "hist_gradient_boosting"]
    r = run("eval.py", "--runs", run_dir, "--datasets", "iris,wine", "--out", str(out))  # no run on wine: "-"
    assert r.returncode == 0, r.stderr[-2000:]
    best = (out / "table.md").read_text().split("\n\n")[0].splitlines()
    assert best[3].startswith("| iris | 0.") and best[4].startswith("| wine | - | 0.")
    assert best[5].startswith("| average | - | 0.")
    r = run("eval.py", "--runs", f"{run_dir},{run_dir}", "--out", str(out))  # two runs for one cell of one seed
    assert r.returncode != 0 and "same method on the same dataset with the same seed" in r.stderr


def test_the_datasets_default_to_those_of_the_runs_and_of_the_checkpoint(ckpt, tmp_path):
    x = np.random.default_rng(0).normal(size=(60, 2))  # a run on a CSV: its name (mine) is not what loads it again
    (tmp_path / "mine.csv").write_text("\n".join(["a,b,label"] + [f"{u},{v},{int(u > 0)}" for u, v in x]))
    (tmp_path / "run").mkdir()
    torch.save({"config": {"dataset": str(tmp_path / "mine.csv:label"), "algo": "etpo", "seed": 0, "max_rows": 40},
                "it": 1, "env": {"best_reward": 0.9, "best_code": None, "env_steps": 4}}, tmp_path / "run" / "ckpt.pt")
    (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps({"it": 0, "env_steps": 4, "env/success_rate": 0.5,
                                                                "env/first_try_reward": 0.1}) + "\n")
    small = ["--seeds", "1", "--steps", "4", "--n-envs", "4", "--max-new-tokens", "32"]
    r = run("eval.py", "--runs", str(tmp_path / "run"), "--ckpt", ckpt, "--policies", "reference", "--credit", *small,
            "--out", str(tmp_path / "e1"))  # and the credit view on its first dataset, which was loaded by its name
    assert r.returncode == 0, r.stderr[-2000:]
    best = (tmp_path / "e1" / "table.md").read_text().split("\n\n")[0].splitlines()
    assert best[1].startswith("| dataset | reference | etpo |") and best[3].startswith("| mine | ")
    # the reference runs on the rows the run trained on (train.py --max-rows), and says so
    assert "data: mine, CSV file: 40 of its 60 labelled rows (shuffled, at most --max-rows 40), 2 features" in r.stdout
    r = run("eval.py", "--runs", str(tmp_path / "run"), "--max-rows", "50", "--out", str(tmp_path / "e3"))
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1] == (
        "error: --max-rows 50 differs from the 40 that the --runs on mine trained with, and a table compares methods "
        "on the same rows: drop the flag")
    other = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)  # another seed, on every row
    other["config"].update(seed=1, max_rows=0)
    shutil.copytree(tmp_path / "run", tmp_path / "other")
    torch.save(other, tmp_path / "other" / "ckpt.pt")
    r = run("eval.py", "--runs", f"{tmp_path / 'run'},{tmp_path / 'other'}", "--out", str(tmp_path / "e3"))
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1] == (
        "error: the --runs on mine trained with --max-rows 40 and 0, and a table compares methods on the same rows: "
        "pass runs of one --max-rows")
    assert (tmp_path / "e1" / "credit.html").exists()
    r = run("eval.py", "--ckpt", ckpt, "--policies", "trained", *small, "--out", str(tmp_path / "e2"))  # cmc before
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "e2" / "table.md").read_text().split("\n\n")[0].splitlines()[3].startswith("| iris | ")


def test_the_reference_column_of_runs_is_their_base_model(tmp_path):
    def fake_run(name, model_name, algo):  # a finished run's files, without its training
        (tmp_path / name).mkdir()
        torch.save({"config": {"dataset": "iris", "algo": algo, "seed": 0, "model": model_name}, "it": 1,
                    "env": {"best_reward": 0.9, "best_code": None, "env_steps": 4}}, tmp_path / name / "ckpt.pt")
        (tmp_path / name / "metrics.jsonl").write_text(json.dumps({"it": 0, "env_steps": 4, "env/success_rate": 0.5,
                                                                   "env/first_try_reward": 0.1}) + "\n")
        return str(tmp_path / name)

    tiny, big = fake_run("tiny-run", "tiny", "etpo"), fake_run("big-run", "codellama/CodeLlama-7b-hf", "ppo_kl")
    small = ["--policies", "reference", "--seeds", "1", "--steps", "4", "--n-envs", "4", "--max-new-tokens", "32"]
    r = run("eval.py", "--runs", tiny, *small, "--out", str(tmp_path / "e"))  # no --model: the run's, untrained
    assert r.returncode == 0, r.stderr[-2000:]
    best = (tmp_path / "e" / "table.md").read_text().split("\n\n")[0].splitlines()
    assert best[1].startswith("| dataset | reference | etpo |") and re.match(r"\| iris \| -?[01]\.\d+ \| ", best[3])
    r = run("eval.py", "--runs", f"{tiny},{big}", *small, "--out", str(tmp_path / "e"))
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1] == (
        "error: pass --ckpt RUN/ckpt.pt, or --model NAME to evaluate an untrained model (the --runs trained "
        "codellama/CodeLlama-7b-hf and tiny)")


def test_learning_curves_alone(ckpt, tmp_path):
    """--curves RUN needs no model: it prints each run's first-attempt reward, the share of its reflections that ran,
    its KL to the reference and its largest q/rare_mass by blocks of environment steps and, where matplotlib
    (optional) is installed, plots the mean reward; a stand-in for matplotlib saves what it was asked to plot. Without
    it, the tables alone and one line that says why there is no plot."""
    run_dir = os.path.dirname(ckpt)
    fake = tmp_path / "fake" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("def use(backend):\n    pass\n")
    (fake / "pyplot.py").write_text(
        "import json\n\n\nclass Axes:\n    lines = []\n\n    def plot(self, x, y, label):\n"
        "        self.lines.append([label, list(x), list(y)])\n\n    def __getattr__(self, name):  # labels, legend\n"
        "        return lambda *args, **kwargs: None\n\n\nclass Figure:\n"
        "    def savefig(self, png, **kwargs):\n        png.write(json.dumps(Axes.lines).encode())\n\n\n"
        "def subplots(**kwargs):\n    return Figure(), Axes()\n")
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), ROOT])}
    r = subprocess.run([sys.executable, "eval.py", "--curves", run_dir, "--plot", str(tmp_path / "c.png"), "--out",
                        str(tmp_path / "e")], cwd=ROOT, capture_output=True, text=True, timeout=120, env=environ)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    lines = json.loads((tmp_path / "c.png").read_text())
    assert lines == [["etpo", [m["env_steps"] for m in rows], [m["env/reward_mean"] for m in rows]]]
    assert not (tmp_path / "e").exists()  # nothing else was written
    # the tables: the run's 16 environment steps are the first block of 160, whose first attempts and KL it averages,
    # whose reflections (actions.jsonl's actions at step 2 and on) it counts, and whose largest q/rare_mass it shows
    first = [m["env/first_try_reward"] for m in rows if m["env/first_try_reward"] is not None]
    with open(os.path.join(run_dir, "actions.jsonl")) as f:
        ran = [action["error"] is None for action in map(json.loads, f) if action["step"] > 1]
    assert rows[-1]["env_steps"] == 16 and 0 < len(ran) <= 8  # the second iteration reflects on the first's failures
    kl, rare = [m["policy/kl_ref"] for m in rows], [m["q/rare_mass"] for m in rows]
    assert len(rows) == 2 and kl[1] > 0 and rare[0] != rare[1]  # (so that a mean and a max differ from one value)

    def tables(runs):  # runs: (folder, whether it has actions.jsonl, whether it logs q/rare_mass)
        cells = {"mean reward of first attempts in each block of 160 environment steps:":
                     f"{sum(first) / len(first):+.2f}",
                 "share of reflections that ran (fixed the error they were shown) in each block:":
                     f"{sum(ran) / len(ran):.2f}",
                 "KL to the reference, mean over each block's iterations:": f"{sum(kl) / 2:.3f}",
                 "largest q/rare_mass in each block (ETPO: pi*'s mass on the tokens the reference gives less than "
                 "1e-3):": f"{max(rare):.3f}"}
        reflections, rare_mass = list(cells)[1], list(cells)[3]  # the tables a run without the file, or key, skips
        lines = []
        for title, cell in cells.items():
            lines += [""] * bool(lines) + [title, "| run | 1-160 |", "|---|---|"] + [
                f"| {run} | {cell} |" for run, has_actions, has_rare in runs
                if (has_actions or title != reflections) and (has_rare or title != rare_mass)]
        return lines

    table = tables([(run_dir, True, True)])
    assert r.stdout.splitlines()[-len(table) - 1:] == table + [f"wrote {tmp_path / 'c.png'}"]
    (fake / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    r = subprocess.run([sys.executable, "eval.py", "--curves", run_dir, "--out", str(tmp_path / "e")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=environ)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[-len(table) - 1:] == table + [
        f"(no plot at {tmp_path / 'e' / 'curves.png'}: it needs matplotlib, which the requirements leave out)"]
    assert not (tmp_path / "e").exists()
    # a run of an earlier train.py, which wrote no actions.jsonl, has no row in the reflections' table, and a run that
    # logs no q/rare_mass (PPO-KL) none in its table
    old, ppo = tmp_path / "old", tmp_path / "ppo"
    old.mkdir()
    ppo.mkdir()
    (old / "metrics.jsonl").write_text(open(os.path.join(run_dir, "metrics.jsonl")).read())
    (ppo / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in m.items() if k != "q/rare_mass"}) + "\n"
                                               for m in rows))
    r = subprocess.run([sys.executable, "eval.py", "--curves", f"{run_dir},{old},{ppo}", "--out", str(tmp_path / "e")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=environ)
    assert r.returncode == 0, r.stderr[-2000:]
    table = tables([(run_dir, True, True), (str(old), False, True), (str(ppo), False, False)])
    assert r.stdout.splitlines()[-len(table) - 1:-1] == table


def test_first_attempts_over_the_same_last_steps_for_every_algorithm(tmp_path):
    """ETPO's iterations are 32 environment steps here, PPO-KL's 160: both are read over their last 160 steps."""
    import eval as evaluation

    assert evaluation.LAST_STEPS == 160
    runs = {"etpo": (32, [i / 100 for i in range(29)] + [None]), "ppo_kl": (160, [-0.5, -0.4, -0.3, -0.2, -0.1, 0.5])}
    for algo, (steps, first_try) in runs.items():
        (tmp_path / algo).mkdir()
        torch.save({"config": {"dataset": "iris", "algo": algo, "seed": 0}, "it": len(first_try),
                    "env": {"best_reward": 0.9, "best_code": None, "env_steps": steps * len(first_try)}},
                   tmp_path / algo / "ckpt.pt")
        with open(tmp_path / algo / "metrics.jsonl", "w") as f:
            for i, value in enumerate(first_try + [-1.0]):  # -1: an iteration logged after the last checkpoint
                f.write(json.dumps({"it": i, "env_steps": steps * (i + 1), "env/success_rate": 0.5,
                                    "env/first_try_reward": value}) + "\n")
            f.write('{"it": 99, "env_steps": 32')  # and a line cut short by a full disk
    args = argparse.Namespace(data_dir="data", openml_cache=None)
    etpo_run = evaluation.training_run(str(tmp_path / "etpo"), None, args)
    ppo_kl_run = evaluation.training_run(str(tmp_path / "ppo_kl"), None, args)
    assert etpo_run["first_try"] == (0.25 + 0.26 + 0.27 + 0.28) / 4  # iterations from step 800 on; the last had none
    assert ppo_kl_run["first_try"] == 0.5  # its one iteration from step 800 on
    assert (etpo_run["success"], etpo_run["best"], ppo_kl_run["method"]) == (0.5, 0.9, "ppo_kl")


def test_perplexity_of_the_reference_on_its_own_samples():
    import eval as evaluation
    import model
    import sampling

    lm = model.load("tiny", device="cpu")
    prompts = ["# Dataset: x\n\ndef build_model(x_train, y_train):\n"] * 8
    _, _, texts = sampling.generate(lm, prompts, adapter=None, max_new_tokens=64,
                                    generator=torch.Generator().manual_seed(0))
    own = "\n".join(texts)
    first, second = evaluation.perplexity(lm, None, own), evaluation.perplexity(lm, None, own)
    assert first == second and 1.0 < first < 100.0
    words = own.split(" ")
    random.Random(0).shuffle(words)
    assert evaluation.perplexity(lm, None, " ".join(words)) > first


@pytest.mark.slow
def test_untrained_model_without_checkpoint_bad_checkpoint_and_bad_value(tmp_path, full_temporary_folder, monkeypatch,
                                                                      capsys):
    r = run("eval.py", "--model", "tiny", "--datasets", "iris", "--seeds", "1", "--steps", "4", "--n-envs", "4",
            "--max-new-tokens", "48", "--out", str(tmp_path / "e"))
    assert r.returncode == 0 and "| iris | " in r.stdout, r.stderr[-2000:]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"nope")
    r = run("eval.py", "--ckpt", str(bad), "--datasets", "iris", "--out", str(tmp_path / "never"))
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("error: could not read the checkpoint")
    assert not (tmp_path / "never").exists()  # the output folder it made is gone again
    hook = tmp_path / "hook"  # CUDA's out-of-memory error, raised on the CPU by the sampling loop
    hook.mkdir()
    (hook / "sitecustomize.py").write_text("import torch\nimport sampling\n\n\ndef out_of_memory(*args, **kwargs):\n"
                                           "    raise torch.cuda.OutOfMemoryError('CUDA out of memory')\n\n\n"
                                           "sampling.sample_ids = out_of_memory\n")
    r = subprocess.run([sys.executable, "eval.py", "--model", "tiny", "--datasets", "iris", "--out",
                        str(tmp_path / "e")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), ROOT])})
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: the GPU ran out of memory; run again with a smaller")
    (hook / "sitecustomize.py").write_text(full_temporary_folder)  # the sandbox cannot start
    r = subprocess.run([sys.executable, "eval.py", "--model", "tiny", "--datasets", "iris", "--steps", "4",
                        "--n-envs", "4", "--out", str(tmp_path / "e")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), ROOT])})
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: the sandbox could not start (No space left on device)")
    import eval as evaluation  # the other checks, in this process: sys.exit's message is the line it prints

    monkeypatch.setattr(sys, "argv", ["eval.py", "--model", "tiny", "--datasets", "iris,nosuch", "--seeds", "1",
                                      "--steps", "4", "--out", str(tmp_path / "e2")])
    with pytest.raises(SystemExit, match="^error: unknown dataset 'nosuch'"):
        evaluation.main()
    assert "iris reference" not in capsys.readouterr().out  # said before iris was evaluated
    (tmp_path / "a-file").write_text("")  # paths that do not work end with one sentence before any model loads
    monkeypatch.setattr(sys, "argv", ["eval.py", "--model", "tiny", "--datasets", "iris", "--out",
                                      str(tmp_path / "a-file" / "eval")])
    with pytest.raises(SystemExit, match="^error: cannot create the output folder"):
        evaluation.main()

    (tmp_path / "binary.txt").write_bytes(bytes(range(256)))
    (tmp_path / "new-run").mkdir()  # a run that ended before its first iteration: its tables had no column
    (tmp_path / "new-run" / "metrics.jsonl").write_text("")
    for flags, phrase in ((["--perplexity", str(tmp_path / "no-such.txt")], "(FileNotFoundError)"),
                          (["--perplexity", str(tmp_path / "a-file")], "(it is empty)"),  # its perplexity read 1.0
                          (["--perplexity", str(tmp_path / "binary.txt")], "(UnicodeDecodeError)"),  # a traceback
                          (["--policies", "reference,best"], "names a policy other than trained and reference"),
                          (["--policies", "trained"], "--policies trained needs --ckpt"),  # said before any work
                          (["--credit"], "--credit needs an ETPO checkpoint (--ckpt of a run with --algo etpo)"),
                          (["--curves", str(tmp_path)], "holds no metrics.jsonl"),
                          (["--curves", str(tmp_path / "new-run")], "has logged no iteration yet"),
                          (["--n-envs", "0"], "--n-envs 0 must be positive")):  # was max() of an empty sequence
        with pytest.raises(SystemExit) as stop:
            evaluation.check_arguments(evaluation.parser.parse_args(["--model", "tiny", *flags]))
        assert str(stop.value.code).startswith("error: ") and phrase in str(stop.value.code)
    # main() checks them first: before the output folder is made, and before any model loads or evaluation runs
    monkeypatch.setattr(sys, "argv", ["eval.py", "--model", "tiny", "--credit", "--out", str(tmp_path / "e4")])
    with pytest.raises(SystemExit, match="^error: --credit needs an ETPO checkpoint"):
        evaluation.main()
    assert not (tmp_path / "e4").exists()
    with pytest.raises(SystemExit, match="codellama-7b-arch has random weights and no tokenizer"):  # bench.py's
        evaluation.load_policy(evaluation.parser.parse_args(["--model", "codellama-7b-arch"]))


def test_a_folder_that_is_not_a_finished_run_ends_with_one_sentence(tmp_path):
    import eval as evaluation

    (tmp_path / "started").mkdir()  # a run before its first checkpoint: metrics.jsonl, and no ckpt.pt
    (tmp_path / "started" / "metrics.jsonl").write_text('{"it": 0}\n')
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "ckpt.pt").write_bytes(b"not a checkpoint")
    for run, sentence in [("started", "holds no checkpoint yet (train.py writes one every --save-every iterations "
                                      "and at the end); pass runs that have saved one"),
                          ("foreign", "is not a run folder of train.py (UnpicklingError); pass the --out of a run"),
                          ("missing", "is not a run folder of train.py (FileNotFoundError); pass the --out of a run")]:
        with pytest.raises(SystemExit) as stop:
            evaluation.training_run(str(tmp_path / run), None, None)
        assert stop.value.code == f"error: {tmp_path / run} {sentence}"


def test_a_full_disk_ends_with_one_sentence_after_the_results_are_printed(tmp_path, capsys, monkeypatch):
    # an evaluation's files are written after what they hold is printed; a full disk (played by /dev/full, where
    # every write fails with ENOSPC) ends it in one sentence, where it was a traceback
    import eval as evaluation

    results = [{"dataset": "iris", "method": "reference", "seed": 0, "best": 0.9, "heldout": 0.8, "success": 0.5,
                "first_try": 0.1, "errors_by_step": [0.5, 0.25]}]
    for name in ("table.md", "results.csv"):
        out = tmp_path / name.partition(".")[0]
        out.mkdir()
        (out / name).symlink_to("/dev/full")
        with pytest.raises(SystemExit) as stop:
            evaluation.report(results, ["reference"], [("best", "best ROC AUC")], str(out))
        assert stop.value.code == (f"error: could not write {out / name} (No space left on device), whose results "
                                   "are printed above: free some space, or pass another folder to --out")
        assert "| iris | 0.9000 |" in capsys.readouterr().out
    assert (tmp_path / "results" / "table.md").read_text().splitlines()[-2:] == ["| iris | 0.9000 |",
                                                                                 "| average | 0.9000 |"]
    (tmp_path / "credit.html").symlink_to("/dev/full")
    with pytest.raises(SystemExit) as stop:
        evaluation.render_credit([("model", 0.5, 0.25, 0.125)], str(tmp_path / "credit.html"))
    assert "could not write" in stop.value.code and "'model'   0.5000   0.2500  +0.2500   0.1250" in \
        capsys.readouterr().out
    # a disk that fills up half-way through a file: no half file is left, which would read as a whole one
    real_open = open

    def half_then_full(path, mode):
        f = real_open(path, mode)
        f.write(b"dataset,method")
        f.flush()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluation, "open", half_then_full, raising=False)
    out = tmp_path / "half"
    out.mkdir()
    with pytest.raises(SystemExit) as stop:
        evaluation.report(results, ["reference"], [("best", "best ROC AUC")], str(out))
    assert "No space left on device" in stop.value.code and os.listdir(out) == []


def test_a_ctrl_c_mid_way_keeps_the_runs_finished_in_the_tables(tmp_path):
    # a Ctrl-C as the second seed starts (its environment is made): the first seed's run is in the tables, the rest
    # of the cells read "-"; an hour of evaluation was lost to a traceback before
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text("import env\n\nmade = []\nCodingEnv = env.CodingEnv\n\n\n"
                                           "def coding_env(*args, **kwargs):\n    made.append(1)\n"
                                           "    if len(made) == 2:\n        raise KeyboardInterrupt\n"
                                           "    return CodingEnv(*args, **kwargs)\n\n\nenv.CodingEnv = coding_env\n")
    out = tmp_path / "e"
    r = subprocess.run([sys.executable, "eval.py", "--model", "tiny", "--datasets", "iris", "--seeds", "2", "--steps",
                        "4", "--n-envs", "4", "--max-new-tokens", "32", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), ROOT])})
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (f"error: stopped by Ctrl-C; {out}/table.md and results.csv hold the "
                                                 "runs finished before it")
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(row["dataset"], row["method"], row["seed"]) for row in rows] == [("iris", "reference", "0")]
    best = (out / "table.md").read_text().split("\n\n")[0].splitlines()
    assert best[3].startswith(f"| iris | {float(rows[0]['best_auc']):.4f} | - |")


def test_export_writes_the_policy_as_a_plain_hugging_face_model(ckpt, tmp_path):
    import model
    import tiny
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "policy-model"
    r = run("eval.py", "--ckpt", ckpt, "--export", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1].startswith(f"wrote the policy of {ckpt}") and " seed " not in r.stdout
    # transformers alone loads it: the base's weights under their own names, no adapter left in them
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    lm = model.from_checkpoint(torch.load(ckpt, map_location="cpu", weights_only=False)["adapters"], "cpu")
    assert keys == set(tiny.build()[0].state_dict())  # the tiny model's, as built (before any LoRA wrapping)
    hf, tok = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    prompts = ["# Dataset: iris\n\ndef build_model(x_train, y_train):\n", "x = 1"]
    assert [tok(p).input_ids for p in prompts] == [lm.tokenizer(p).input_ids for p in prompts]
    # and its logits are those of the base with the trained policy adapter, not the reference's
    ids, mask = lm.encode_prompts(prompts)
    with torch.no_grad():
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        merged = hf(input_ids=ids, attention_mask=mask.long(), position_ids=positions).logits[:, -1]
        with lm.adapter("policy"):
            policy = lm.last_logits(ids, mask)
        with lm.adapter(None):
            reference = lm.last_logits(ids, mask)
    assert (merged - policy).abs().max() < 1e-4 < (merged - reference).abs().max()
    # a folder that holds files is not written over; without a checkpoint there is no policy to write (one sentence
    # each, before any model loads: in this process)
    import eval as evaluation

    for flags, phrase in ((["--ckpt", ckpt], "exists and is not an empty folder"), ([], "--export needs --ckpt")):
        with pytest.raises(SystemExit) as stop:
            evaluation.export(evaluation.parser.parse_args([*flags, "--export", str(out)]))
        assert str(stop.value.code).startswith("error: ") and phrase in str(stop.value.code)
    # a disk that fills up under the weights (played by a limit on the size of any file written): one sentence, and
    # no half model left (its config.json loaded, without weights); safetensors' own error was a traceback
    full = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))  # noqa: E731
    r = subprocess.run([sys.executable, "eval.py", "--ckpt", ckpt, "--export", str(tmp_path / "full")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, preexec_fn=full)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]  # (safetensors words the reason its own way)
    assert last.startswith(f"error: could not write the model to {tmp_path / 'full'} (") and "File too large" in last
    assert last.endswith("): free some space, or pass another folder to --export")
    assert not (tmp_path / "full").exists()
