"""
run_folder.py in the test's own process: a file is replaced whole or not at all, a resume keeps the log lines of the
iterations its checkpoint holds, a checkpoint is read or refused in one sentence, a run that fails removes the folder
it made only while nothing is in it, two runs never share a folder, and the first stop signal asks the loop to stop.
tests/test_train.py runs the same paths through train.py (a full disk, Ctrl-C, a folder without locks).

Run: python -m pytest tests/test_run_folder.py -q
"""

import json
import os
import signal

import pytest
import torch

import run_folder


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    folder = run_folder.RunFolder(str(tmp_path))
    folder.replace_file("best_code.py", lambda f: f.write(b"old"))

    def cut_short(f):  # a full disk after the first bytes
        f.write(b"new, half of")
        raise OSError(28, "No space left on device")

    with pytest.raises(SystemExit) as e:
        folder.replace_file("best_code.py", cut_short)
    path = os.path.join(str(tmp_path), "best_code.py")
    assert str(e.value) == (f"error: could not write {path} ([Errno 28] No space left on device): free some space, "
                            "then start again")
    assert open(path).read() == "old" and os.listdir(str(tmp_path)) == ["best_code.py"]  # no .tmp beside it
    folder.save_checkpoint({"config": {}, "it": 1})
    with pytest.raises(SystemExit) as e:
        folder.replace_file("best_code.py", cut_short)
    assert str(e.value).endswith(f"then continue from the last checkpoint with --resume --out {tmp_path}")


def test_a_resume_keeps_the_lines_of_the_iterations_its_checkpoint_holds(tmp_path):
    folder = run_folder.RunFolder(str(tmp_path))
    lines = [json.dumps({"it": it, "row": row}) + "\n" for it in range(4) for row in range(2)]
    with open(tmp_path / "actions.jsonl", "w") as f:
        f.write("".join(lines) + '{"it": 4, "ro')  # iterations 0-3 whole, the 5th cut short by a crash
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write("".join(lines[::2]))
    folder.start_logs(["actions.jsonl", "metrics.jsonl"], start_it=3)  # the checkpoint holds iterations 0, 1, 2
    assert open(tmp_path / "actions.jsonl").read() == "".join(lines[:6])
    assert open(tmp_path / "metrics.jsonl").read() == "".join(lines[:6:2])
    folder.start_logs(["actions.jsonl"], start_it=0)  # a new run starts them empty
    assert open(tmp_path / "actions.jsonl").read() == ""


def test_a_checkpoint_is_read_or_refused_in_one_sentence(tmp_path):
    out = str(tmp_path / "run")
    folder = run_folder.RunFolder(out)
    with pytest.raises(SystemExit) as e:  # --resume of a run that never saved
        folder.checkpoint(resume=True)
    assert str(e.value) == (f"error: could not read the checkpoint {out}/ckpt.pt (FileNotFoundError); pass the --out "
                            "of a run that train.py wrote, or start without --resume")
    assert folder.checkpoint(resume=False) is None
    os.makedirs(out)
    for unreadable, error in [(b"not a checkpoint", "UnpicklingError"), ({"weights": 1}, "KeyError")]:
        if isinstance(unreadable, bytes):
            with open(folder.ckpt_path, "wb") as f:
                f.write(unreadable)
        else:
            torch.save(unreadable, folder.ckpt_path)
        with pytest.raises(SystemExit) as e:
            folder.checkpoint(resume=True)
        assert f"({error});" in str(e.value)
    folder.save_checkpoint({"config": {"lr": 0.1}, "it": 2})
    assert folder.checkpoint(resume=True) == {"config": {"lr": 0.1}, "it": 2}
    with pytest.raises(SystemExit) as e:  # a new run into it
        folder.checkpoint(resume=False)
    assert str(e.value) == f"error: {out} already holds a run; continue it with --resume, or pass another --out"


def test_a_failed_run_removes_the_folder_it_made_while_nothing_is_in_it(tmp_path):
    made, held, before = (str(tmp_path / name) for name in ("made", "held", "before"))
    os.makedirs(before)
    for path, stays in [(made, False), (held, True), (before, True)]:
        folder = run_folder.RunFolder(path)
        folder.lock()
        if path == held:
            folder.append_line("metrics.jsonl", "{}")
        with pytest.raises(SystemExit, match="^error: the dataset is unknown$"):
            folder.fail("the dataset is unknown")
        folder.lock_file.close()
        assert os.path.isdir(path) == stays, path


def test_two_runs_never_share_a_folder(tmp_path):
    first = run_folder.RunFolder(str(tmp_path))
    first.lock()
    with pytest.raises(SystemExit) as e:
        run_folder.RunFolder(str(tmp_path)).lock()
    assert str(e.value) == (f"error: another train.py is writing to {tmp_path}: wait for it to end, or pass another "
                            "--out")
    first.lock_file.close()  # the first run ends: the folder is free
    run_folder.RunFolder(str(tmp_path)).lock()


def test_the_first_stop_signal_asks_the_loop_to_stop(tmp_path, capsys):
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    folder = run_folder.RunFolder(str(tmp_path))
    try:
        folder.stop_on_signals()
        assert not folder.stop_requested
        os.kill(os.getpid(), signal.SIGUSR1)  # Slurm's warning (a second one would end this process)
        assert folder.stop_requested
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert "SIGUSR1: finishing this iteration, then saving the checkpoint" in capsys.readouterr().out
