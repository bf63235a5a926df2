"""
Shared fixtures: a checkpoint of a short tiny-model run, and a stand-in for CodeLlama that needs no download: its
tokenizer class (SentencePiece-style BPE with byte fallback, <PRE> <SUF> <MID> <EOT> infilling) on a vocabulary of
single characters, and a one-block Llama of that vocabulary.
"""

import fcntl
import os
import subprocess
import sys

# Set before torch loads its OpenMP runtime, which reads it then; the training runs the tests start inherit it. With
# -n 2 two processes, each with 2 OpenMP threads, share 2 cores, and GNU OpenMP's threads spin while they wait by
# default, on the core the other process needs. Waiting passively changes no result (the same threads split the
# same work): the whole suite took 7 min 19 s (12.5 min of CPU) where it took 9 to 11.5 minutes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: one of the eight longest tests (16 to 75 s each alone on 2 cores); "
                                       "-m 'not slow' leaves them out")


def pytest_collection_modifyitems(items):
    """The slow tests first, longest-first scheduling: with -n 2 the workers share them at the start, so that no
    slow test collected last (the CPU demo's is in the last file) can keep one worker busy after the other is done.
    (Single runs of the suite vary too much to show what this saves.)"""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: otherwise in the files' order


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """RUN/ckpt.pt of 16 environment steps of ETPO with the tiny model on iris (the tests only read it). Trained
    once per test session: the test processes of `pytest -n 2` share the parent of their temporary folders, and the
    first to need the run trains it while the other waits on a lock."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # (without -n, the parent holds the folders of earlier sessions)
        root = root.parent
    out = root / "ckpt-run" / "etpo"
    with open(root / "ckpt-run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "ckpt.pt").exists():
            r = subprocess.run([sys.executable, "train.py", "--model", "tiny", "--dataset", "iris", "--n-envs", "8",
                                "--steps", "16", "--max-new-tokens", "64", "--sample-every", "0", "--out", str(out)],
                               cwd=ROOT, capture_output=True, text=True, timeout=900)
            assert r.returncode == 0, r.stderr[-2000:]
    return str(out / "ckpt.pt")


def build_codellama_like():
    import transformers
    from transformers import CodeLlamaTokenizer, LlamaConfig, LlamaForCausalLM

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4.x builds CodeLlama's tokenizer from a SentencePiece file only")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{i:02X}>": 3 + i for i in range(256)})  # byte fallback: any character can be encoded
    for c in "\u2581" + "".join(chr(i) for i in range(33, 127)) + "\n":
        vocab.setdefault(c, len(vocab))
    tok = CodeLlamaTokenizer(vocab=vocab, merges=[])
    tok.pad_token = tok.unk_token
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tok


@pytest.fixture
def codellama_like():
    """(Hugging Face model, tokenizer), fresh for each test."""
    return build_codellama_like()


@pytest.fixture(scope="session")
def codellama_dir(tmp_path_factory):
    """The same saved as a local model folder, as `--model PATH` loads it."""
    path = str(tmp_path_factory.mktemp("codellama-like"))
    hf, tok = build_codellama_like()
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def phi3_dir(tmp_path_factory):
    """A model of another architecture than Llama's, as a local folder: a one-block Phi-3 (its attention projects
    q, k and v with one linear layer, qkv_proj, and its MLP has gate_up_proj) with the same tokenizer."""
    from transformers import Phi3Config, Phi3ForCausalLM

    path = str(tmp_path_factory.mktemp("phi3-like"))
    _, tok = build_codellama_like()
    config = Phi3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    Phi3ForCausalLM(config).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def full_temporary_folder():
    """A sitecustomize module (put first on PYTHONPATH) under which the sandbox cannot create its folder, as when
    the temporary folder's disk is full. (mkdtemp's own signature: Python 3.10's TemporaryDirectory passes the prefix
    by position.)"""
    return ("import errno\nimport os\nimport tempfile\n\nmkdtemp = tempfile.mkdtemp\n\n\n"
            "def full(suffix=None, prefix=None, dir=None):\n    if prefix == 'etpo-sandbox-':\n"
            "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
            "    return mkdtemp(suffix, prefix, dir)\n\n\ntempfile.mkdtemp = full\n")
