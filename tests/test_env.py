"""
env.py and execution.py: datasets load offline through the real openml client (a temporary copy of
../shared/data/openml-cache), rewards equal ROC AUC computed directly with scikit-learn, and a zoo of bad programs
each returns -1 with a useful error within its limits while the test process lives on; prompts and the step limit of
the MDP.

Run: python -m pytest tests/test_env.py -q
"""

import ast
import contextlib
import errno
import functools
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
import threadpoolctl
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

import env
import execution
import isolation
import landlock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data is not beside this checkout")

GOOD = """def build_model(x_train, y_train):
    from sklearn.linear_model import LogisticRegression
    model = LogisticRegression(max_iter=1000)
    model.fit(x_train, y_train)
    return model
"""


def body(code):
    return "def build_model(x_train, y_train):\n" + "".join(f"    {line}\n" for line in code.strip().splitlines())


@pytest.fixture(scope="module")
def sandbox():
    sb = execution.Sandbox(workers=2, memory_mb=2048)
    yield sb
    sb.close()


@pytest.fixture(scope="module")
def iris():
    return env.load_dataset("iris")


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def shared_openml_cache(path):
    """A copy of ../shared's openml cache at path, which this user may write (copytree keeps ../shared's read-only
    modes, which only root writes through)."""
    shutil.copytree(os.path.join(SHARED, "openml-cache"), path)
    for folder, _, files in os.walk(path):
        os.chmod(folder, 0o755)
        for file in files:
            os.chmod(os.path.join(folder, file), 0o644)
    return str(path)


@pytest.fixture(scope="module")
def openml_cache(tmp_path_factory):
    """The client writes pickles into its cache, so it gets a temporary copy, never ../shared itself."""
    return shared_openml_cache(tmp_path_factory.mktemp("openml") / "cache")


# (rows, features, classes) of each local dataset as published; CAAFE keeps a fraction of three and caps at 2000
EXPECTED = {"balance_scale": (625, 4, 3), "breast_w": (699, 9, 2), "cmc": (1473, 9, 3), "credit_g": (1000, 20, 2),
            "diabetes": (768, 8, 2), "tic_tac_toe": (958, 9, 2), "eucalyptus": (736, 19, 5), "pc1": (1109, 21, 2),
            "jungle_chess": (44819, 6, 3), "pharyngitis": (512, 18, 2), "kidney_stone": (414, 6, 2),
            "health_insurance": (None, 12, 2), "spaceship_titanic": (None, 11, 2)}


@needs_shared
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_local_dataset_loads_offline_with_the_expected_shape(name, openml_cache, no_network):
    d = env.load_dataset(name, data_dir=os.path.join(SHARED, "kaggle"), openml_cache=openml_cache)
    rows, features, classes = EXPECTED[name]
    n = len(d.X) + len(d.X_test)
    if rows is not None:
        assert n == min(env.MAX_ROWS, round(rows * env.KEEP_FRACTION.get(name, 1.0)))
    else:
        assert n == env.MAX_ROWS  # the big Kaggle sets keep 2000 complete rows
    assert d.X.shape[1] == d.X_test.shape[1] == features
    assert set(np.unique(np.concatenate([d.y, d.y_test]))) == set(range(classes))
    assert len(d.X_test) == int(np.ceil(n * env.HELDOUT)) and np.isfinite(d.X).all() and np.isfinite(d.X_test).all()
    assert name in d.description and "Features" in d.description
    assert (f"of its {rows} labelled rows (shuffled, CAAFE keeps" in d.summary) == (name in env.KEEP_FRACTION)
    assert "warning" not in d.summary  # no column of the paper's datasets is a row id


def test_user_errors_are_one_clear_sentence(tmp_path, no_network):
    with pytest.raises(ValueError, match="unknown dataset 'nope'; choose one of .*cmc"):
        env.load_dataset("nope")
    with pytest.raises(FileNotFoundError, match="needs the file .*pharyngitis.csv"):
        env.load_dataset("pharyngitis", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"^no CSV file at {tmp_path}/nope.csv; check the path$"):
        env.load_dataset(str(tmp_path / "nope.csv:target"))
    with pytest.raises(RuntimeError, match="could not get OpenML dataset 23 .*--openml-cache"):
        env.load_dataset("cmc", openml_cache=str(tmp_path / "empty"))


def test_offline_openml_fails_at_once(tmp_path, monkeypatch):
    # offline and not in the cache: one request, not the client's 5 with back-off (10 s to the same sentence)
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    with pytest.raises(RuntimeError, match="could not get OpenML dataset 23 .*--openml-cache"):
        env.load_dataset("cmc", openml_cache=str(tmp_path / "empty"))
    assert len(attempts) == 2  # the connection test, then the one request


