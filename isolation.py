"""
What a generated program runs in: the runner, which forks a process per program and split, and that process, with
its limits, its audit hook and, where the kernel has it, Landlock (landlock.py). execution.py says how the pieces fit
(the server keeps the labels and computes the reward; this file never sees a label) and what they protect against;
this is the half that untrusted code touches.
"""

import contextlib
import ctypes
import gc
import json
import os
import pickle
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback

try:
    import resource  # the programs' limits, which only POSIX systems set
except ImportError:  # Windows: one sentence here, where train.py, eval.py and bench.py all arrive (through env.py)
    sys.exit("error: the sandbox forks its programs and sets POSIX process limits, which Windows lacks: run etpo in "
             "WSL 2 (Linux on Windows), or on Linux or macOS")

import numpy as np

import landlock

_libc = ctypes.CDLL(None, use_errno=True)  # the C library: prctl


def _predict(source, x_train, y_train, x_valid, n_classes):
    """The program's class probabilities for one split's validation rows, from build_model on its training rows."""
    namespace = {"__name__": "generated"}
    exec(compile(source, "<generated>", "exec"), namespace)
    if not callable(namespace.get("build_model")):
        raise NameError("the code does not define build_model(x_train, y_train)")
    model = namespace["build_model"](x_train, y_train)
    if model is None:
        raise ValueError("build_model returned None; end the body with `return model`")
    if not hasattr(model, "predict_proba"):
        raise AttributeError(f"{type(model).__name__} has no predict_proba; use a classifier that has it")
    proba = np.asarray(model.predict_proba(x_valid), dtype=float)
    if proba.shape != (len(x_valid), n_classes):  # (the server checks it again: it trusts nothing a program sends)
        raise ValueError(f"predict_proba returned shape {proba.shape}, expected ({len(x_valid)}, {n_classes})")
    return proba


