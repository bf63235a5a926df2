"""
The `tiny` preset: a 2-layer Llama and its own byte-level BPE tokenizer, built offline on a CPU in 40-60 s and
warm-started by supervised training on short scikit-learn `build_model` bodies (good, weak and a few broken), so
that RL on a laptop has something to learn from: the reference already writes runnable programs now and then, and
what ETPO changes is how often (README, "The CPU demo").

`model.load("tiny")` calls build(), which trains once and caches the result in ~/.cache/etpo (or $ETPO_CACHE);
the folder's name hashes the recipe, so a change to it builds a new model.

Departures from the paper: the whole file is one. The paper starts from CodeLlama-7B, which needs a GPU and a
download; the tiny preset also has its own training defaults (README, "Departures from the paper", 4).
"""

import contextlib
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import time

import torch

CLASSIFIERS = [  # (import line, constructor with {} for hyper-parameters, hyper-parameter choices)
    ("from sklearn.ensemble import RandomForestClassifier", "RandomForestClassifier({})",
     ["n_estimators=50", "n_estimators=100", "max_depth=5", "max_depth=10", "min_samples_leaf=3", "random_state=0"]),
    ("from sklearn.ensemble import ExtraTreesClassifier", "ExtraTreesClassifier({})",
     ["n_estimators=50", "n_estimators=100", "max_depth=8", "random_state=0"]),
    ("from sklearn.ensemble import HistGradientBoostingClassifier", "HistGradientBoostingClassifier({})",
     ["max_iter=50", "learning_rate=0.1", "max_depth=3", "random_state=0"]),
    ("from sklearn.linear_model import LogisticRegression", "LogisticRegression({})",
     ["C=0.1", "C=1.0", "C=10.0", "max_iter=1000", "C=0.0001"]),
    ("from sklearn.neighbors import KNeighborsClassifier", "KNeighborsClassifier({})",
     ["n_neighbors=1", "n_neighbors=5", "n_neighbors=15", "weights='distance'"]),
    ("from sklearn.tree import DecisionTreeClassifier", "DecisionTreeClassifier({})",
     ["max_depth=1", "max_depth=3", "max_depth=6", "min_samples_leaf=5", "random_state=0"]),
    ("from sklearn.naive_bayes import GaussianNB", "GaussianNB({})", []),
    ("from sklearn.discriminant_analysis import LinearDiscriminantAnalysis", "LinearDiscriminantAnalysis({})", []),
    ("from sklearn.ensemble import AdaBoostClassifier", "AdaBoostClassifier({})",
     ["n_estimators=50", "random_state=0"]),
    ("from sklearn.svm import SVC", "SVC({})", ["C=1.0", "probability=True", "gamma='scale'"]),  # needs probability
    ("from sklearn.svm import LinearSVC", "LinearSVC({})", ["C=1.0"]),  # broken: no predict_proba
    ("from sklearn.linear_model import RidgeClassifier", "RidgeClassifier({})", ["alpha=1.0"]),  # broken: same
]


def training_corpus(n=240, seed=0):
    """Short `build_model` bodies: varied classifiers, hyper-parameters and pipelines; some weak, a few broken."""
    rng = random.Random(seed)
    bodies = set()
    while len(bodies) < n:
        imp, ctor, options = rng.choice(CLASSIFIERS)
        args = ", ".join(sorted(rng.sample(options, rng.randint(0, min(2, len(options))))))
        lines = [imp]
        if rng.random() < 0.3:
            lines = ["from sklearn.pipeline import make_pipeline", "from sklearn.preprocessing import StandardScaler",
                     imp, f"model = make_pipeline(StandardScaler(), {ctor.format(args)})"]
        else:
            lines.append(f"model = {ctor.format(args)}")
        lines.append("model.fit(x_train, y_train)")
        if rng.random() > 0.04:  # a few forget to return the model
            lines.append("return model")
        bodies.add("".join(f"    {line}\n" for line in lines))
    return sorted(bodies)


def random_prompt(rng, corpus):
    """A prompt in the shape the environment writes (dataset comments, sometimes a failed attempt and its error,
    the instruction, the signature); the tiny model only ever sees its last WINDOW tokens."""
    words = ["age", "income", "score", "size", "color", "count", "rate", "level", "length", "weight", "type", "class"]
    lines = [f"# Dataset: {rng.choice(words)}_{rng.randint(0, 99)}, {rng.randint(100, 2000)} rows."]
    for i in range(rng.randint(2, 12)):
        kind = rng.choice([f"numeric, {rng.random():.3g} .. {rng.randint(1, 900)}",
                           f"categorical, {rng.randint(2, 9)} values"])
        lines.append(f"#   {i}: {rng.choice(words)}_{rng.choice(words)} ({kind})")
    task = "# Write the body of build_model: fit a scikit-learn classifier that has predict_proba on x_train, y_train"
    if rng.random() < 0.3:
        failed = rng.choice(corpus).rstrip().splitlines()
        error = rng.choice(["ValueError: bad input", "AttributeError: LinearSVC has no predict_proba", "NameError: x"])
        lines += [task + " and return it.", "# This attempt failed:", "# def build_model(x_train, y_train):"]
        lines += ["# " + line for line in failed] + ["# Error:", f"# line 2: {failed[-1].strip()}", "# " + error,
                                                     "# Write a corrected version."]
    else:
        lines.append(task + " and return it. It is scored by ROC AUC on unseen rows.")
    return "\n".join(lines) + "\n\ndef build_model(x_train, y_train):\n"