@needs_shared
def test_a_cached_openml_copy_cut_short_says_to_delete_it(tmp_path, no_network):
    # a download cut short leaves a file the client cannot parse, and it never downloads a cached file again
    cache = tmp_path / "cache"
    shared_openml_cache(cache)
    folder = cache / "org" / "openml" / "www" / "datasets" / "23"
    for f in folder.glob("dataset.*"):
        if f.suffix != ".arff":
            f.unlink()  # (a pickle the client wrote beside it)
    arff = (folder / "dataset.arff").read_bytes()
    (folder / "dataset.arff").write_bytes(arff[: len(arff) // 2])
    with pytest.raises(RuntimeError, match=f"could not read OpenML dataset 23 .cmc. from its cached copy in {folder} "
                                           r"\(\w+\): delete that folder, and it downloads again"):
        env.load_dataset("cmc", openml_cache=str(cache))
    shutil.rmtree(folder)  # gone: offline, the sentence about the connection
    with pytest.raises(RuntimeError, match="could not get OpenML dataset 23 .*check the internet connection"):
        env.load_dataset("cmc", openml_cache=str(cache))


@needs_shared
def test_a_read_only_openml_cache_is_read_through_a_copy(tmp_path, monkeypatch, no_network):
    # the client writes a parsed copy (dataset.pkl.py3) beside a dataset's file on its first load: in a folder this
    # process cannot write (a read-only mount, another user's cache, ../shared for a user who is not root) that
    # failed, and the run said to check the internet connection
    cache = tmp_path / "read-only"
    shared_openml_cache(cache)
    folder = cache / "org" / "openml" / "www" / "datasets" / "37"  # diabetes
    for f in folder.glob("dataset.pkl*"):
        f.unlink()
    before = sorted(os.listdir(folder))
    folder.chmod(0o555)
    # root writes into a folder of mode 555 all the same: os.access answers as it does for any other user
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: real_access(path, mode, **kwargs) and not (
        mode & os.W_OK and str(path).startswith(str(cache))))
    monkeypatch.setenv("ETPO_CACHE", str(tmp_path / "etpo"))
    try:
        for _ in range(2):  # copied once, then read from the copy
            d = env.load_dataset("diabetes", openml_cache=str(cache))
            assert len(d.X) + len(d.X_test) == 768 and d.X.shape[1] == 8
        assert sorted(os.listdir(folder)) == before  # nothing written into the read-only folder
        copy = tmp_path / "etpo" / "openml-cache" / "org" / "openml" / "www" / "datasets" / "37"
        assert set(before) < set(os.listdir(copy)) and all(os.access(copy / f, os.W_OK) for f in os.listdir(copy))
        (tmp_path / "file").write_text("")  # and where no copy can be made either: one sentence
        monkeypatch.setenv("ETPO_CACHE", str(tmp_path / "file"))
        with pytest.raises(OSError, match=f"^the openml cache {cache} cannot be written, and a copy .* set ETPO_CACHE"):
            env.load_dataset("diabetes", openml_cache=str(cache))
    finally:
        folder.chmod(0o755)


def test_csv_path_with_target_column(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    path = tmp_path / "mine.csv"
    lines = ["a,b,c,label,color"] + [f"{r[0]},{r[1]},{r[2]},{int(r[0] > 0)},{'red' if r[1] > 0 else 'blue'}" for r in x]
    path.write_text("\n".join(lines))
    assert env.folder_name(f"{path}:label") == "mine-label" and env.folder_name(str(path)) == "mine"
    assert env.folder_name("cmc") == "cmc"  # train.py's default run folder: runs/mine-label-tiny-etpo
    (tmp_path / "v1.csv.d").mkdir()  # a folder whose name holds .csv, a file named in capitals, a path from ~
    (tmp_path / "v1.csv.d" / "MINE.CSV").write_text("\n".join(lines))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert env.folder_name("~/v1.csv.d/MINE.CSV:label") == "MINE-label"
    d = env.load_dataset("~/v1.csv.d/MINE.CSV:label")
    assert d.X.shape == (160, 4) and d.name == "MINE" and "Target: label" in d.description
    pd.read_csv(path).to_csv(tmp_path / "indexed.csv")  # with the index pandas writes by default, an unnamed column
    d = env.load_dataset(f"{tmp_path / 'indexed.csv'}:label")
    assert d.X.shape == (160, 4) and "Unnamed" not in d.description and "#   0: a (numeric" in d.description
    d = env.load_dataset(f"{path}:label")
    assert d.X.shape == (160, 4) and d.name == "mine" and "color (categorical" in d.description
    path.write_text("\n".join(lines[:51] + [",".join(line.split(",")[:3] + ["", "red"]) for line in lines[51:]]))
    d = env.load_dataset(f"{path}:label")  # rows without a label are dropped, not made a class of their own
    assert len(d.y) + len(d.y_test) == 50 and "2 classes: 0 = 0, 1 = 1." in d.description
    for sep in (";", "\t"):  # a spreadsheet's export: the same table, another separator
        (tmp_path / "other.csv").write_text("\n".join(line.replace(",", sep) for line in lines))
        other = env.load_dataset(f"{tmp_path / 'other.csv'}:label")
        assert other.X.shape == (160, 4) and "color (categorical" in other.description
    excel = ["größe;farbe;ziel"] + [f"{r[0]:.3f};{'grün' if r[1] > 0 else 'rot'};{'ja' if r[0] > 0 else 'nein'}"
                                    for r in x]
    (tmp_path / "excel.csv").write_bytes("\r\n".join(excel).encode("cp1252"))  # Excel on Windows: not UTF-8
    d = env.load_dataset(str(tmp_path / "excel.csv"))
    assert d.X.shape == (160, 2) and "0: größe (numeric" in d.description and "1: farbe (categorical" in d.description
    assert "ziel, 2 classes: 0 = ja, 1 = nein." in d.description
    (tmp_path / "target-only.csv").write_text("label\n" + "\n".join("01"[i % 2] for i in range(40)))
    with pytest.raises(ValueError, match="has no column besides the target 'label'"):  # was "need at least one array"
        env.load_dataset(str(tmp_path / "target-only.csv"))
    for name, content in (("empty.csv", b""), ("binary.csv", bytes(range(256)) * 10)):  # one sentence, not pandas'
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"could not read .*{name} as a CSV file .*: pass a text file of columns"):
            env.load_dataset(str(tmp_path / name))
    # a binary file with no byte that Windows-1252 leaves undefined: its NUL bytes give it away
    (tmp_path / "image.csv").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(32, 127)) * 20)
    with pytest.raises(ValueError, match="image.csv as a CSV file .it holds NUL bytes: a binary file"):
        env.load_dataset(str(tmp_path / "image.csv"))
    (tmp_path / "utf16.csv").write_bytes("\n".join(lines).encode("utf-16"))  # Excel's "Unicode text"
    with pytest.raises(ValueError, match="utf16.csv as a CSV file .it holds NUL bytes: .* or UTF-16 text, which"):
        env.load_dataset(str(tmp_path / "utf16.csv"))


def test_missing_values_are_filled_as_the_prompt_says_and_empty_columns_are_left_out(tmp_path):
    rows = ["a,empty,color,nothing,ratio,label"] + [
        f"{'' if i % 10 == 0 else i},,{'' if i % 5 == 1 else 'red' if i % 2 else 'blue'},,"
        f"{'-inf' if i == 3 else 1 / i if i else 'inf'},{i % 2}" for i in range(40)]  # ratio: 1 / i, two infinite
    path = tmp_path / "holes.csv"
    path.write_text("\n".join(rows))
    d = env.load_dataset(f"{path}:label")
    X = np.concatenate([d.X, d.X_test])  # (40, 3): the two empty columns are not features
    assert X.shape == (40, 3) and "3 features" in d.description and np.isfinite(X).all()
    assert "#   0: a (numeric, 1 .. 39, 4 missing set to the median 20)" in d.description  # 1..39 without 10, 20, 30
    assert "#   1: color (categorical, 2 values coded 0..1, 8 missing coded 2)" in d.description
    assert "# Left out, empty in every row: empty, nothing." in d.description
    ratio = "2: ratio (numeric, 0.02564 .. 1, 2 missing or infinite set to the median 0.04881)"  # (1/20 + 1/21) / 2
    median = np.median([1 / i for i in range(1, 40) if i != 3])  # pandas before 3 may read 1 / i one ulp off
    assert ratio in d.description and np.isclose(X[:, 2], median, rtol=1e-15, atol=0).sum() == 2
    assert sorted(np.unique(X[:, 1])) == [0.0, 1.0, 2.0] and (X[:, 1] == 2).sum() == 8
    assert (X[:, 0] == 20).sum() == 4  # rows 0, 10, 20, 30 (the median of 1..39 without 10, 20, 30 is (19 + 21) / 2)
    path.write_text("empty,label\n" + "\n".join(f",{i % 2}" for i in range(40)))
    with pytest.raises(ValueError, match="has no column besides the target 'label' that holds a value .empty are"):
        env.load_dataset(f"{path}:label")