def _error_text(e, source):
    """The error as a model can use it: the failing line of the body (line 1 = its first line), then `Type: message`."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == "<generated>"]
    lineno = e.lineno if isinstance(e, SyntaxError) else frames[-1].lineno if frames else None
    lines = source.splitlines()
    where = f"line {lineno - 1}: {lines[lineno - 1].strip()}\n" if lineno and 0 < lineno <= len(lines) else ""
    message = str(e) if not isinstance(e, SystemExit) else f"the code called sys.exit({e.code!r})"
    if isinstance(e, PermissionError) and "not allowed" not in message:  # the kernel's refusal (Landlock): say why
        message += ("; the sandbox lets the code write only in its working directory, and start no process and use "
                    "no network")
    return (where + f"{type(e).__name__}: {message}")[:1000]


def _under(path, folder):
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _folders(root):
    """(allowed, refused): the folders below which a program may read, and those below an allowed one where it may
    not; the most specific folder decides (a virtual environment inside a refused project folder stays readable)."""
    import sklearn

    real = os.path.realpath
    own = [real(os.path.dirname(os.path.abspath(__file__))), real(os.path.expanduser("~"))]  # the project, home
    folders = {real(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path)
               if p and os.path.isdir(p)}
    allowed = [p for p in folders if not any(_under(a, p) for a in own)]  # not one that holds the project or home
    allowed += [real(p) for p in ("/usr", "/lib", "/lib64", "/etc", "/sys", os.devnull, "/dev/zero", "/dev/random",
                                  "/dev/urandom")]  # (real: macOS's /etc is /private/etc)
    refused = [real(root), real(os.path.join(os.path.dirname(sklearn.__file__), "datasets", "data"))]
    refused += [a for a in own if any(_under(a, p) for p in allowed)]  # a project in /usr/src/app, say
    return allowed, refused


def reader(root):
    """A test of whether a program may read a path: only the Python installation that runs it (its prefixes, and the
    module folders on sys.path but the project's own and those that hold the home folder), the system's libraries
    and settings, its own process's /proc files, and (the hook checks first) its working directory. Not: the
    sandbox's other folders (other programs'), scikit-learn's copies of its toy datasets (breast_cancer, iris, wine
    and digits, whose labels a program could look its validation rows up in), a dataset's CSV file or OpenML cache
    (the project's folder and home, even where the system's folders hold them), or another process's memory and open
    files (/proc/PID/mem and fd/, the server's among them)."""
    allowed, refused = _folders(root)

    def readable(p):  # p: a real path
        parts = p.split(os.sep)  # /proc/PID/...: its own, everything; another's, what `ps` reads
        if p.startswith("/proc/"):
            pid = parts[2]
            return not pid.isdigit() or int(pid) == os.getpid() or (
                len(parts) == 4 and parts[3] in ("stat", "status", "statm", "cmdline", "comm"))
        deciding = max((f for f in allowed + refused if _under(p, f)), key=len, default=None)
        return deciding is not None and deciding not in refused

    return readable


def _guard(scratch, readable):
    """An audit hook (PEP 578) that refuses, from Python code: reading a file that `readable` refuses; file writes,
    deletions and renames outside the scratch directory; using the network (an OpenML download of the dataset holds
    its labels); starting a process (a `pip install` from a program would change the packages of the trainer itself);
    and a signal to a process outside the program's group (the runner, whose death would fail the whole batch)."""
    scratch = os.path.realpath(scratch)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    path_events = {"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.replace", "shutil.rmtree", "os.chmod",
                   "os.chown", "os.link", "os.symlink", "os.truncate", "os.utime", "shutil.move", "shutil.copyfile"}
    process_events = {"os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn",
                      "subprocess.Popen"}  # os.popen, pty.spawn and multiprocessing's pools come through these
    network_events = {"socket.connect", "socket.getaddrinfo", "socket.sendto", "socket.sendmsg"}
    own = {"os.kill": (0, os.getpid(), -os.getpgid(0)), "os.killpg": (0, os.getpgid(0))}  # pids of its own group

    def real(path):
        return None if path is None or isinstance(path, int) else os.path.realpath(os.fsdecode(path))

    def outside(p):
        return p is not None and p != os.devnull and not _under(p, scratch)

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            p = real(path)
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & write_flags)
            if writing and outside(p):
                raise PermissionError(f"writing to {path} is not allowed; write only in the working directory")
            if outside(p) and not readable(p):
                raise PermissionError(f"reading {path} is not allowed: the code gets its data as x_train and y_train")
        elif event in path_events and any(outside(real(a)) for a in args[:2] if isinstance(a, (str, bytes,
                                                                                                   os.PathLike))):
            raise PermissionError(f"{event} outside the working directory is not allowed")
        elif event in process_events:
            raise PermissionError(f"{event} is not allowed: the code may not start another process; fit the model in "
                                  "this one (n_jobs=-1 runs in it)")
        elif event in network_events:
            raise PermissionError(f"{event} is not allowed: the code may not use the network")
        elif event in own and args[0] not in own[event]:
            raise PermissionError(f"{event} of another process is not allowed")

    return hook


def _die_with_parent(parent):
    """Kill this program's process group (it and what it started) when the runner dies mid-batch: the runner alone
    kills its programs' groups, and its own death reaches none of them. The kernel sends SIGUSR2 when the parent
    dies (prctl PR_SET_PDEATHSIG, Linux); elsewhere a program outlives a dead runner up to its CPU-time limit."""
    signal.signal(signal.SIGUSR2, lambda *_: os.killpg(0, signal.SIGKILL))
    try:
        _libc.prctl(1, signal.SIGUSR2)  # 1 = PR_SET_PDEATHSIG
    except AttributeError:  # no prctl: not Linux
        return
    if os.getppid() != parent:  # the runner died before the prctl
        os.killpg(0, signal.SIGKILL)


def _leave_the_network():
    """Move this program process into a network namespace of its own, which holds only a loopback that is down: no
    connection, TCP or UDP, to the internet or to this machine's services, from native code too (the audit hook sees
    Python's sockets only; Landlock refuses TCP alone, from Linux 6.7). An unprivileged process needs a user namespace
    with it (Linux 3.8+), which some systems refuse (Docker's default seccomp profile, Ubuntu 24.04's AppArmor
    default, a sysctl): there the audit hook and Landlock keep the programs off the network, as before."""
    with contextlib.suppress(AttributeError):  # no unshare: not Linux
        _libc.unshare(0x10000000 | 0x40000000)  # CLONE_NEWUSER | CLONE_NEWNET


