"""
Run untrusted code: each program in processes of its own, with limits; its ROC AUC is the reward.

Paper: Wen et al., "Entropy-Regularized Token-Level Policy Optimization for Language Agent Reinforcement",
arXiv 2402.06700, section 5.1; ../shared/ETPO.md section 1. env.py defines the MDP; this file runs its actions.
A program defines `build_model(x_train, y_train)`; its reward is the mean ROC AUC over 5 random 50/50 splits
(seed i for split i; binary: probability of the positive class; multi-class: one-vs-one macro), or -1 and the
error, as a model can use it, when it fails.

Generated code is untrusted, and the reward is what training maximizes, so no program may be able to raise its own.
Three processes share the work. The server (this file; started by the trainer, since torch and OpenMP state do not
survive a fork of the trainer) imports scikit-learn, forks the runner, then keeps the datasets and their splits. The
runner (isolation.py), forked before any dataset arrived, never holds a label; it forks a process per program and split
(which starts, fits a small model and exits in ~25 ms: scikit-learn is imported already, where a fresh interpreter takes
~0.8 s to start). That process gets its split's x_train, y_train and x_valid from a pipe the server writes, runs
build_model and predict_proba, and writes the probabilities back; the server checks them and computes the AUC with the
y_valid it kept. So a program cannot see a label of a row it is scored on (not in its callers' frames, not among its
objects, not from an earlier split, in which its validation rows were training rows: each split starts afresh), and what
it writes into its pipe is at most probabilities of its own making.

Each program process gets: a new session and process group (killed as a whole when it ends or times out, children
included, and when the runner dies: Linux's PR_SET_PDEATHSIG; a process it started that left the group, by setsid from
native code, comes to the runner once the program ends, which kills it: a child subreaper), a wall-clock timeout (for
its splits together), a CPU-time limit, an address-space (memory) limit (where the system allows one: macOS refuses it,
and the server says so when it starts), a 4 MB limit on each file it writes and 256 MB on all of them (the runner
measures its scratch folder every 0.25 s), a scratch working directory (also TMPDIR and HOME) that is deleted
afterwards, stdout/stderr captured to a file and truncated, no open file but those, a network namespace of its own with
nothing in it (no TCP or UDP, from native code either; where the system lets an unprivileged process create one with a
user namespace: not under Docker's default seccomp profile nor Ubuntu 24.04's AppArmor default), one BLAS/OpenMP thread
and no joblib worker process (`n_jobs=-1`, or an explicit `n_jobs=4`, runs in the program's own process, one task after
another), fixed random seeds and string hashes (so a set prints in the same order in every run: scikit-learn's errors
print sets, and an error becomes the next prompt), and a Python audit hook that refuses: files written, created, deleted
or renamed outside the scratch directory and /dev/null (/dev/shm too, whose files would outlive the program in the
machine's memory); files read outside the Python installation and the system's libraries (a dataset's CSV file or OpenML
cache, and scikit-learn's own copies of its toy datasets, hold the labels; isolation.reader lists what a program may
read); another process's memory and open files (/proc/PID/mem and fd/); the network (OpenML serves every dataset);
starting another process (a program's `pip install` would change the trainer's own packages); and signalling a process
outside the program's group (the runner: its death would fail the whole batch). Where the kernel has Landlock (Linux
5.13+, turned on), the kernel keeps the same rules, which native code (ctypes, and multiprocessing's spawn and
forkserver start methods, which start their processes from C) gets around in the audit hook: each program process reads
only the Python installation and the system's folders (not scikit-learn's toy datasets, the project's folder or home),
writes only in its scratch folder, executes no file, and neither traces nor reads the memory and open files of a process
outside its own, nor (from Linux 6.7) makes a TCP connection, nor (from 6.12) signals such a process (landlock.py). The
trainer talks to the server through a pipe with a deadline and restarts it if it dies (or the runner does); a server
whose trainer dies kills the runner, whose programs then die, removes their folders and exits at once. All three and the
programs ignore SIGTERM, SIGINT and SIGUSR1, which the trainer answers by finishing its iteration (a cluster stopping a
job signals every process in it). What remains open to native code, even under Landlock: UDP where the system refuses
the network namespace (and TCP there too before Linux 6.7), leaving the process group with setsid when the runner itself
dies mid-batch (a process that then outlives the program, up to its CPU-time limit), reading the other programs' scratch
folders (which hold no label), and on kernels before Linux 6.2 (Landlock ABI 1 and 2) truncating a file outside its
folder by its path (landlock.py lists what each ABI leaves); without Landlock, as root, also reading the server's memory
and writing into the runner's pipes, whose messages the server unpickles (for any other user the server and the runner
are undumpable: isolation.keep_private). Run untrusted models in a container or VM if that matters to you.

Departures from the paper: none here; env.py lists the environment's (held-out rows, imputed missing values).
"""