def test_a_larger_dataset_keeps_max_rows_of_one_shuffle_and_a_row_id_is_warned_of(tmp_path, sandbox):
    # CAAFE's preparation keeps at most 2000 rows, a shuffled sample; max_rows (train.py --max-rows) moves the cap,
    # 0 keeps every row
    path = tmp_path / "big.csv"
    path.write_text("\n".join(["id,x,label"] + [f"{i},{i % 7},{i % 2}" for i in range(2500)]))
    capped, every, few = (env.load_dataset(f"{path}:label", max_rows=m) for m in (env.MAX_ROWS, 0, 100))
    ids = [set(np.concatenate([d.X, d.X_test])[:, 0].astype(int)) for d in (capped, every, few)]  # the rows kept
    assert len(ids[0]) == 2000 and ids[1] == set(range(2500)) and len(ids[2]) == 100
    assert ids[2] < ids[0] and ids[0] != set(range(2000))  # one shuffle, whose first rows a smaller cap keeps
    assert capped.summary.startswith("big, CSV file: 2000 of its 2500 labelled rows (shuffled, at most --max-rows "
                                     "2000), 2 features, 2 classes; 1600 rows for the reward's splits, 400 held out\n")
    assert every.summary.startswith("big, CSV file: 2500 rows, 2 features") and "2500 rows" in every.description
    assert "2000 rows" in capped.description  # what the prompt tells the model
    assert env.load_dataset("iris").summary == ("iris, scikit-learn: 150 rows, 4 features, 3 classes; 120 rows for "
                                                "the reward's splits, 30 held out")  # and no warning
    assert "64 features (the prompt lists the first 40), 10 classes" in env.load_dataset("digits").summary
    # a file sorted by its target, with a row number and a name in each row: a row number alone scores an AUC near 1,
    # so the summary warns of both; in the file above, of its id alone (x repeats)
    assert capped.summary.endswith("\nwarning: id holds a different whole number or text in each row: if a row id or "
                                   "a name, drop it from the file, or programs may learn the rows' order instead of "
                                   "the task")
    path.write_text("\n".join(["id,x,name,label"] + [f"{i},{i % 7 / 2},p{i},{int(i >= 100)}" for i in range(200)]))
    sorted_file = env.load_dataset(f"{path}:label")
    assert "\nwarning: id, name hold a different whole number" in sorted_file.summary
    row_number = env.SIGNATURE + (  # a decision stump that sees column 0 alone
        "    from sklearn.tree import DecisionTreeClassifier\n"
        "    stump = DecisionTreeClassifier(max_depth=1).fit(x_train[:, :1], y_train)\n"
        "    class RowNumber:\n"
        "        def predict_proba(self, x):\n"
        "            return stump.predict_proba(x[:, :1])\n"
        "    return RowNumber()\n")
    assert sandbox.run([row_number], sorted_file)[0][0] > 0.95


def test_a_target_the_reward_cannot_score_is_refused_and_the_rarest_allowed_class_scores(tmp_path, sandbox):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 2))

    def csv(labels):
        path = tmp_path / f"{len(set(labels))}-{min(labels.count(v) for v in set(labels))}.csv"
        path.write_text("\n".join(["a,b,y"] + [f"{r[0]},{r[1]},{v}" for r, v in zip(x, labels)]))
        return str(path)

    with pytest.raises(ValueError, match="'y' of 1-100 has one class only \\('yes'\\); .* needs at least two classes"):
        env.load_dataset(csv(["yes"] * 100))
    (tmp_path / "header.csv").write_text("a,b,y\n")  # a header, and no row
    with pytest.raises(ValueError, match="'y' of header has no value in any row; .* needs at least two classes"):
        env.load_dataset(str(tmp_path / "header.csv"))
    rare = env.MIN_CLASS_ROWS - 1
    with pytest.raises(ValueError, match=f"1 of its 3 classes with fewer than {env.MIN_CLASS_ROWS} rows .*'rare'"):
        env.load_dataset(csv(["a"] * 50 + ["b"] * (50 - rare) + ["rare"] * rare))
    with pytest.raises(ValueError, match="regression target"):  # every value its own class
        env.load_dataset(csv([f"{v:.3f}" for v in rng.normal(size=100)]))
    # the rarest class allowed lands on both sides of every split: a program that runs scores, never a shape error
    d = env.load_dataset(csv(["a"] * 50 + ["b"] * (50 - env.MIN_CLASS_ROWS) + ["rare"] * env.MIN_CLASS_ROWS))
    reward, error = sandbox.run([GOOD], d)[0]
    assert error is None and 0 <= reward <= 1


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # GOOD's LogisticRegression, refitted here
def test_reward_equals_roc_auc_computed_directly(sandbox, iris):
    # the fits here run on one BLAS thread, as the programs do: with OpenBLAS (numpy 1.26) a multi-threaded fit ended
    # lbfgs elsewhere, and the held-out AUC below differed in the third decimal
    with threadpoolctl.threadpool_limits(1):
        bc = env.load_dataset("breast_cancer")
        for d in (bc, iris):
            aucs = []
            for i in range(5):  # seed i for split i, 50/50, stratified
                x_tr, x_va, y_tr, y_va = train_test_split(d.X, d.y, test_size=0.5, random_state=i, stratify=d.y)
                proba = LogisticRegression(max_iter=1000).fit(x_tr, y_tr).predict_proba(x_va)
                binary = proba.shape[1] == 2
                aucs.append(roc_auc_score(y_va, proba[:, 1]) if binary
                            else roc_auc_score(y_va, proba, multi_class="ovo"))
            reward, error = sandbox.run([GOOD], d)[0]
            assert error is None and reward == pytest.approx(np.mean(aucs), abs=1e-12)
        # the held-out AUC is fit on the reward rows and scored on rows the reward never sees
        heldout, error = sandbox.run([GOOD], bc, heldout=True)[0]
        proba = LogisticRegression(max_iter=1000).fit(bc.X, bc.y).predict_proba(bc.X_test)
        assert error is None and heldout == pytest.approx(roc_auc_score(bc.y_test, proba[:, 1]), abs=1e-12)
        assert not any((bc.X_test[:, None] == bc.X[None]).all(-1).any(1))  # no held-out row is a reward row


def test_a_reward_cached_under_other_limits_or_sandbox_rules_is_not_reused(sandbox, iris, monkeypatch):
    # a resumed run carries its reward cache into a new sandbox (train.py: sandbox.cache.update); a program whose
    # score depends on the limits, here one that needs 1,100 MB (more than all of 1,024; 0.3 to 0.5 GB more is mapped
    # before it starts), runs again under other limits, and so does every program once the sandbox's rules or
    # libraries change (RULES)
    big = body("block = bytearray(1100 * 2**20)\nreturn LogisticRegression(max_iter=500).fit(x_train, y_train)")
    big = big.replace("def build_model", "from sklearn.linear_model import LogisticRegression\n\ndef build_model")
    reward, error = sandbox.run([big], iris)[0]  # memory_mb=2048
    assert error is None and reward > 0.9
    small = execution.Sandbox(workers=1, memory_mb=1024)
    forged = execution.Sandbox(workers=1, memory_mb=2048)  # the same limits: the carried reward is used, not rerun
    try:
        small.cache.update(sandbox.cache)
        reward, error = small.run([big], iris)[0]
        assert reward == -1.0 and "MemoryError" in error
        forged.cache.update({key: (0.123, None) for key in sandbox.cache})
        assert forged.run([big], iris)[0] == (0.123, None)
        monkeypatch.setattr(execution, "RULES", "other rules")
        reward, error = forged.run([big], iris)[0]
        assert error is None and reward > 0.9
    finally:  # as the other tests' sandboxes: closed even when an assertion fails
        small.close()
        forged.close()


def test_the_sandbox_rules_hash_every_file_of_the_sandbox(tmp_path, monkeypatch):
    # RULES (in the reward cache's key) changes with each file whose code decides a program's score
    assert execution._rules() == execution.RULES
    for module in (execution, isolation, landlock):
        edited = tmp_path / os.path.basename(module.__file__)
        edited.write_bytes(open(module.__file__, "rb").read() + b"\n# one more line\n")
        with monkeypatch.context() as m:
            m.setattr(module, "__file__", str(edited))
            assert execution._rules() != execution.RULES, module.__name__