def keep_private():
    """Make this process, and those it forks, undumpable (prctl PR_SET_DUMPABLE 0, Linux): a process of the same user
    but root can then neither trace it nor open its /proc/PID/mem or fd/, even from native code and without Landlock.
    The server's pipes and memory matter: it unpickles what the runner sends, and it holds the labels."""
    with contextlib.suppress(AttributeError):  # no prctl: not Linux
        _libc.prctl(4, 0, 0, 0, 0)  # 4 = PR_SET_DUMPABLE


def limit_memory(memory_mb):
    """Cap this process's address space at memory_mb, or at a lower cap already set (`ulimit -v` on a cluster, which
    no process may raise); False where the system refuses (macOS answers EINVAL, which Python raises as ValueError,
    and would not enforce the cap either: https://github.com/python/cpython/issues/78783)."""
    try:
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        cap = memory_mb << 20 if hard == resource.RLIM_INFINITY else min(memory_mb << 20, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        return True
    except (ValueError, OSError):
        return False


def _child(job, split_fd, scratch, result_fd, memory_mb, max_output, rules, runner_pid):
    """Runs in the forked child: isolate, limit, read one split (which the server writes into split_fd), predict, write
    the result to result_fd, exit. The result is one JSON line ({"error": text or null, "shape": [rows, classes]})
    and then the probabilities' bytes: nothing the runner or the server unpickles, and no reward (the server's).
    rules: (reader's test, landlock.kernel_rules' ruleset or None)."""
    proba, error = None, None
    readable, kernel = rules
    try:
        os.setsid()  # own session and process group: the runner kills the whole group
        _die_with_parent(runner_pid)  # and if the runner dies, the group kills itself
        _leave_the_network()
        os.chdir(scratch)
        out = os.open("output.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        if kernel:
            landlock.confine(kernel, scratch)  # from here on, the kernel's rules hold
        with open(split_fd, "rb") as f:
            x_train, y_train, x_valid, n_classes = pickle.load(f)  # this split's, and no validation label
        os.closerange(3, result_fd)  # the pipes to the server and to the other programs: none is the program's
        os.closerange(result_fd + 1, os.sysconf("SC_OPEN_MAX"))
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the file limit raises instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_output, max_output))
        limit_memory(memory_mb)  # (where refused, the server warned once at its start)
        cpu = int(job["timeout"]) + 2
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 2))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.environ.update(TMPDIR=scratch, HOME=scratch)
        tempfile.tempdir = scratch
        random.seed(0)
        np.random.seed(0)  # models without random_state become deterministic, so rewards can be cached
        sys.addaudithook(_guard(scratch, readable))
        proba = _predict(job["source"], x_train, y_train, x_valid, n_classes)
    except BaseException as e:  # SystemExit and KeyboardInterrupt included: the program must not end the child
        proba, error = None, _error_text(e, job["source"])
    try:  # (the runner may be gone, and the pipe with it)
        head = json.dumps({"error": error, "shape": None if proba is None else list(proba.shape)}) + "\n"
        data = memoryview(head.encode() + (b"" if proba is None else proba.astype("<f8").tobytes()))
        while data:
            data = data[os.write(result_fd, data):]
    finally:
        os._exit(0)  # whatever happened: a forked child never returns into the runner's code


def _finish(status, killed, raw, scratch):
    """(error, probabilities) of one split from the child's exit status and what it wrote; killed: why the runner
    killed it, or None. A program can write anything into its pipe: at most, probabilities of its own making."""
    head, _, data = bytes(raw).partition(b"\n")
    proba = None
    try:
        result = json.loads(head)
        error = result["error"]
        if error is None:
            proba = np.frombuffer(data, dtype="<f8").reshape([int(n) for n in result["shape"]])
        else:
            error = str(error)[:1000]
    except (ValueError, IndexError, KeyError, TypeError):
        error = None
        if killed:
            error = killed
        elif os.WIFSIGNALED(status):
            sig = signal.Signals(os.WTERMSIG(status))
            why = {signal.SIGXCPU: " (CPU time limit)", signal.SIGSEGV: " (a crash in native code)"}.get(sig, "")
            error = f"the process was killed by {sig.name}{why}"
        else:
            error = f"the process exited with code {os.WEXITSTATUS(status)} before build_model returned"
    if error is not None:
        try:
            with open(os.path.join(scratch, "output.txt"), "rb") as f:
                f.seek(max(0, os.path.getsize(f.name) - 400))
                tail = f.read().decode(errors="replace").strip()
            if tail and "Traceback" not in tail:
                error += "\nOutput (last lines):\n" + tail
        except OSError:
            pass
    return error, proba


