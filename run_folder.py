"""
The folder a training run writes (train.py --out): its lock, its files written whole or not at all, the checkpoint,
the logs a resume trims back to it, the stop signals, and the one sentence a run ends with when something goes wrong.

Paper: Wen et al., "Entropy-Regularized Token-Level Policy Optimization for Language Agent Reinforcement",
arXiv 2402.06700. None of this is in the paper: it is what lets a run of hours be stopped, crash or fill its disk and
still continue exactly (README, "Stopping and resuming"). train.py is its one user; the algorithm never sees it.

Departures from the paper: none here.
"""

import contextlib
import json
import os
import shutil
import signal
import sys

import torch

import execution


class RunFolder:
    """OUT/ckpt.pt, OUT/metrics.jsonl, OUT/actions.jsonl, OUT/best_code.py and OUT/.lock of one run."""

    def __init__(self, path):
        self.path = path
        self.ckpt_path = os.path.join(path, "ckpt.pt")
        self.made = not os.path.exists(path)  # fail() removes the folder this run makes if nothing was written into it
        self.stop_requested = False  # by the first stop signal (stop_on_signals): the loop saves and ends
        self.lock_file = None  # OUT/.lock, open and locked while the run lives (lock)

    def fail(self, message, at_once=False):
        """End the run with one sentence on stderr and exit status 1, no traceback."""
        if self.made and os.path.isdir(self.path) and os.listdir(self.path) == [".lock"]:
            shutil.rmtree(self.path, ignore_errors=True)
        if at_once:  # from a signal handler: an exception raised there can land in a __del__ or a library's bare
            # except, which swallows it and the run goes on, so the process ends here (the run's files are whole)
            with contextlib.suppress(Exception):  # (the signal may have cut a print short)
                sys.stdout.flush()
            os.write(sys.stderr.fileno(), f"error: {message}\n".encode())
            os._exit(1)
        sys.exit(f"error: {message}")

    def resume_command(self):
        """How to continue from the checkpoint on disk, for the sentence that ends a run ("" if there is none yet)."""
        return f"--resume --out {self.path}" if os.path.exists(self.ckpt_path) else ""

    def could_not_write(self, path, e):  # a full disk, say: one sentence, and the checkpoint on disk stays whole
        resume = self.resume_command()
        reason = str(e).partition("\n")[0][:100]
        self.fail(f"could not write {path} ({reason}): free some space, then "
                  + (f"continue from the last checkpoint with {resume}" if resume else "start again"))

    def replace_file(self, name, save):
        """Write the file OUT/NAME whole or not at all: save(f) writes PATH.tmp, which then replaces PATH (an atomic
        rename), so a crash or a full disk never leaves half a checkpoint, of best_code.py, or of the log files that
        a resume rewrites. The bytes reach the disk before the rename: after a power cut or a node's crash PATH is
        the old file or the new one, where a rename can otherwise reach the disk first and leave PATH empty."""
        path = os.path.join(self.path, name)
        try:
            with open(path + ".tmp", "wb") as f:
                save(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(path + ".tmp", path)
        except (OSError, RuntimeError) as e:  # torch.save raises RuntimeError when a write fails
            self.could_not_write(path, e)
        finally:  # whatever cut the write short (a second Ctrl-C, too): no half file is left beside PATH
            with contextlib.suppress(OSError):
                os.remove(path + ".tmp")

    def append_line(self, name, line):
        path = os.path.join(self.path, name)
        try:
            with open(path, "a") as f:  # closed at once: a failed write leaves no buffer to fail again at exit
                f.write(line + "\n")
        except OSError as e:
            self.could_not_write(path, e)

    def checkpoint(self, resume):
        """The checkpoint to continue from (--resume), or None for a new run, which may not write over one. Said
        before the model loads, which takes minutes for a 7B model."""
        if not resume:
            if os.path.exists(self.ckpt_path):
                self.fail(f"{self.path} already holds a run; continue it with --resume, or pass another --out")
            return None
        try:
            checkpoint = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
            if "config" not in checkpoint:  # a file of torch.save's, but not a checkpoint of train.py's
                raise KeyError("config")
        except Exception as e:  # any unreadable file (missing, truncated, not a checkpoint) gets the same answer
            self.fail(f"could not read the checkpoint {self.ckpt_path} ({type(e).__name__}); pass the --out of a run "
                      "that train.py wrote, or start without --resume")
        return checkpoint

    def save_checkpoint(self, state):
        self.replace_file("ckpt.pt", lambda f: torch.save(state, f))

    def lock(self):
        """Create the folder and hold a lock on OUT/.lock while this process lives: two runs never share a folder."""
        try:
            os.makedirs(self.path, exist_ok=True)
            self.lock_file = open(os.path.join(self.path, ".lock"), "w")
        except OSError as e:
            self.fail(f"cannot create the run folder {self.path} ({e.strerror}): pass another --out")
        try:
            import fcntl  # here, not above: Windows lacks it, and `import env` has already ended a run there
            fcntl.flock(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fail(f"another train.py is writing to {self.path}: wait for it to end, or pass another --out")
        except OSError as e:  # a file system without locks (Lustre mounted without -o flock, some NFS): it runs on
            print(f"warning: {self.path} cannot be locked ({e.strerror}); start no second run into it while this "
                  "one runs")

    def start_logs(self, names, start_it):
        """Start the JSON-lines logs OUT/NAME, one object with its "it" per line: empty for a new run (start_it 0);
        on resume, the lines of the iterations the checkpoint contains, without any logged after it, and without a
        last line cut short (a crash, a full disk)."""
        for name in names:
            path, kept = os.path.join(self.path, name), []
            if start_it and os.path.exists(path):
                kept = [line for line in open(path) if line.endswith("\n") and json.loads(line)["it"] < start_it]
            self.replace_file(name, lambda f: f.write("".join(kept).encode()))

    def stop_on_signals(self):
        """From here on, the first of execution.STOP_SIGNALS (Ctrl-C, SIGTERM, SIGUSR1) sets stop_requested: the
        loop finishes its iteration, saves and exits; a second one quits at once. The sandbox ignores them, so the
        programs in flight are not cut short."""
        def on_stop(signum, frame):
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            if self.stop_requested:
                resume = self.resume_command()
                self.fail(f"stopped by a second {name}, without saving this iteration"
                          + (f"; continue from the last checkpoint with {resume}" if resume else ""))
            self.stop_requested = True
            print(f"\n{name}: finishing this iteration, then saving the checkpoint (a second {name} quits without "
                  "saving)")

        for sig in execution.STOP_SIGNALS:
            signal.signal(sig, on_stop)