import contextlib
import hashlib
import importlib.metadata
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref

import numpy as np

import isolation  # (first: on Windows it ends the import with one sentence)
import landlock


MEMORY_MB = 4096  # each program's address-space cap, by default (Sandbox's memory_mb)
DISK_MB = 256  # and what its files in the scratch folder may take of the disk (Sandbox's disk_mb)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # Ctrl-C, a cluster stopping the job, Slurm's warning
# before it does (sbatch --signal=B:USR1@600): train.py finishes its iteration on each, and the sandbox ignores them


def _rules():
    """What a program's score depends on besides its code, the data, its limits and its seeds: the rules in this file,
    isolation.py and landlock.py, and the libraries the programs run with, as a short hash. It is part of the reward
    cache's key, so that a run resumed after any of them changed scores its programs again instead of reusing rewards
    cached under the old ones."""
    parts = []
    for path in (__file__, isolation.__file__, landlock.__file__):
        with open(path, "rb") as f:
            parts.append(f.read())
    parts += [importlib.metadata.version(name).encode() for name in ("scikit-learn", "numpy")]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


RULES = _rules()


# ----------------------------------------------------------------------------------------------------------------
# The server: the datasets, the splits and the rewards


def _splits(data, heldout):
    """[(x_train, y_train, x_valid, y_valid)]: 5 random 50/50 splits (seed i), or the held-out rows."""
    from sklearn.model_selection import train_test_split

    X, y, X_test, y_test = data
    if heldout:
        return [(X, y, X_test, y_test)]
    stratify = y if np.bincount(y).min() >= 2 else None
    return [(x_tr, y_tr, x_va, y_va) for x_tr, x_va, y_tr, y_va in
            (train_test_split(X, y, test_size=0.5, random_state=i, stratify=stratify) for i in range(5))]


def _auc(proba, y_valid, n_classes):
    """ROC AUC of probabilities that a program sent: binary, of the positive class; multi-class, one-vs-one macro."""
    from sklearn.metrics import roc_auc_score

    if proba.shape != (len(y_valid), n_classes):
        raise ValueError(f"predict_proba returned shape {proba.shape}, expected ({len(y_valid)}, {n_classes})")
    if not np.isfinite(proba).all():
        raise ValueError("predict_proba returned NaN or infinite values; it must return finite probabilities")
    if n_classes == 2:
        return roc_auc_score(y_valid, proba[:, 1])
    proba = proba / proba.sum(1, keepdims=True)
    return roc_auc_score(y_valid, proba, multi_class="ovo", average="macro", labels=list(range(n_classes)))


def _reward(outcome, splits, n_classes):
    """(reward, error) of one program: its mean ROC AUC over the splits, computed here, where the labels are."""
    error, probas = outcome
    if error is not None:
        return -1.0, error
    try:
        return float(np.mean([_auc(p, y_va, n_classes) for p, (*_, y_va) in zip(probas, splits)])), None
    except ValueError as e:  # (roc_auc_score's, on probabilities it cannot rank: a row of zeros, say)
        return -1.0, f"ValueError: {e}"[:1000]


