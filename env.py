"""
The paper's environment: write scikit-learn code for a tabular dataset, run it, get its ROC AUC.

Paper: Wen et al., "Entropy-Regularized Token-Level Policy Optimization for Language Agent Reinforcement",
arXiv 2402.06700, section 5.1; ../shared/ETPO.md section 1. The state is a prompt that describes a dataset and
asks for the body of `def build_model(x_train, y_train)`. The action is the code the model writes. If it runs,
the reward is its ROC AUC (mean over 5 random 50/50 splits, seed i for split i; binary: probability of the
positive class; multi-class: one-vs-one macro) and the episode ends. If it fails, the reward is -1 and the next
prompt shows the code and the error and asks for a fix (reflection), up to a step limit (5).

Programs run in execution.py: a process per program and split, with a timeout and memory, CPU and file limits, in a
scratch directory, never holding a label of the rows it is scored on (the reward is computed apart); its docstring
says what that protects against and what not.

Departures from the paper: 1. 20% of each dataset's rows are held out (fixed seed) and never used for the
reward, so evaluation can report generalization; the 5 reward splits use the other 80%. 2. Missing values are
imputed before the model sees the data (numeric: median, an infinity counted as missing; categorical: an extra code;
the prompt says how many and with what), so every classifier runs; a column empty in every row is left out (the
prompt names it).
"""

import dataclasses
import functools
import hashlib
import os
import re
import shutil
import socket
import urllib.parse

import numpy as np

import execution

OPENML_IDS = {"balance_scale": 11, "breast_w": 15, "cmc": 23, "credit_g": 31, "diabetes": 37, "tic_tac_toe": 50,
              "eucalyptus": 188, "pc1": 1068, "airlines": 1169, "jungle_chess": 41027}