def test_execute_is_the_public_one_call_form(iris):
    reward, error = execution.execute(GOOD, iris, timeout=30)
    assert error is None and 0.9 < reward <= 1.0
    reward, error = execution.execute("model = None", iris, timeout=30)  # a whole program, without the function
    assert reward == -1.0 and "the code does not define build_model(x_train, y_train)" in error
    # its sandbox is never closed: the scratch folders' root goes when the process exits all the same
    script = (f"import env, execution\nexecution.execute({GOOD!r}, env.load_dataset('iris'))\n"
              "print(execution._SANDBOX.root)")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    root = r.stdout.strip()
    assert r.returncode == 0 and root and not os.path.exists(root), r.stderr[-2000:]


ZOO = {  # name: (body, a phrase the error must contain)
    "syntax_error": ("model = (", "SyntaxError"),
    "exception": ("x = 1 / 0", "line 1: x = 1 / 0\nZeroDivisionError"),
    "no_predict_proba": ("from sklearn.svm import LinearSVC\nreturn LinearSVC().fit(x_train, y_train)", "predict_pr"),
    "returns_none": ("pass", "returned None"),
    # one column where iris has 3 classes, for each half of the 120 rows the held-out 20% leaves
    "one_column_of_probabilities": ("class Model:\n    def predict_proba(self, x):\n        return [[1.0]] * len(x)\n"
                                    "return Model()", "predict_proba returned shape (60, 1), expected (60, 3)"),
    "infinite_loop": ("while True:\n    pass", "longer than 3 seconds"),
    "sleep_past_timeout": ("import time\ntime.sleep(60)", "longer than 3 seconds"),
    "memory_bomb": ("x = [0] * 10**10", "MemoryError"),
    "memory_bomb_numpy": ("import numpy as np\nx = np.zeros((10**6, 10**4))", "MemoryError"),
    "os_exit": ("import os\nos._exit(3)", "exited with code 3"),
    "sys_exit": ("import sys\nsys.exit(1)", "sys.exit(1)"),
    "segfault": ("import ctypes\nctypes.string_at(0)", "SIGSEGV"),
    "print_100_mb": ("for _ in range(100):\n    print('x' * 1_000_000)", "File too large"),
    "write_outside_scratch": ("open('/tmp/etpo-escape.txt', 'w').write('x')", "not allowed"),
    "delete_outside_scratch": ("import os\nos.remove(os.path.expanduser('/etc/hostname'))", "not allowed"),
    # another process: a `pip install` would change the trainer's own packages; the server's death, the whole batch
    "os_system": ("import os\nos.system('touch /tmp/etpo-escape.txt')", "os.system is not allowed"),
    "subprocess": ("import subprocess\nsubprocess.run(['touch', '/tmp/etpo-escape.txt'])", "subprocess.Popen is not"),
    # (Landlock refuses its semaphore's file in /dev/shm first; the audit hook, its os.fork)
    "fork_pool": ("import multiprocessing\nmultiprocessing.get_context('fork').Pool(2)", "process"),
    "kill_the_server": ("import os\nos.kill(os.getppid(), 9)", "os.kill of another process is not allowed"),
    "signal_another_group": ("import os\nos.killpg(1, 0)", "os.killpg of another process is not allowed"),
    "network": ("import socket\nsocket.create_connection(('127.0.0.1', 9))", "the code may not use the network"),
    "read_a_toy_dataset": ("from sklearn.datasets import load_iris\nload_iris()", "the code gets its data as x_train"),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_bad_code_zoo(name, sandbox, iris):
    code, phrase = ZOO[name]
    escape = f"/tmp/etpo-escape-{name}.txt"  # one per entry: a program that gets out fails its own test only
    start = time.monotonic()
    reward, error = sandbox.run([body(code.replace("/tmp/etpo-escape.txt", escape))], iris, timeout=3)[0]
    escaped = os.path.exists(escape)
    with contextlib.suppress(FileNotFoundError):
        os.remove(escape)
    assert reward == -1.0 and phrase in error, error
    assert time.monotonic() - start < 20
    assert not escaped and os.path.exists("/etc/hostname")
    assert sandbox.run([GOOD], iris, timeout=3)[0][1] is None  # the pool lives on


CHEAT = """import gc, os, sys
import numpy as np

KNOWN = {}  # a row's bytes: its label, from each (rows, labels) pair of arrays the program finds


def learn(container):
    arrays = [v for v in (container.values() if isinstance(container, dict) else container) if hasattr(v, 'ndim')]
    for x in arrays:
        for y in arrays:
            if x.ndim == 2 and y.ndim == 1 and len(x) == len(y) and y.dtype.kind in 'iu':
                KNOWN.update(zip(map(bytes, np.ascontiguousarray(x, dtype=float)), y.tolist()))


class Lookup:  # a row's label where it was found, else 0.5: an AUC of 0.5 where no validation label was
    def predict_proba(self, x):
        p = np.full((len(x), 2), 0.5)
        for i, row in enumerate(np.ascontiguousarray(x, dtype=float)):
            p[i] = np.eye(2)[KNOWN[bytes(row)]] if bytes(row) in KNOWN else p[i]
        return p


def build_model(x_train, y_train):
    try:
ROUTE
    except Exception:
        pass
    return Lookup()
"""
ROUTES = {  # each way a program could look for the labels of the rows it is scored on
    "callers_frames": "f = sys._getframe(1)\nwhile f:\n    learn(f.f_locals)\n    for v in f.f_locals.values():\n"
                      "        if isinstance(v, (tuple, list, dict)):\n            learn(v)\n    f = f.f_back",
    "every_object": "for o in gc.get_objects():\n    if isinstance(o, (tuple, list, dict)):\n        learn(o)",
    "earlier_splits": "learn((x_train, y_train))",  # 5 random halves: most validation rows were training rows before
    "toy_dataset_file": "from sklearn.datasets import load_breast_cancer\nb = load_breast_cancer()\n"
                        "learn((b.data, 1 - b.target))",  # (env.py numbers its classes the other way)
    "patch_the_mean": "np.mean = lambda *args, **kwargs: 1.0",  # what averaged the splits' AUCs, in the same process
    "the_runners_pipes": "for fd in os.listdir(f'/proc/{os.getppid()}/fd'):\n    try:\n"
                         "        open(f'/proc/{os.getppid()}/fd/{fd}', 'w').write('{\"reward\": 1.0}')\n"
                         "    except OSError:\n        pass",
    # a result of its own in the pipe the result goes back through, then an exit before its own is written
    "forged_result": "for fd in range(3, 64):\n    try:\n"
                     "        os.write(fd, b'{\"reward\": 1.0, \"error\": null}\\n')\n    except OSError:\n"
                     "        pass\nos._exit(0)",
}


def test_a_program_cannot_find_the_labels_it_is_scored_on_or_forge_its_reward(sandbox):
    # the reward is computed in the server from the probabilities a program returns; the program runs in a process
    # forked from one that never held a label, one split at a time, and may read only its folder and the Python
    # installation. Each route below gave a reward above 0.5 (up to 1.0) when the program's own process scored it
    data = env.load_dataset("breast_cancer")  # (no row twice: a validation row is found only where its label is)
    indent = "        "
    sources = [CHEAT.replace("ROUTE", "\n".join(indent + line for line in ROUTES[name].splitlines()))
               for name in ROUTES]
    results = dict(zip(ROUTES, sandbox.run(sources, data, timeout=30)))
    assert results.pop("forged_result")[0] == -1.0  # ("exited with code 0 before build_model returned")
    assert results == {name: (0.5, None) for name in results}
    assert sandbox.run([CHEAT.replace("ROUTE", indent + "learn((x_train, y_train))")], data, heldout=True)[0] == (
        0.5, None)


NATIVE = """import ctypes, errno, os, socket, struct
libc = ctypes.CDLL(None, use_errno=True)
runner = os.getppid()
server = int(open(f'/proc/{runner}/stat').read().rsplit(')', 1)[1].split()[1])
worked = []
tries = [('read the server memory', f'/proc/{server}/mem', os.O_RDONLY),
         ('read a file of the project', PROJECT_FILE, os.O_RDONLY),
         ('read the dataset in scikit-learn', TOY_DATASET, os.O_RDONLY),
         ('write outside its folder', ESCAPE, os.O_WRONLY | os.O_CREAT)]
tries += [('write into a pipe of the runner', f'/proc/{runner}/fd/{fd}', os.O_WRONLY) for fd in range(64)]
for what, path, flags in tries:
    fd = libc.open(path.encode(), flags, 0o600)
    if fd >= 0 and what not in worked:
        worked.append(what)
    libc.close(fd)
if libc.kill(runner, 0) == 0:
    worked.append('signal the runner')
sock = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
address = struct.pack('=H', socket.AF_INET) + struct.pack('!H', 9) + socket.inet_aton('127.0.0.1') + bytes(8)
if libc.connect(sock, address, len(address)) == 0 or ctypes.get_errno() == errno.ECONNREFUSED:  # (nothing listens)
    worked.append('connect over TCP')
child = libc.fork()
if child == 0:
    libc.execv(b'/bin/true', (ctypes.c_char_p * 2)(b'true', None))
    libc._exit(1)
status = ctypes.c_int()
libc.waitpid(child, ctypes.byref(status), 0)
if status.value == 0:
    worked.append('run another program')
raise RuntimeError('native code could: ' + (', '.join(worked) or 'nothing'))"""
NATIVE_ROUTE = ("import ctypes, sklearn\nlibc = ctypes.CDLL(None)\n"  # scikit-learn's copy, read by libc
                "fd = libc.open(os.path.join(os.path.dirname(sklearn.__file__), 'datasets', 'data', "
                "'breast_cancer.csv').encode(), 0)\nbuf = ctypes.create_string_buffer(1 << 20)\n"
                "n = libc.read(fd, buf, len(buf))\nrows = buf.raw[:n].decode().splitlines()[1:]\n"
                "data = np.array([[float(v) for v in row.split(',')] for row in rows])\n"
                "learn((data[:, :-1], 1 - data[:, -1].astype(int)))")


@pytest.mark.skipif(not landlock.version(), reason="the kernel has no Landlock (Linux 5.13+)")
def test_native_code_meets_the_kernels_rules(sandbox, iris, tmp_path):
    # ctypes gets around the audit hook; where the kernel has Landlock, it refuses the same from native code. Without
    # it, this program (run as root) did all of it, and the cheat below scored 1.0
    import sklearn

    escape = str(tmp_path / "escape.txt")
    toy = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "data", "iris.csv")
    program = NATIVE.replace("PROJECT_FILE", repr(os.path.join(ROOT, "env.py"))).replace(
        "TOY_DATASET", repr(toy)).replace("ESCAPE", repr(escape))
    reward, error = sandbox.run([body(program)], iris, timeout=10)[0]
    abi = landlock.version()  # the kernel's Landlock refuses TCP from ABI 4 (Linux 6.7), signals from 6 (6.12)
    older = [what for what, since in (("signal the runner", 6), ("connect over TCP", 4)) if abi < since
             and not (what == "connect over TCP" and own_network())]  # (a network of its own refuses TCP too)
    assert reward == -1.0 and error.endswith("native code could: " + (", ".join(older) or "nothing")), error
    assert not os.path.exists(escape)
    cheat = CHEAT.replace("ROUTE", "\n".join("        " + line for line in NATIVE_ROUTE.splitlines()))
    assert sandbox.run([cheat], env.load_dataset("breast_cancer"), timeout=30)[0] == (0.5, None)