def _run_jobs(jobs, workers, memory_mb, disk_mb, server, ask, rules, max_output=4 << 20):
    """Run each job's splits one after another, each in a child of its own (a program keeps nothing from one split to
    the next, where the rows it is scored on were training rows), up to `workers` children at a time; stop a job at
    its first error. Kill each process group at exit, at the job's timeout (its splits' time together), or when its
    files take more than disk_mb of the disk (the file-size limit caps each file, not their number); never wait on
    EOF. A child reads its split from a pipe whose other end goes to the server through the socket `ask`: the runner
    never reads one. [(error, [probabilities per split])]; None if the server (pid `server`) died meanwhile: the
    programs still running are killed, not waited for."""
    pending, running = [(i, 0) for i in range(len(jobs))], {}
    started, probas, results, listening = {}, [[] for _ in jobs], [None] * len(jobs), set()
    next_disk_check = 0.0
    while pending or running:
        while pending and len(running) < workers:
            i, s = pending.pop(0)
            started.setdefault(i, time.monotonic())
            pid, r, scratch = _fork_program(jobs, i, s, ask, memory_mb, max_output, rules)
            running[pid] = (i, s, r, scratch, bytearray())
            listening.add(r)
        orphaned = os.getppid() != server  # the server died (and the trainer, whose death ends it, perhaps)
        check_disk = time.monotonic() >= next_disk_check  # every 0.25 s: a walk of each program's scratch folder
        if check_disk:
            next_disk_check = time.monotonic() + 0.25
        for pid, (i, s, r, scratch, buf) in list(running.items()):
            job = jobs[i]
            if _drain(r, buf, job["result_bytes"]):
                listening.discard(r)
            done_pid, status = os.waitpid(pid, os.WNOHANG)
            killed = None
            if not done_pid and time.monotonic() - started[i] > job["timeout"]:
                killed = f"TimeoutError: the code ran longer than {job['timeout']} seconds"
            elif not done_pid and check_disk and _disk_use(scratch) > disk_mb << 20:
                killed = f"OSError: the code wrote more than {disk_mb} MB of files; write less, or nothing"
            if not done_pid and not killed and not orphaned:
                continue
            for kill in (os.killpg, os.kill):  # the group: children the program left running die with it
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            if not done_pid:
                _, status = os.waitpid(pid, 0)
            _drain(r, buf, job["result_bytes"])
            listening.discard(r)
            os.close(r)
            error, proba = _finish(status, killed, buf, scratch)
            remove(scratch)
            del running[pid]
            _kill_strays(running)
            probas[i].append(proba)
            if error is not None or s + 1 == job["splits"]:
                results[i] = (error, probas[i] if error is None else [])
            else:  # its next split takes the slot at once: its time runs on
                pending.insert(0, (i, s + 1))
        if orphaned:
            _kill_strays({})
            return None
        if not (pending and len(running) < workers):  # (a job's next split starts at once)
            select.select(list(listening), [], [], 0.005)  # until a program's pipe ends (it exited), or 5 ms
    return results


def _kill_strays(running):
    """Kill and reap each child of the runner outside its running programs' process groups (each program leads its
    own): a process a program started that left its group (setsid, from native code), which the runner, a child
    subreaper, inherits when the program ends; again until none is left (each may leave its children to the runner)."""
    while True:
        children = set()
        for task in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []:  # (no /proc: none)
            with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/children") as f:  # (a thread that ended)
                children.update(int(pid) for pid in f.read().split())
        strays = []
        for pid in children - set(running):
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(pid) not in running:
                    strays.append(pid)
        if not strays:
            return
        for pid in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _fork_program(jobs, i, s, ask, memory_mb, max_output, rules):
    """Fork the process of job i's split s, in a new scratch folder, and ask the server, through the socket `ask`, to
    write that split into the pipe it reads: (its pid, the pipe its result comes back through, the folder)."""
    runner_pid, scratch = os.getpid(), tempfile.mkdtemp(prefix="etpo-run-")
    (r, w), (split_r, split_w) = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.close(split_w)
        _child(jobs[i], split_r, scratch, w, memory_mb, max_output, rules, runner_pid)
    os.close(w)
    os.close(split_r)
    socket.send_fds(ask, [f"{i} {s}".encode()], [split_w])
    os.close(split_w)
    os.set_blocking(r, False)
    return pid, r, scratch