KEEP_FRACTION = {"balance_scale": 0.2, "breast_w": 0.1, "tic_tac_toe": 0.1}  # CAAFE's subsamples
KAGGLE = {  # name: (file in data_dir/name/, target column, columns to drop: row ids and free text)
    "pharyngitis": ("pharyngitis.csv", "radt", ["number"]),
    "kidney_stone": ("train.csv", "target", ["id"]),
    "health_insurance": ("health_insurance.csv", "Response", ["ID"]),
    "spaceship_titanic": ("spaceship_titanic.csv", "Transported", ["PassengerId", "Name"]),
}
SKLEARN = ("breast_cancer", "wine", "iris", "digits")
MAX_ROWS, HELDOUT, SEED = 2000, 0.2, 0  # CAAFE's cap on rows (train.py --max-rows; 0 = every row)
LISTED_FEATURES = 40  # columns the prompt describes, one line each; x_train holds every one
MIN_CLASS_ROWS = 4  # rows a class needs: 2 left after the 20% held out, one per side of each stratified 50/50 split
#                    (with a margin; the rarest class of the paper's datasets, in balance_scale, has 4)
SIGNATURE = "def build_model(x_train, y_train):\n"
STOP_STRINGS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n```", "\n#", "\nimport ", "\nfrom ")


# ----------------------------------------------------------------------------------------------------------------
# Datasets


@dataclasses.dataclass
class Dataset:
    name: str
    X: np.ndarray  # (n, d) float64, the rows the reward is computed on
    y: np.ndarray  # (n,) int64 labels 0..K-1
    X_test: np.ndarray  # held-out rows, never used for the reward
    y_test: np.ndarray
    description: str  # what the prompt says of the data
    summary: str  # one line for the user: the rows kept of those read, features, classes, the split

    @functools.cached_property
    def key(self):
        """A hash of the prepared arrays: the reward cache and the sandbox server know a dataset by it."""
        h = hashlib.sha256()
        for a in (self.X, self.y, self.X_test, self.y_test):
            h.update(np.ascontiguousarray(a).tobytes())
        return f"{self.name}-{h.hexdigest()[:16]}"


def dataset_names():
    return sorted(OPENML_IDS) + sorted(KAGGLE) + list(SKLEARN)


def split_csv(name):
    """(path, target column or None) of a dataset given as `path.csv` or `path.csv:target` (any case of .csv; `~`
    expanded), else None."""
    m = re.fullmatch(r"(.*?\.csv)(?::(.+))?", name, re.IGNORECASE)  # the first .csv that ends the name or meets ':'
    return (os.path.expanduser(m[1]), m[2]) if m else None


def folder_name(name):
    """What train.py names a run folder after: the dataset's name, or a CSV's file name and target column."""
    csv = split_csv(name)
    if csv is None:
        return os.path.basename(name)
    return "-".join(filter(None, (os.path.splitext(os.path.basename(csv[0]))[0], csv[1])))


def read_csv(path):
    """A CSV file as a DataFrame, separated by commas, or by semicolons or tabs (as some spreadsheets write them), in
    UTF-8 or else Windows-1252 (a spreadsheet's export on Windows); a file pandas cannot parse (empty, binary, ragged
    rows) gets one sentence."""
    import pandas as pd

    with open(path, "rb") as f:
        binary = b"\0" in f.read(1 << 16)  # no text file holds a NUL byte, and Windows-1252 would read it as text
    try:
        if binary:
            raise ValueError("it holds NUL bytes: a binary file, or UTF-16 text, which a spreadsheet can save as UTF-8")
        try:
            df, encoding = pd.read_csv(path), "utf-8"
        except UnicodeDecodeError:
            df, encoding = pd.read_csv(path, encoding="cp1252"), "cp1252"
        separator = next((sep for sep in (";", "\t") if len(df.columns) == 1 and sep in df.columns[0]), None)
        return pd.read_csv(path, sep=separator, encoding=encoding) if separator else df
    except ValueError as e:  # pandas' ParserError and EmptyDataError, UnicodeDecodeError and the NUL bytes are ones
        reason = str(e).strip().partition("\n")[0][:120]
        raise ValueError(f"could not read {path} as a CSV file ({reason}): pass a text file of columns separated by "
                         "commas, semicolons or tabs, whose first line names them") from None


def load_dataset(name, data_dir=None, openml_cache=None, max_rows=MAX_ROWS):
    """A prepared Dataset by name (see dataset_names()), or from a CSV file given as `path.csv` or `path.csv:target`;
    at most max_rows rows of it (a shuffled sample; 0 = all)."""
    data_dir = data_dir or "data"
    if name in OPENML_IDS:
        (df, target), source = _openml_frame(name, openml_cache), f"OpenML dataset {OPENML_IDS[name]}"
    elif name in KAGGLE:
        file, target, drop = KAGGLE[name]
        path = os.path.join(data_dir, name, file)
        if not os.path.exists(path):
            raise FileNotFoundError(f"the Kaggle dataset '{name}' needs the file {path}; download {file} from Kaggle "
                                    f"(it needs a login) into {os.path.join(data_dir, name)}/ or pass --data-dir")
        df, source = read_csv(path).drop(columns=drop).dropna(), f"Kaggle ({file})"
    elif name in SKLEARN:
        import sklearn.datasets

        bunch = getattr(sklearn.datasets, f"load_{name}")(as_frame=True)
        df, target, source = bunch.frame, "target", "scikit-learn"
        df["target"] = np.asarray(bunch.target_names)[bunch.target] if name != "digits" else bunch.target
    elif csv := split_csv(name):
        path, target = csv
        if not os.path.exists(path):
            raise FileNotFoundError(f"no CSV file at {path}; check the path")
        df, source = read_csv(path), "CSV file"
        first = df.columns[0]
        if first.startswith("Unnamed: ") and (df[first].to_numpy() == np.arange(len(df))).all():
            df = df.drop(columns=first)  # the index pandas' to_csv writes: 0, 1, 2, ..., a feature that only misleads
        target = target or df.columns[-1]
        if target not in df.columns:
            raise ValueError(f"the CSV {path} has no column '{target}'; its columns are {list(df.columns)}")
        name = os.path.splitext(os.path.basename(path))[0]
    else:
        names = ", ".join(dataset_names())
        raise ValueError(f"unknown dataset '{name}'; choose one of {names}, or a path.csv[:target]")
    return prepare(name, df, target, source, max_rows)


def _writable_cache(cache, did):
    """The openml cache folder to read dataset `did` from: `cache`, or where this process cannot write the dataset's
    folder in it (a read-only mount, another user's cache) a copy of that folder, made once in $ETPO_CACHE/openml-cache
    (~/.cache/etpo/openml-cache), since the client writes a parsed copy beside a dataset's file on its first load."""
    folder = os.path.join("org", "openml", "www", "datasets", str(did))
    source = os.path.join(cache, folder)
    if not os.path.isdir(source) or os.access(source, os.W_OK):
        return cache
    copy = os.path.join(os.environ.get("ETPO_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "etpo")),
                        "openml-cache")
    target = os.path.join(copy, folder)
    if not os.path.isdir(target):
        partial = f"{target}.{os.getpid()}"  # renamed into place whole: runs started together
        try:
            os.makedirs(partial, exist_ok=True)
            for file in os.listdir(source):  # (files only; copyfile: writable, whatever their mode)
                if os.path.isfile(os.path.join(source, file)):
                    shutil.copyfile(os.path.join(source, file), os.path.join(partial, file))
        except OSError as e:
            raise OSError(f"the openml cache {cache} cannot be written, and a copy of its dataset {did} could not be "
                          f"made in {copy} either ({e.strerror}): set ETPO_CACHE to a folder you can write") from None
        try:
            os.rename(partial, target)
        except OSError:  # another run's copy is there first
            shutil.rmtree(partial, ignore_errors=True)
    return copy


def _openml_frame(name, openml_cache):
    did = OPENML_IDS[name]
    if openml_cache:
        openml_cache = _writable_cache(os.path.expanduser(openml_cache), did)
        os.environ["OPENML_CACHE_DIR"] = openml_cache
    import openml

    if openml_cache:
        openml.config.set_root_cache_directory(openml_cache)
    retries = openml.config.connection_n_retries
    if not reachable(openml.config.server):  # offline: the cache, or one try, not 5 with back-off (about 10 s)
        openml.config.connection_n_retries = 1
    try:
        ds = openml.datasets.get_dataset(did, download_data=True, download_qualities=False,
                                         download_features_meta_data=False)
        X, y, _, _ = ds.get_data(target=ds.default_target_attribute)
    except Exception as e:  # the client raises many types for "offline" (requests, OpenML server, file errors)
        folder = os.path.join(openml.config.get_cache_directory(), "datasets", str(did))
        cached = os.path.isdir(folder) and any(f.startswith("dataset.") for f in os.listdir(folder))
        if cached and not isinstance(e, OSError):  # (requests' errors are OSErrors) a copy cut short, say
            raise RuntimeError(f"could not read OpenML dataset {did} ({name}) from its cached copy in {folder} "
                               f"({type(e).__name__}): delete that folder, and it downloads again") from None
        raise RuntimeError(f"could not get OpenML dataset {did} ({name}): {type(e).__name__}; check the internet "
                           f"connection, or pass --openml-cache with a folder that holds it") from None
    finally:
        openml.config.connection_n_retries = retries
    return X.assign(**{ds.default_target_attribute: y}), ds.default_target_attribute


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def reachable(url, timeout=3.0):
    """Whether url's host takes a TCP connection within `timeout` seconds; True behind a proxy, which alone knows.
    Offline, the OpenML client (here) and huggingface_hub (model.hub_options) retry with back-off for 10-25 s; this
    one test lets them go to their caches, or fail, at once."""
    if any(os.environ.get(v) for v in PROXY_VARIABLES):
        return True
    url = urllib.parse.urlparse(url)
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout).close()
        return True
    except OSError:  # no route, no DNS, refused or timed out
        return False


def prepare(name, df, target, source, max_rows=MAX_ROWS):
    """CAAFE's preparation: shuffle (seed 0), keep a fraction of a few sets, at most max_rows rows (CAAFE's 2000; 0
    = all), integer codes for categories and labels, imputed missing values; then hold out 20% of the rows
    (stratified, seed 0)."""
    from sklearn.model_selection import train_test_split

    df = df[df[target].notna()]  # a row without a label cannot be scored (else "nan" would become a class)
    fraction = KEEP_FRACTION.get(name, 1.0)
    sampled = df.sample(frac=fraction, random_state=SEED)
    labelled, capped = len(df), 0 < max_rows < len(sampled)  # for the summary
    df = sampled.iloc[:max_rows or None].reset_index(drop=True)
    labels_column = df[target]
    if labels_column.dtype.kind == "f" and (labels_column == labels_column.round()).all():
        labels_column = labels_column.astype(np.int64)  # a CSV with missing labels reads 0/1 as 0.0/1.0
    labels = sorted(labels_column.astype(str).unique())
    y = labels_column.astype(str).map({v: i for i, v in enumerate(labels)}).to_numpy(np.int64)
    counts = np.bincount(y, minlength=len(labels))
    if len(labels) < 2:  # the reward is a ROC AUC: every program would score -1, and training would learn nothing
        found = f"one class only ({labels[0]!r})" if labels else "no value in any row"
        raise ValueError(f"the target '{target}' of {name} has {found}; the reward is a ROC AUC, which needs at least "
                         "two classes: pass another target column (path.csv:column)")
    if counts.min() < MIN_CLASS_ROWS:  # else a split can leave a class out of x_train, and every program fails there
        rare = [labels[i] for i in np.flatnonzero(counts < MIN_CLASS_ROWS)]
        raise ValueError(f"the target '{target}' of {name} has {len(rare)} of its {len(labels)} classes with fewer "
                         f"than {MIN_CLASS_ROWS} rows (e.g. {rare[0]!r}): each of the reward's 50/50 splits needs "
                         "every class on both sides; drop or merge those rows"
                         + (" (is it a regression target?)" if len(rare) > len(labels) / 2 else ""))
    columns, lines, empty, unique = [], [], [], []
    for col in (c for c in df.columns if c != target):
        s, i, infinite = df[col], len(columns), 0
        if s.dtype.kind in "biuf":  # an infinity (a ratio over zero, say) is missing too: no classifier takes one
            s = s.astype(float)
            infinite = int(np.isinf(s).sum())
            s = s.replace([np.inf, -np.inf], np.nan)
        missing = int(s.isna().sum())
        # a whole number or a text of its own in every row: a row id, or a name? (in a file of a few rows, by chance)
        if len(df) >= 20 and s.nunique() == len(df) and (s.dtype.kind != "f" or (s == s.round()).all()):
            unique.append(str(col))
        if missing == len(df):  # no value in any row: nothing to learn from (and no median to fill in)
            empty.append(str(col))
        elif s.dtype.kind == "f":
            what = "missing or infinite" if infinite else "missing"
            filled = f", {missing} {what} set to the median {s.median():.4g}" if missing else ""
            lines.append(f"#   {i}: {col} (numeric, {s.min():.4g} .. {s.max():.4g}{filled})")
            columns.append(s.fillna(s.median()).to_numpy())
        else:
            codes = s.astype("category").cat.codes.to_numpy().astype(float)  # 0..n-1, missing -> -1
            n = s.nunique()
            filled = f", {missing} missing coded {n}" if missing else ""
            lines.append(f"#   {i}: {col} (categorical, {n} values coded 0..{n - 1}{filled})")
            columns.append(np.where(codes < 0, n, codes))
    if not columns:
        raise ValueError(f"{name} has no column besides the target '{target}'"
                         + (f" that holds a value ({', '.join(empty)} are empty)" if empty else "")
                         + ", and a classifier needs at least one feature: pass a file with feature columns")
    X = np.stack(columns, axis=1).astype(np.float64)  # (n, d)
    X, X_test, y, y_test = train_test_split(X, y, test_size=HELDOUT, random_state=SEED, stratify=y)
    description = (f"# Dataset: {name} ({source}), {len(df)} rows, {X.shape[1]} features.\n"
                   f"# Target: {target}, {len(labels)} classes: "
                   + ", ".join(f"{i} = {v}" for i, v in enumerate(labels[:10])) + (" ..." if len(labels) > 10 else "")
                   + ".\n# Features (columns of x_train, a float numpy array; y_train holds integer labels):\n"
                   + "\n".join(lines[:LISTED_FEATURES]) + ("\n#   ..." if len(lines) > LISTED_FEATURES else "")
                   + (f"\n# Left out, empty in every row: {', '.join(empty)}." if empty else ""))
    why = []  # why fewer rows than the file's labelled ones
    if fraction < 1:
        why.append(f"CAAFE keeps {fraction:.0%} of this set")
    if capped:
        why.append(f"at most --max-rows {max_rows}")
    rows = f"{len(df)} of its {labelled} labelled rows (shuffled, {'; '.join(why)})" if why else f"{len(df)} rows"
    listed = f" (the prompt lists the first {LISTED_FEATURES})" if len(lines) > LISTED_FEATURES else ""
    summary = (f"{name}, {source}: {rows}, {X.shape[1]} features{listed}, {len(labels)} classes; {len(y)} rows for "
               f"the reward's splits, {len(y_test)} held out")
    if unique:  # in a file sorted by its target, a row number alone scores a ROC AUC near 1
        summary += (f"\nwarning: {', '.join(unique)} {'holds' if len(unique) == 1 else 'hold'} a different whole "
                    "number or text in each row: if a row id or a name, drop it from the file, or programs may learn "
                    "the rows' order instead of the task")
    return Dataset(name, X, y, X_test, y_test, description, summary)


# ----------------------------------------------------------------------------------------------------------------
# Prompts and code


def task_prompt(dataset, infill=False):
    """s_0: the dataset, the task, and the signature to complete (CodeLlama's infilling format when available)."""
    head = (f"{dataset.description}\n# Write the body of build_model: fit a scikit-learn classifier that has "
            "predict_proba on x_train, y_train and return it. It is scored by ROC AUC on unseen rows.\n\n")
    return _with_signature(head, infill)


def reflection_prompt(dataset, code, error, infill=False):
    """s_{t+1} after a failure: the task again, the previous code and its error, and a request for a fix."""
    error = error if len(error) <= 600 else error[:300] + "\n...\n" + error[-300:]
    quoted = "\n".join("# " + line for line in (SIGNATURE + code).rstrip().splitlines()[:40])
    head = (f"{dataset.description}\n# Write the body of build_model: fit a scikit-learn classifier that has "
            f"predict_proba on x_train, y_train and return it.\n# This attempt failed:\n{quoted}\n# Error:\n"
            + "\n".join("# " + line for line in error.splitlines()) + "\n# Write a corrected version.\n\n")
    return _with_signature(head, infill)


def prompt_tail(prompt, most=8):
    """The end of a prompt before its signature, for train.py's samples: a reflection's error and its request for a
    fix (at most `most` lines), or the task's instruction (another environment's prompt: its last line)."""
    head, signed, _ = prompt.rpartition(SIGNATURE)  # (a reflection quotes the signature too: the last one is real)
    lines = (head if signed else prompt).rstrip().splitlines()
    # the quoted program's lines are indented ("#     ..."), so the first "# Error:" after them opens the error, which
    # may hold such a line itself
    failed = lines.index("# This attempt failed:") if "# This attempt failed:" in lines else len(lines)
    error = next((i for i in range(failed, len(lines)) if lines[i] == "# Error:"), None)
    return "\n".join(lines[error:][:most] if error is not None else lines[-1:])


def _with_signature(head, infill):
    if infill:  # CodeLlama: <PRE> prefix <SUF> suffix <MID>, split at <FILL_ME> by its tokenizer, which fails if
        # the text holds it twice (a failed program or its error can quote it)
        return head.replace("<FILL_ME>", "<FILL ME>") + SIGNATURE + "<FILL_ME>\n    return model\n"
    return head + SIGNATURE


def extract_body(text):
    """The function body from whatever the model wrote: drop a repeated signature and code fences, stop at the
    first non-indented line after the body starts."""
    lines = text.replace("\t", "    ").split("\n")
    if lines and lines[0].lstrip().startswith("def build_model"):
        lines = lines[1:]
    body = []
    for line in lines:
        if line.strip().startswith("```"):
            break
        if line.strip() and not line.startswith(" "):
            break
        body.append(line)
    return "\n".join(body).rstrip() + "\n"