@functools.cache  # (asked at collection and again by the Landlock test: one subprocess)
def own_network():
    """Whether this system lets a process take a network namespace of its own, as each program process does (some
    refuse an unprivileged user namespace: Docker's default seccomp profile, Ubuntu 24.04's AppArmor default)."""
    probe = "import ctypes, sys\nsys.exit(ctypes.CDLL(None).unshare(0x10000000 | 0x40000000) != 0)"
    return sys.platform == "linux" and subprocess.run([sys.executable, "-c", probe]).returncode == 0


@pytest.mark.skipif(not own_network(), reason="this system refuses a network namespace to an unprivileged process")
def test_native_code_reaches_no_network(sandbox, iris):
    # the audit hook sees Python's sockets only, and Landlock refuses TCP alone (from Linux 6.7): a program's native
    # code once sent UDP to this machine's services. Each program process has a network of its own, with nothing in it
    tcp, udp = socket.socket(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        udp.bind(("127.0.0.1", 0))
        code = f"""import ctypes, socket, struct
libc = ctypes.CDLL(None, use_errno=True)
reached = []
for kind, port in ((socket.SOCK_STREAM, {tcp.getsockname()[1]}), (socket.SOCK_DGRAM, {udp.getsockname()[1]})):
    fd = libc.socket(socket.AF_INET, kind, 0)
    address = struct.pack('=H', socket.AF_INET) + struct.pack('!H', port) + socket.inet_aton('127.0.0.1') + bytes(8)
    if kind == socket.SOCK_STREAM and libc.connect(fd, address, 16) == 0:
        reached.append('TCP')
    if kind == socket.SOCK_DGRAM and libc.sendto(fd, b'escaped', 7, 0, address, 16) == 7:
        reached.append('UDP')
raise RuntimeError('reached: ' + (', '.join(reached) or 'nothing'))"""
        reward, error = sandbox.run([body(code)], iris, timeout=10)[0]
        tcp.setblocking(False)
        udp.setblocking(False)
        with pytest.raises(BlockingIOError):
            tcp.accept()
        with pytest.raises(BlockingIOError):
            udp.recv(100)
        assert reward == -1.0 and error.endswith("reached: nothing"), error
        assert sandbox.run([GOOD], iris, timeout=10)[0][1] is None  # and a program that needs no network runs
    finally:
        tcp.close()
        udp.close()


def test_without_landlock_the_sandbox_says_so_and_runs_on(tmp_path):
    # a kernel before Linux 5.13, or one with Landlock off: the audit hook alone confines the programs, and the user
    # is told once, at the sandbox's start
    (tmp_path / "sitecustomize.py").write_text("import landlock\nlandlock.version = lambda: None\n")
    script = ("import env, execution\nsb = execution.Sandbox(workers=1)\n"
              f"print(sb.run([{GOOD!r}, {body('open(' + repr(os.path.join(ROOT, 'env.py')) + ').read()')!r}], "
              "env.load_dataset('iris'), timeout=30))\nsb.close()\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), ROOT])})
    (good, _), (reward, error) = ast.literal_eval(r.stdout.strip().splitlines()[-1])
    assert good > 0.9 and reward == -1.0 and "the code gets its data as x_train" in error, r.stderr
    assert r.stderr.count("does not confine the generated programs with Landlock") == (sys.platform == "linux")


def test_programs_may_read_the_python_installation_only(tmp_path, monkeypatch):
    import sklearn

    readable = isolation.reader(str(tmp_path))
    assert readable(os.path.realpath(sklearn.__file__)) and readable(os.path.realpath(np.__file__))
    assert readable("/proc/cpuinfo") and readable(f"/proc/{os.getpid()}/maps") and readable("/proc/1/stat")
    assert not readable("/proc/1/mem") and not readable("/proc/1/fd/3") and not readable("/proc/1/environ")
    assert not readable(str(tmp_path / "etpo-run-x" / "output.txt"))  # the sandbox's folder: other programs' files
    assert not readable(os.path.join(os.path.dirname(sklearn.__file__), "datasets", "data", "iris.csv"))
    assert not readable(os.path.join(ROOT, "env.py")) and not readable(os.path.expanduser("~/.cache/openml/x"))
    assert not readable(os.path.realpath(os.path.join(SHARED, "README.md")))
    # a project (or a home) inside the system's folders, as in a container's /usr/src/app: its files stay out of reach
    monkeypatch.setattr(isolation, "__file__", "/usr/src/etpo-app/isolation.py")
    monkeypatch.setenv("HOME", "/usr/share/etpo-home")
    readable = isolation.reader(str(tmp_path))
    assert not readable("/usr/src/etpo-app/data/cmc.csv") and not readable("/usr/share/etpo-home/.cache/openml/x")
    assert readable("/usr/src/another-app/x.py") and readable(os.path.realpath(sklearn.__file__))


@pytest.mark.skipif(sys.platform != "linux", reason="prctl is Linux's")
def test_the_sandbox_processes_are_undumpable(sandbox, iris):
    # so that, Landlock or not, a program of another user than root cannot open the server's memory or the runner's
    # pipes (whose messages the server unpickles) through /proc; a program process inherits the runner's flag
    code = "import ctypes\nraise RuntimeError(f'dumpable {ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)}')"  # PR_GET_DUMPABLE
    assert sandbox.run([body(code)], iris, timeout=10)[0][1].endswith("RuntimeError: dumpable 0")


def test_a_program_may_not_leave_files_in_shared_memory(sandbox, iris):
    # /dev/shm is the machine's memory: a file there outlives the program, outside the disk cap and the scratch folder
    path = f"/dev/shm/etpo-escape-{os.getpid()}.txt"
    reward, error = sandbox.run([body(f"open({path!r}, 'w').write('x' * 1000)")], iris, timeout=3)[0]
    escaped = os.path.exists(path)
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    assert reward == -1.0 and f"writing to {path} is not allowed" in error and not escaped, error


def test_a_program_that_fills_the_disk_is_stopped(iris):
    # the file-size limit caps each file (4 MB), not their number: file after file, a program could fill the disk
    # that holds the run's checkpoint within its time limit. This one writes 20 MB a second for up to 60 s
    filler = body("import itertools, time\nfor i in itertools.count():\n"
                  "    open(f'part{i}', 'wb').write(b'x' * (1 << 20))\n    time.sleep(0.05)")
    modest = GOOD.replace("    from sklearn", "    for i in range(3):\n"
                          "        open(f'part{i}', 'wb').write(b'x' * (3 << 20))\n    from sklearn", 1)  # 9 MB: under
    sb = execution.Sandbox(workers=2, disk_mb=16)
    try:
        start = time.monotonic()
        (reward, error), (modest_reward, modest_error) = sb.run([filler, modest], iris, timeout=60)
        assert reward == -1.0 and error.startswith("OSError: the code wrote more than 16 MB of files"), error
        # stopped within a second of passing 16 MB, long before its time limit: a margin for a loaded machine, where
        # the sandbox's cold start alone took 5 s
        assert time.monotonic() - start < 30
        assert modest_error is None and modest_reward > 0.9
    finally:
        sb.close()


def test_a_program_that_nests_folders_1500_deep_scores_and_leaves_nothing(iris):
    # before Python 3.13 shutil.rmtree recursed once per level of folders (os.walk, before 3.12): removing this
    # program's scratch folder raised RecursionError in the server, and then in the trainer's Sandbox.close
    nest = GOOD.replace("    from sklearn", "    import os\n    top = os.getcwd()\n    for _ in range(1500):\n"
                        "        os.makedirs('d', exist_ok=True)\n        os.chdir('d')\n    os.chdir(top)\n"
                        "    from sklearn", 1)  # (build_model runs once per split: the same 1,500 each time)
    sb = execution.Sandbox(workers=1)
    try:
        reward, error = sb.run([nest], iris, timeout=30)[0]
        assert error is None and reward > 0.9, error
        server = sb.proc.pid
        assert sb.run([GOOD], iris, timeout=10)[0][1] is None and sb.proc.pid == server  # the same server goes on
        assert os.listdir(sb.root) == []  # the 1,500 folders are gone
    finally:
        sb.close()


def test_n_jobs_runs_in_the_programs_own_process(sandbox):
    # n_jobs=-1, common in scikit-learn code, started a joblib worker process per core in every program: with a
    # program per core, a process per core per core in all (~0.1 GB each); n_jobs=4, 4 of them. The program counts
    # the processes of its group after a parallel grid search; the reward is the one n_jobs=1 gets.
    code = """from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import GridSearchCV
search = GridSearchCV(RandomForestClassifier(n_estimators=10, random_state=0), {'max_depth': [2, None]}, cv=3,
                      n_jobs=JOBS).fit(x_train, y_train)
import os

def group_of(pid):  # (None for a process of the machine's that ended meanwhile)
    try:
        return int(open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None

group = [p for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid() and group_of(p) == os.getpgid(0)]
assert not group, f'{len(group)} other processes'
return search"""
    data = env.load_dataset("breast_cancer")
    results = sandbox.run([body(code.replace("JOBS", jobs)) for jobs in ("-1", "4", "1")], data)
    assert [error for _, error in results] == [None] * 3, results
    assert results[0][0] == results[1][0] == results[2][0] > 0.9


def _alive(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def test_children_left_running_are_killed_and_an_open_pipe_does_not_stall(sandbox, iris):
    # a child left running, started from native code (which the audit hook does not see): its pid comes back in
    # the error, and it must be dead afterwards
    code = ("import ctypes, time\npid = ctypes.CDLL(None).fork()\nif pid == 0:\n    time.sleep(300)\n"
            "raise RuntimeError(f'pid={pid}')")
    reward, error = sandbox.run([body(code)], iris, timeout=10)[0]
    assert reward == -1.0 and "pid=" in error
    pid = int(error.rsplit("pid=", 1)[1].split()[0])
    time.sleep(0.2)
    assert not _alive(pid)
    # a forked child keeps every inherited fd (result pipe, output file) open and sleeps: no stall, real reward
    code = GOOD.replace("    from sklearn", "    import ctypes, time\n    if ctypes.CDLL(None).fork() == 0:\n"
                                            "        time.sleep(300)\n    from sklearn", 1)
    start = time.monotonic()
    reward, error = sandbox.run([code], iris, timeout=60)[0]
    assert error is None and reward > 0.9 and time.monotonic() - start < 30  # long before the time limit


def test_a_process_that_leaves_the_programs_group_dies_with_the_program(sandbox, iris):
    # native code (which the audit hook does not see) can fork a child that leaves the program's process group and
    # session (setsid) and starts one more: killing the program's group misses both, which once lived on after it
    code = ("import ctypes, os, time\nlibc = ctypes.CDLL(None)\nr, w = os.pipe()\nif libc.fork() == 0:\n"
            "    libc.setsid()\n    grandchild = libc.fork()\n    if grandchild > 0:\n"
            "        os.write(w, f'{os.getpid()} {grandchild}'.encode())\n    time.sleep(300)\n"
            "raise RuntimeError('pids=' + os.read(r, 100).decode())")
    escaped = []
    try:
        start = time.monotonic()
        reward, error = sandbox.run([body(code)], iris, timeout=60)[0]
        assert reward == -1.0 and "pids=" in error, error
        escaped = [int(pid) for pid in error.rsplit("pids=", 1)[1].split()[:2]]
        assert time.monotonic() - start < 30  # no wait for them: long before the time limit
        time.sleep(0.2)
        assert not any(_alive(pid) for pid in escaped)
        assert sandbox.run([GOOD], iris, timeout=10)[0][1] is None  # the sandbox runs on
    finally:
        for pid in escaped:  # (if the test failed, not left running for 300 s)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _children(pid):
    """The processes whose parent is pid (from /proc)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


def _mid_batch(sb, source, data, depth):
    """Start sb.run([source]) in a thread; once the program's process (the server's grandchild; depth 2) or the
    process it started (depth 3) runs, return (the thread, its results, [server, runner, the program's processes])."""
    results = []
    thread = threading.Thread(target=lambda: results.extend(sb.run([source], data, timeout=60)))
    thread.start()
    deadline = time.monotonic() + 30
    while True:
        chain = [sb.proc.pid] if sb.proc else []
        while chain and len(chain) <= depth:
            children = _children(chain[-1])  # read once: a short-lived child (the server's probe of the memory
            if not children:  # limit, at its start) may be gone by a second read; a chain that ends early is read again
                break
            chain.append(children[0])
        if len(chain) > depth:
            return thread, results, chain
        assert time.monotonic() < deadline and thread.is_alive(), results
        time.sleep(0.05)


def test_a_server_killed_mid_batch_fails_the_batch_and_restarts(iris):
    # the system's out-of-memory killer, say (or a program's native code, where the kernel's Landlock is older than
    # Linux 6.12's, or absent)
    sb = execution.Sandbox(workers=1)
    try:
        thread, results, (server, *_) = _mid_batch(sb, body("import time\ntime.sleep(300)"), iris, depth=2)
        os.kill(server, signal.SIGKILL)
        thread.join(60)
        assert results == [(-1.0, execution.SERVER_FAILED)]
        assert sb.cache == {}  # no program's score: a program that only shared the batch is not marked -1 for good
        assert not os.path.exists(sb.root)  # the scratch folders of the batch the server left, removed all the same
        assert sb.run([GOOD], iris, timeout=10)[0][1] is None
    finally:
        sb.close()


@pytest.mark.parametrize("target", [1, 0], ids=["runner", "server"])
def test_programs_die_with_a_runner_or_server_killed_mid_batch(target, iris):
    # the runner forks each program into its own session, so killing the server's group does not reach them: a
    # program still running (and the process it started from native code) when the runner or the server died must
    # die too, not sleep on
    sleeper = body("import ctypes, time\nctypes.CDLL(None).fork()\ntime.sleep(300)")  # (os.fork is refused)
    sb = execution.Sandbox(workers=1)
    try:
        thread, results, chain = _mid_batch(sb, sleeper, iris, depth=3)
        os.kill(chain[target], signal.SIGKILL)
        thread.join(60)
        assert results == [(-1.0, execution.SERVER_FAILED)]
        time.sleep(0.5)
        assert [pid for pid in chain[2:] if _alive(pid)] == []
    finally:
        sb.close()


def test_a_trainer_killed_mid_batch_leaves_no_server_program_folder_or_traceback(tmp_path):
    # the system's out-of-memory killer, or a cluster after its SIGTERM, kills the trainer with SIGKILL, so nothing
    # of it runs: the server used to finish the batch (minutes of programs), then print a BrokenPipeError traceback
    # into the run's log, where it read as the cause, and leave its scratch folder behind
    sleeper = body("import os, time\nopen('started', 'w').write(str(os.getpid()))\ntime.sleep(300)")
    trainer = tmp_path / "trainer.py"
    trainer.write_text(f"""import sys
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
import env, execution
sb = execution.Sandbox(workers=1)
sb._start()
print(sb.root, sb.proc.pid, flush=True)
sb.run([{sleeper!r}], env.load_dataset("iris"))
""")
    log = open(tmp_path / "log.txt", "w+")  # the run's log, which the server inherits as its stderr
    p = subprocess.Popen([sys.executable, str(trainer)], stdout=subprocess.PIPE, stderr=log, text=True)
    root, server = p.stdout.readline().split()
    deadline, program = time.monotonic() + 60, []
    while not program:  # until the program runs: its pid, in its scratch folder
        assert time.monotonic() < deadline and p.poll() is None, open(log.name).read()
        time.sleep(0.05)
        with contextlib.suppress(OSError, ValueError):
            program = [int(open(os.path.join(root, d, "started")).read()) for d in os.listdir(root)]
    p.kill()
    p.wait()
    for _ in range(100):  # within 5 s, where the program would have slept on for 300
        if not os.path.exists(root) and not _alive(server):
            break
        time.sleep(0.05)
    assert not _alive(server) and not os.path.exists(root)
    assert len(program) == 1 and not _alive(program[0])
    assert "Traceback" not in open(log.name).read()


def test_the_sandbox_runs_a_program_per_core_of_the_job_not_of_the_machine(monkeypatch):
    # a cluster job given 2 cores of a 64-core node: 64 programs at once on 2 cores could pass their time limits
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5, 6}, raising=False)
    assert execution.Sandbox().workers == 2 and execution.Sandbox(workers=3).workers == 3
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS has no affinity: the machine's count
    assert execution.Sandbox().workers == 64


def test_a_sandbox_that_cannot_start_says_why(iris, monkeypatch):
    # its folder on a full disk (train.py's test plays that) and a server that cannot be forked get different advice
    def no_process(*args, **kwargs):
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    monkeypatch.setattr(execution.subprocess, "Popen", no_process)
    sb = execution.Sandbox(workers=1)
    with pytest.raises(execution.SandboxError, match=r"^the sandbox could not start its server process \(Resource "
                                                      r"temporarily unavailable\)$"):
        sb.run([GOOD], iris, timeout=10)
    assert sb.cache == {}  # no program's score


def test_programs_score_where_the_system_refuses_the_memory_limit_or_holds_a_lower_one(tmp_path):
    # macOS answers setrlimit(RLIMIT_AS) with EINVAL (Python's ValueError), and a cluster's `ulimit -v` below the
    # sandbox's 4 GB cannot be raised (ValueError too): every program failed with that error and scored -1 before.
    # Here the server's setrlimit refuses RLIMIT_AS as macOS does; then a 3.5 GB hard limit is set, as by ulimit
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import resource\n\nsetrlimit = resource.setrlimit\n\n\ndef refuse(limit, values):\n"
        "    if limit == resource.RLIMIT_AS:\n        raise ValueError('current limit exceeds maximum limit')\n"
        "    setrlimit(limit, values)\n\n\nresource.setrlimit = refuse\n")
    script = ("import env, execution\nsb = execution.Sandbox(workers=1)\n"
              f"print(sb.run([{GOOD!r}], env.load_dataset('iris'), timeout=30)[0])\nsb.close()\n")

    def ulimit():
        resource.setrlimit(resource.RLIMIT_AS, (3500 << 20, 3500 << 20))

    one_thread = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}  # (a BLAS thread
    # per core reserves address space: on a machine of many cores the script itself could pass 3.5 GB)
    for path, limit, warned in ((hook, None, True), (tmp_path, ulimit, False)):  # (tmp_path: no hook)
        r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={**os.environ, **one_thread, "PYTHONPATH": os.pathsep.join([str(path), ROOT])},
                           preexec_fn=limit)
        reward, error = ast.literal_eval(r.stdout.strip().splitlines()[-1])
        assert error is None and reward > 0.9, (r.stdout, r.stderr)
        assert ("warning: this system refuses a memory limit for the generated programs" in r.stderr) == warned