def _disk_use(folder):
    """Bytes of the disk that the files below folder take: a file's blocks, and at least one block an entry. A list of
    folders to visit, not os.walk, which before Python 3.12 recursed once per level: a program that makes 1,000
    nested folders (os.mkdir and os.chdir in a loop) would end the runner with a RecursionError."""
    total, folders = 0, [folder]
    while folders:
        try:
            entries = list(os.scandir(folders.pop()))
        except OSError:  # removed meanwhile, or a path longer than the system allows: not counted
            continue
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                total += max(entry.stat(follow_symlinks=False).st_blocks * 512, 4096)
    return total


def remove(folder):
    """shutil.rmtree(folder), whatever a program left in it: before Python 3.13 rmtree recursed once per level of
    folders, and a RecursionError in the runner or the trainer would end it, so a tree that deep goes to rm -rf."""
    try:
        shutil.rmtree(folder, ignore_errors=True)
    except RecursionError:
        subprocess.run(["rm", "-rf", folder], check=False)


def _drain(fd, buf, limit):
    """Read what the pipe holds into buf, up to limit bytes; True once it has ended (or buf holds limit bytes)."""
    while len(buf) < limit:
        try:
            chunk = os.read(fd, min(1 << 20, limit - len(buf)))
        except BlockingIOError:
            return False
        if not chunk:
            return True
        buf.extend(chunk)
    return True


def runner(inp, out, ask, server, root):
    """The runner: forked by the server before any dataset arrived, so that it, and every program it forks, has never
    held a label. It takes batches of jobs from the server and sends back each program's probabilities. root: the
    sandbox's folder, which holds the programs' scratch folders."""
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # and the trainer's pipes are not the runner's
    os.dup2(2, 1)
    if os.path.exists(f"/proc/self/task/{os.getpid()}/children"):  # where _kill_strays can list the runner's children
        _libc.prctl(36, 1, 0, 0, 0)  # 36 = PR_SET_CHILD_SUBREAPER (Linux 3.4+): a program's orphans become the runner's
    _warm_up()
    rules = reader(root), landlock.kernel_rules(*_folders(root), root)
    if rules[1] is None and sys.platform == "linux":  # (on stderr, which is the trainer's)
        print("warning: this kernel does not confine the generated programs with Landlock (it needs Linux 5.13 or "
              "later, with Landlock on): Python's audit hook alone does, which a program's native code (ctypes) can "
              "get around", file=sys.stderr, flush=True)
    try:
        while True:
            request = recv(inp)
            if request is None:  # the server ended
                return
            results = _run_jobs(request["jobs"], request["workers"], request["memory_mb"], request["disk_mb"], server,
                                ask, rules)
            if results is None:
                return
            send(out, results)
    except (BrokenPipeError, EOFError):
        pass
    finally:
        os._exit(0)


def _warm_up():
    """Fit a few common models on made-up rows, so that what scikit-learn and its libraries set up on a first fit is
    set up once, here, and not again in every program process; then gc.freeze(), so that the programs' garbage
    collections do not copy the runner's memory page by page. A fork that fits a logistic regression or a small
    random forest on 60 rows and exits then takes ~25 ms where it took ~40-50 (BENCHMARKS.md, 2 CPU cores)."""
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.tree import DecisionTreeClassifier

    x, y = np.arange(40.0).reshape(20, 2) % 7, np.arange(20) % 2
    for model in (LogisticRegression(), RandomForestClassifier(n_estimators=2, random_state=0),
                  GradientBoostingClassifier(n_estimators=2, random_state=0), KNeighborsClassifier(),
                  DecisionTreeClassifier(random_state=0)):
        with contextlib.suppress(Exception):  # (a release that fails here costs the programs time, nothing more)
            model.fit(x, y).predict_proba(x)
    gc.collect()
    gc.freeze()


def send(f, obj):
    data = pickle.dumps(obj)
    f.write(struct.pack("<Q", len(data)) + data)
    f.flush()


def recv(f):
    head = f.read(8)
    if len(head) < 8:
        return None
    return pickle.loads(f.read(struct.unpack("<Q", head)[0]))