def _serve(root):
    """The server: import scikit-learn once, fork the runner, then answer requests (length-prefixed pickles) from the
    trainer: it keeps the datasets, writes each split's training rows and validation rows (not their labels) into the
    pipe of the program process that asks for them, and computes each program's reward from the probabilities it sends
    back. When the trainer dies (killed by the system's out-of-memory killer, or by a cluster after its SIGTERM), the
    server kills the runner (whose programs then die), removes the scratch folder `root` and exits, without a
    traceback in the run's log."""
    import sklearn.ensemble, sklearn.linear_model, sklearn.metrics, sklearn.model_selection  # noqa: E401,F401
    import sklearn.neighbors, sklearn.pipeline, sklearn.preprocessing, sklearn.svm, sklearn.tree  # noqa: E401,F401

    sys.dont_write_bytecode = True
    isolation.keep_private()  # (the runner and the programs inherit it)
    probe = os.fork()  # a child tries a memory limit, so that the server itself stays unlimited
    if probe == 0:
        os._exit(0 if isolation.limit_memory(MEMORY_MB) else 1)
    if os.waitpid(probe, 0)[1] != 0:  # (on stderr, which is the trainer's)
        print("warning: this system refuses a memory limit for the generated programs (setrlimit RLIMIT_AS; macOS "
              "does): a program that allocates too much memory can slow the whole machine; the time limits still "
              "hold", file=sys.stderr, flush=True)
    # A cluster that stops a job signals every process in it. The trainer then finishes its iteration and ends this
    # server itself (its stdin closes, or Sandbox.close kills the group), so the server and the processes it forks
    # (they inherit this) ignore the signal: a program cut short would score -1, and that score would be cached.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write into the reply pipe
    trainer = os.getppid()
    runner, to_runner, from_runner, asks = _fork_runner(root)
    datasets, splits = {}, {}  # key: (X, y, X_test, y_test); (key, heldout): (each split's pickle, splits, classes)
    try:
        while True:
            request = isolation.recv(inp)
            if request is None:  # the trainer closed the pipe: it ended, or died between batches
                return
            datasets.update(request["datasets"])
            jobs = request["jobs"]
            for job in jobs:
                where = (job["dataset"], job["heldout"])
                if where not in splits:
                    splits[where] = _pickle_splits(datasets[job["dataset"]], job["heldout"])
                _, parts, n_classes = splits[where]
                rows = max(len(x_va) for _, _, x_va, _ in parts)
                job.update(splits=len(parts), result_bytes=4096 + 8 * rows * n_classes)
            isolation.send(to_runner, {k: request[k] for k in ("jobs", "workers", "memory_mb", "disk_mb")})
            if not _feed(jobs, splits, asks, from_runner, trainer):  # the trainer died mid-batch
                return
            outcomes = isolation.recv(from_runner)
            if outcomes is None:  # the runner died (killed by the system, or by a program's native code)
                return
            results = []
            for outcome, job in zip(outcomes, jobs):
                _, parts, n_classes = splits[job["dataset"], job["heldout"]]
                results.append(_reward(outcome, parts, n_classes))
            isolation.send(out, results)
    except (BrokenPipeError, EOFError, pickle.UnpicklingError):  # the trainer or the runner died mid-message
        pass
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(runner, signal.SIGKILL)  # its programs die with it
        os.waitpid(runner, 0)
        isolation.remove(root)


def _fork_runner(root):
    """Fork the runner, before any dataset arrives: (its pid, the pipe that takes it jobs, the pipe its results come
    back through, the socket through which it asks for a program process's split)."""
    server = os.getpid()
    (jobs_r, jobs_w), (results_r, results_w) = os.pipe(), os.pipe()
    asks, ask = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    runner = os.fork()
    if runner == 0:
        os.close(jobs_w)
        os.close(results_r)
        asks.close()
        isolation.runner(os.fdopen(jobs_r, "rb"), os.fdopen(results_w, "wb"), ask, server, root)
    os.close(jobs_r)
    os.close(results_w)
    ask.close()
    return runner, os.fdopen(jobs_w, "wb"), os.fdopen(results_r, "rb"), asks


def _feed(jobs, splits, asks, results, trainer):
    """Write each program process's split into the pipe the runner sends with its ask ("job i, split s"), until the
    batch's results arrive (True), or the trainer dies (False)."""
    while True:
        ready = select.select([asks, results], [], [], 0.1)[0]
        if asks in ready:  # (first: the runner asked for every split before it sent the results)
            message, fds, _, _ = socket.recv_fds(asks, 64, 1)
            i, s = map(int, message.split())
            with contextlib.suppress(BrokenPipeError), open(fds[0], "wb") as f:  # (a process that died first)
                f.write(splits[jobs[i]["dataset"], jobs[i]["heldout"]][0][s])
        elif ready:
            return True
        elif os.getppid() != trainer:
            return False


def _pickle_splits(data, heldout):
    """([what a program process gets of each split], splits, classes): x_train, y_train and x_valid, no y_valid."""
    parts, n_classes = _splits(data, heldout), int(max(data[1].max(), data[3].max())) + 1
    return [pickle.dumps((x_tr, y_tr, x_va, n_classes)) for x_tr, y_tr, x_va, _ in parts], parts, n_classes


# ----------------------------------------------------------------------------------------------------------------
# The trainer's side: a sandbox with a reward cache


SERVER_FAILED = "the sandbox stopped responding while running this batch"


class SandboxError(RuntimeError):
    """The sandbox itself, not a program, failed: its server cannot start (a full temporary folder, say)."""