def test_a_program_process_that_fails_before_its_split_arrives_fails_alone(tmp_path):
    # a program process reads its split from a pipe the server writes; one that ended first (here its scratch folder
    # is refused, as on a full disk, and the server is slow to answer) leaves the server a closed pipe, whose error
    # must not end the server, and with it the whole batch
    hook, flag = tmp_path / "hook", tmp_path / "fail-once"
    hook.mkdir()
    flag.touch()
    (hook / "sitecustomize.py").write_text(
        "import os, socket, time\n\nchdir, recv_fds = os.chdir, socket.recv_fds\n\n\ndef once(path):\n"
        f"    if 'etpo-run-' in str(path) and os.path.exists({str(flag)!r}):\n        os.remove({str(flag)!r})\n"
        "        raise OSError(28, 'No space left on device')\n    chdir(path)\n\n\ndef slow(*args):\n"
        f"    if os.path.exists({str(flag)!r} + '-slow'):\n        os.remove({str(flag)!r} + '-slow')\n"
        "        time.sleep(0.5)\n    return recv_fds(*args)\n\n\nos.chdir, socket.recv_fds = once, slow\n")
    (tmp_path / "fail-once-slow").touch()
    script = ("import env, execution\nsb = execution.Sandbox(workers=1)\n"
              f"print(sb.run([{GOOD!r}, {GOOD + '#'!r}], env.load_dataset('iris'), timeout=30))\nsb.close()\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), ROOT])})
    results = sorted(ast.literal_eval(r.stdout.strip().splitlines()[-1]))  # (the sandbox runs them in its order)
    assert results[0] == (-1.0, "OSError: [Errno 28] No space left on device"), (r.stdout, r.stderr)
    assert results[1][1] is None and results[1][0] > 0.9 and not flag.exists()


def test_a_cluster_stopping_the_job_does_not_cut_the_programs_short(iris):
    # a scheduler that stops a job signals every process in it; the trainer finishes its iteration first, so the
    # server and the running programs must live on: a program cut short would score -1, and the score would be cached
    sb = execution.Sandbox(workers=1)
    try:
        signals = "    import ctypes, os, signal\n    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):\n"
        code = GOOD.replace("    from sklearn", signals + "        ctypes.CDLL(None).kill(os.getppid(), sig)\n"
                            "        os.kill(os.getpid(), sig)\n    from sklearn", 1)
        reward, error = sb.run([code], iris, timeout=10)[0]
        assert error is None and reward > 0.9, error
        assert sb.proc.poll() is None  # the server too
    finally:
        sb.close()


def test_an_error_that_prints_a_set_reads_the_same_in_every_sandbox(iris):
    # scikit-learn's parameter errors print sets ("must be a str among {'uniform', 'distance'}"), and an error becomes
    # the next prompt: with Python's per-process string hashes, the same program gave two runs of one seed different
    # prompts from then on. Each new Sandbox starts a new server; all of them must print the same order.
    code = body("raise ValueError(str({'uniform', 'distance', 'auto', 'ball_tree', 'kd_tree', 'brute'}))")
    errors = set()
    for _ in range(3):
        sb = execution.Sandbox(workers=1)
        try:
            errors.add(sb.run([code], iris, timeout=10)[0][1])
        finally:
            sb.close()
    assert len(errors) == 1 and "ValueError" in errors.pop()


def test_body_extraction_and_reflection_prompt(sandbox, iris):
    text = "def build_model(x_train, y_train):\n\tmodel = 1\n    return model\n\nprint('hi')\n```\n"
    assert env.extract_body(text) == "    model = 1\n    return model\n"
    assert env.extract_body("    return 1\n```python\nmore") == "    return 1\n"
    assert env.program("    x = 1\n", infill=True).endswith("    x = 1\n    return model\n")
    assert "<FILL_ME>" in env.task_prompt(iris, infill=True) and "<FILL_ME>" not in env.task_prompt(iris)
    e = env.CodingEnv(iris, n_envs=2, max_steps=2, sandbox=sandbox, timeout=5)
    bad, good = "    x = 1 / 0\n    return x\n", GOOD[len(env.SIGNATURE):]
    rewards, dones, prompts, infos = e.step([bad, good])
    good_reward = rewards[1]
    assert rewards[0] == -1.0 and dones.tolist() == [0.0, 1.0] and 0.9 < good_reward <= 1.0
    assert "ZeroDivisionError" in prompts[0] and "# " + bad.splitlines()[0] in prompts[0]
    assert prompts[0].endswith(env.SIGNATURE) and prompts[1] == env.task_prompt(iris)
    rewards, dones, prompts, infos = e.step([bad, bad])
    assert dones.tolist() == [1.0, 0.0]  # the step limit (2) ends episode 0; episode 1 is on its first step
    assert prompts[0] == env.task_prompt(iris) and e.env_steps == 4 and e.episodes == 2
    assert e.best_code == GOOD and e.best_reward == good_reward  # failures never count as the best program


def test_the_prompt_tail_shows_a_reflections_error_or_the_tasks_instruction(iris):
    # what train.py prints above each sampled action: the error to fix, not the quoted program or the data's columns
    code = "    model = X()  # Error:\n    return model\n"
    error = "NameError: name 'X' is not defined\nError:\nsecond line"  # its own "Error:" lines are quoted as "# ..."
    for infill in (False, True):
        task = env.prompt_tail(env.task_prompt(iris, infill))
        assert task.startswith("# Write the body of build_model") and "\n" not in task
        assert env.prompt_tail(env.reflection_prompt(iris, code, error, infill)) == (
            "# Error:\n# NameError: name 'X' is not defined\n# Error:\n# second line\n# Write a corrected version.")
    many = "\n".join(f"ValueError {i}" for i in range(20))
    assert env.prompt_tail(env.reflection_prompt(iris, code, many)).splitlines() == (
        ["# Error:"] + [f"# ValueError {i}" for i in range(7)])  # at most 8 lines
    assert env.prompt_tail("another environment's state\nits last line\n") == "its last line"