WINDOW = 128  # prompt tokens the tiny model sees: the tail (signature, error, instruction)
VERSION = 3  # bump when the recipe below changes, so cached builds are rebuilt


def build(cache_dir=None, steps=600, seed=0):
    """Load the tiny model from its cache folder, or build it (tokenizer, Llama, supervised warm start) once."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = training_corpus()
    key = hashlib.sha256(json.dumps([corpus, steps, seed, VERSION]).encode()).hexdigest()[:12]
    cache_dir = cache_dir or os.environ.get("ETPO_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "etpo"))
    path = os.path.join(cache_dir, f"tiny-{key}")
    if not os.path.exists(os.path.join(path, "done")):
        with one_builder(cache_dir):  # runs started together (seeds in parallel): one builds, the others wait
            if not os.path.exists(os.path.join(path, "done")):  # (unless another built it while this one waited)
                warm_start(corpus, steps, seed, cache_dir, path)
    try:
        return LlamaForCausalLM.from_pretrained(path).eval(), PreTrainedTokenizerFast.from_pretrained(path)
    except Exception as e:  # a damaged cache (a disk that failed, a copy cut short): one sentence, not a traceback
        reason = str(e).partition("\n")[0][:100]
        raise OSError(f"the cached tiny model in {path} could not be read ({type(e).__name__}: {reason}): delete that "
                      "folder, and the next run builds it again") from None


def cache_error(cache_dir, e):
    reason = getattr(e, "strerror", None) or str(e).partition("\n")[0][:100]  # (safetensors' errors have no strerror)
    return OSError(f"could not write the tiny model into {cache_dir} ({reason}): free some space, or set ETPO_CACHE to "
                   "a folder you can write to")


@contextlib.contextmanager
def one_builder(cache_dir):
    """Held by one process at a time: a lock on the cache folder itself (flock, released when the process ends,
    however it ends). A file system without locks (ENOSYS, ENOLCK) builds unlocked; warm_start's rename still
    keeps a half-written model out of sight."""
    try:
        os.makedirs(cache_dir, exist_ok=True)
        folder = os.open(cache_dir, os.O_RDONLY)
    except OSError as e:
        raise cache_error(cache_dir, e) from None
    try:
        with contextlib.suppress(OSError):
            try:
                fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another process is building: wait for it (40-60 s)
                print(f"waiting for another process that is building the tiny model in {cache_dir}", flush=True)
                fcntl.flock(folder, fcntl.LOCK_EX)
        yield
    finally:
        os.close(folder)  # and with it the lock


def warm_start(corpus, steps, seed, cache_dir, path):
    """Train the tokenizer and the model, and save both into `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    t0 = time.time()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    prompts = [random_prompt(rng, corpus) for _ in range(len(corpus))]  # tokenizer training text only
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus + prompts, trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    hf = LlamaForCausalLM(config)

    # supervised warm start on (fresh random prompt, body) pairs: the loss is on the body and its EOS only, and the
    # prompt and the body are encoded separately, as in a rollout
    opt = torch.optim.AdamW(hf.parameters(), lr=3e-3, weight_decay=0.0)
    lr_at = lambda step: 3e-3 * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / steps))  # noqa: E731
    bodies = [tok(body, add_special_tokens=False).input_ids + [tok.eos_token_id] for body in corpus]
    hf.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        batch = []
        for body in rng.sample(bodies, 16):
            prompt = tok(random_prompt(rng, corpus)).input_ids
            prompt = prompt[:1] + prompt[1:][-(WINDOW - 1):]  # BOS + the tail, as encode_prompts does
            batch.append((prompt + body, [-100] * len(prompt) + body))
        L = max(len(x) for x, _ in batch)
        ids = torch.tensor([x + [tok.pad_token_id] * (L - len(x)) for x, _ in batch])
        labels = torch.tensor([y + [-100] * (L - len(y)) for _, y in batch])
        mask = (torch.arange(L)[None] < torch.tensor([len(x) for x, _ in batch])[:, None]).long()
        loss = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    hf.eval()
    save_whole(hf, tok, path, cache_dir, {"seconds": round(time.time() - t0, 1), "final_loss": round(loss.item(), 4)})
    print(f"built the tiny model in {time.time() - t0:.1f} s (final supervised loss {loss.item():.3f}) -> {path}")


def save_whole(hf, tok, path, cache_dir, info):
    """Save the model, its tokenizer and the `done` marker (info) into `path`: written whole into a folder of this
    process, then renamed. Where the folder cannot be locked (one_builder), runs started together each build the
    model, and none may load a folder that another is still writing."""
    from safetensors import SafetensorError

    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(tmp, exist_ok=True)
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "done"), "w") as f:
            json.dump(info, f)
        for name in os.listdir(tmp):  # the bytes reach the disk before the rename, as in run_folder.py's replace_file:
            with open(os.path.join(tmp, name), "rb") as f:  # after a power cut no `done` stands beside empty weights
                os.fsync(f.fileno())
        if os.path.isdir(path) and not os.path.exists(os.path.join(path, "done")):
            shutil.rmtree(path, ignore_errors=True)  # no marker: a build cut short (older versions wrote in place)
        try:
            os.rename(tmp, path)
        except OSError:  # another process was first; its model is this one (same corpus, steps and seed)
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.exists(os.path.join(path, "done")):
                raise
    except (OSError, SafetensorError) as e:  # a full disk under the weights is safetensors' own error
        shutil.rmtree(tmp, ignore_errors=True)
        raise cache_error(cache_dir, e) from None