def usable_cores():
    """The cores this process may run on: a cluster's job (Slurm, say) gets a few cores of a large machine, and
    os.cpu_count() counts the machine's; a program per core of those would share the job's few and could run past
    its time limit, scored -1 (and cached) for the crowding."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Sandbox:
    """Runs programs in the server's worker pool; caches rewards by a hash of code, dataset, limits, seeds and RULES."""

    def __init__(self, workers=None, memory_mb=MEMORY_MB, disk_mb=DISK_MB):
        self.workers, self.memory_mb, self.disk_mb = workers or usable_cores(), memory_mb, disk_mb
        self.proc, self.root, self.sent, self.cache = None, None, set(), {}

    def _start(self):
        fixed = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        # and no joblib worker processes: n_jobs=-1 (a common idiom in scikit-learn code) would start a worker process
        # per core in every program, a process per core per core in all (1,024 on a 32-core machine, ~0.1 GB each).
        # With this, joblib runs every n_jobs (-1, 4, ...) in the program's own thread, one task after another
        fixed["JOBLIB_MULTIPROCESSING"] = "0"
        fixed["PYTHONHASHSEED"] = "0"  # the server's, and so its forked children's, set order: the same every run
        # if either step below fails, no program runs: that is no program's score, so it is a SandboxError
        try:
            self.root = tempfile.mkdtemp(prefix="etpo-sandbox-")  # the programs' scratch folders: close() removes
        except OSError as e:  # them all, even those of a batch that a dying server could not clean up
            raise SandboxError(f"the sandbox could not start ({e.strerror or e}): free some space in "
                               f"{tempfile.gettempdir()}, or point TMPDIR at a folder that has some") from None
        fixed["TMPDIR"] = self.root
        weakref.finalize(self, isolation.remove, self.root)  # and so does the exit, if close() is never called
        try:
            self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", self.root],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, **fixed},
                                         start_new_session=True)
        except OSError as e:  # no process left to fork, or no memory for one: free space would not help
            raise SandboxError(f"the sandbox could not start its server process ({e.strerror or e})") from None
        self.sent = set()

    def run(self, sources, dataset, heldout=False, timeout=60.0):
        """[(reward, error)] for each source, which defines build_model(x_train, y_train)."""
        limits = f"{timeout}\0{self.memory_mb}\0{self.disk_mb}\0{RULES}"
        keys = [hashlib.sha256(f"{s}\0{dataset.key}\0{heldout}\0{limits}\0seeds=0-4".encode()).hexdigest()
                for s in sources]
        todo = sorted({k: s for k, s in zip(keys, sources) if k not in self.cache}.items())
        fresh = {}
        if todo:
            jobs = [{"source": s, "dataset": dataset.key, "heldout": heldout, "timeout": timeout} for _, s in todo]
            fresh = dict(zip((k for k, _ in todo), self._request(jobs, dataset, timeout)))
            # a batch the server did not finish is no program's score: those run again next time
            self.cache.update({k: result for k, result in fresh.items() if result[1] != SERVER_FAILED})
        return [fresh[k] if k in fresh else self.cache[k] for k in keys]

    def _request(self, jobs, dataset, timeout):
        if self.proc is None or self.proc.poll() is not None:
            self.close()  # a server that died between batches: its scratch folders go too
            self._start()
        new = {} if dataset.key in self.sent else {dataset.key: (dataset.X, dataset.y, dataset.X_test, dataset.y_test)}
        deadline = time.monotonic() + 30 + (len(jobs) // self.workers + 1) * (timeout + 5)
        try:
            request = {"datasets": new, "jobs": jobs, "workers": self.workers, "memory_mb": self.memory_mb,
                       "disk_mb": self.disk_mb}
            isolation.send(self.proc.stdin, request)
            self.sent.add(dataset.key)
            while time.monotonic() < deadline:
                if select.select([self.proc.stdout], [], [], 1.0)[0]:
                    results = isolation.recv(self.proc.stdout)
                    if results is not None:
                        return results
                    break
        except (BrokenPipeError, OSError, EOFError, pickle.UnpicklingError):
            pass
        self.close()  # the server died or stalled: every program of this batch fails, the next batch restarts it
        return [(-1.0, SERVER_FAILED)] * len(jobs)

    def close(self):
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
            self.proc = None
            isolation.remove(self.root)


_SANDBOX = None


def execute(source, dataset, timeout=60.0, heldout=False):
    """(reward, error) of one program that defines build_model(x_train, y_train); error is None when it ran."""
    global _SANDBOX
    _SANDBOX = _SANDBOX or Sandbox()
    return _SANDBOX.run([source], dataset, heldout=heldout, timeout=timeout)[0]


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    _serve(sys.argv[2])