def program(text, infill=False):
    """The full source that gets executed for an action."""
    body = extract_body(text)
    if not body.strip():
        body = "    pass\n"
    return SIGNATURE + body + ("    return model\n" if infill else "")


# ----------------------------------------------------------------------------------------------------------------
# The vectorized environment


class CodingEnv:
    """N parallel episodes of the coding MDP. A finished episode restarts at s_0 on the next step."""

    def __init__(self, dataset, n_envs=8, max_steps=5, sandbox=None, infill=False, timeout=60.0):
        self.dataset, self.n, self.max_steps, self.infill, self.timeout = dataset, n_envs, max_steps, infill, timeout
        self.sandbox = sandbox or execution.Sandbox()
        self.t = [0] * n_envs  # environment step inside each episode
        self.prompts = [task_prompt(dataset, infill)] * n_envs
        self.env_steps, self.episodes, self.best_reward, self.best_code = 0, 0, -1.0, None

    def step(self, texts):
        """Execute one action per episode. Returns rewards (N,), dones (N,), the next prompts and per-episode info."""
        sources = [program(text, self.infill) for text in texts]
        results = self.sandbox.run(sources, self.dataset, timeout=self.timeout)
        rewards, dones, infos = np.zeros(self.n), np.zeros(self.n), []
        for i, (source, (reward, error)) in enumerate(zip(sources, results)):
            self.t[i] += 1
            rewards[i] = reward
            # ETPO.md sec. 1: success ends the episode; a failure leads to a reflection prompt, until the step limit
            dones[i] = float(error is None or self.t[i] >= self.max_steps)
            if error is None and reward > self.best_reward:
                self.best_reward, self.best_code = reward, source
            infos.append({"code": source, "error": error, "reward": reward, "step": self.t[i]})
            if dones[i]:
                self.t[i], self.prompts[i] = 0, task_prompt(self.dataset, self.infill)
                self.episodes += 1
            else:
                self.prompts[i] = reflection_prompt(self.dataset, source[len(SIGNATURE):], error, self.infill)
        self.env_steps += self.n
        return rewards, dones, list(self.prompts), infos

    def state_dict(self):
        return {k: getattr(self, k) for k in ("t", "prompts", "env_steps", "episodes", "best_reward", "best_code")}

    def load_state_dict(self, state):
        for k, v in state.items():
            setattr(self, k, v)
