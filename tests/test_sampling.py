"""
sampling.py on the offline `tiny` preset (CPU, no downloads): cached sampling (static and dynamic KV cache) equals
uncached greedy decoding, both caches sample the same tokens, a static-cache decode step reads the filled slots
only, rows with one prompt share its prefill and still sample the tokens of a prefill per row, a static-cache decode
step reads no value back (what a CUDA graph needs), a rollout reads back once per step, a decode step recorded once
and replayed (a CUDA graph's semantics, emulated on the CPU) samples the same tokens, top-k and top-p restrict the
support, and stop strings end an action at the token that completes them.

Run: python -m pytest tests/test_sampling.py -q   (the first run builds the tiny model once, ~35 s on 2 cores)
"""

import contextlib
import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import model
import sampling

PROMPTS = ["# Dataset: iris\n\ndef build_model(x_train, y_train):\n", "# short\ndef build_model(x_train, y_train):\n"]


@pytest.fixture(scope="module")
def lm():
    return model.load("tiny", device="cpu")


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_cached_generation_equals_uncached_greedy_decoding_per_prompt(lm, cache):
    tokens, lengths, texts = sampling.generate(lm, PROMPTS, max_new_tokens=20, temperature=0.0, cache=cache)  # padded
    for b, prompt in enumerate(PROMPTS):
        ids = lm.tokenizer(prompt, return_tensors="pt").input_ids  # (1, P) alone, no padding
        out = []
        for _ in range(int(lengths[b])):
            w = int(lm.hf(input_ids=ids, use_cache=False).logits[0, -1].argmax())
            out.append(w)
            ids = torch.cat([ids, torch.tensor([[w]])], 1)
            if w == lm.tokenizer.eos_token_id:
                break
        assert tokens[b, : lengths[b]].tolist() == out
        assert texts[b] == lm.tokenizer.decode(out, skip_special_tokens=True)


def test_static_and_dynamic_caches_sample_the_same_tokens(lm):
    prompts = PROMPTS[::-1]  # row 0 is left-padded (transformers 4.x guessed its cache slots wrongly)
    runs = [sampling.generate(lm, prompts, max_new_tokens=30, generator=torch.Generator().manual_seed(1), cache=cache)
            for cache in ("static", "dynamic")]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][1].max() == 30  # the run fills the static cache to its last slot


class KeyLengths(TorchDispatchMode):
    """The number of keys each attention kernel reads (the key tensor's third dimension)."""

    def __init__(self):
        super().__init__()
        self.lengths = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in func.__name__:  # on a CPU, _scaled_dot_product_flash_attention_for_cpu
            self.lengths.append(args[1].shape[2])
        return func(*args, **(kwargs or {}))


def test_a_static_cache_decode_step_reads_the_filled_slots_only(lm):
    # the prefill attends over the P + T slots with the padding mask transformers builds; then step t (writing
    # slot P + t) reads slots 0 .. P + t, not the empty ones after them, in every layer. The tokens are those of
    # the dynamic cache, which holds the filled slots only (test_static_and_dynamic_caches_sample_the_same_tokens)
    import transformers

    prompt_ids, prompt_mask = lm.encode_prompts(PROMPTS)
    P, T, layers = prompt_ids.shape[1], 12, lm.hf.config.num_hidden_layers
    with KeyLengths() as keys:
        tokens, lengths = sampling.sample_ids(lm, prompt_ids, prompt_mask, max_new_tokens=T, temperature=0.0)
    steps = int(lengths.max()) - 1  # the prefill gives the first token, each decode step one more
    assert steps > 3
    # (transformers 4.x's attention would copy a view of the filled slots, so there every step reads all of them)
    read = [P + t + 1 for t in range(steps)] if int(transformers.__version__.split(".")[0]) >= 5 else [P + T] * steps
    assert keys.lengths == [P + T] * layers + [n for n in read for _ in range(layers)]


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_rows_with_one_prompt_share_its_prefill_and_sample_the_same_tokens(lm, cache):
    # five rows, three prompts of different lengths (so some rows are left-padded): two rows of the first, two of
    # the second, the third alone. Sharing the prefill must give the same tokens as one prefill per row, in every
    # row (a row given another prompt's keys and values, or its own at the wrong slots, samples other tokens)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], "# a third prompt\n", PROMPTS[1]]
    prompt_ids, prompt_mask = lm.encode_prompts(prompts)
    seen = []  # (rows, tokens) of every forward
    hook = lm.hf.get_decoder().register_forward_pre_hook(lambda m, a, kw: seen.append(tuple(kw["input_ids"].shape)),
                                                         with_kwargs=True)
    try:
        runs = [sampling.sample_ids(lm, prompt_ids, prompt_mask, max_new_tokens=30, cache=cache, prompts=keys,
                                    generator=torch.Generator().manual_seed(0)) for keys in (None, prompts)]
    finally:
        hook.remove()
    (alone, alone_lengths), (shared, shared_lengths) = runs
    assert torch.equal(shared, alone) and torch.equal(shared_lengths, alone_lengths)
    assert len(set(map(tuple, alone.tolist()))) == 5 and alone_lengths.max() > 5  # rows sampled apart, for a while
    P = prompt_ids.shape[1]
    assert [shape for shape in seen if shape[1] > 1] == [(5, P), (3, P)]  # the prefills: every row, then 3 rows
    assert all(shape == (5, 1) for shape in seen if shape[1] == 1)  # every decode step runs all 5 rows


class ReadBacks(TorchDispatchMode):
    """Counts the values read back to Python (.item(), int(t), bool(t): aten._local_scalar_dense), those inside each
    call of the model's forward apart from the others. On a GPU each one waits until the device has finished
    everything queued before it, and a CUDA graph cannot hold one."""

    def __init__(self, lm, monkeypatch):
        super().__init__()
        self.in_forward, self.per_forward, self.outside = False, [], 0
        forward = lm.hf.forward

        @functools.wraps(forward)  # keeps forward's signature, which sampling.cached_forward reads
        def marked(*args, **kwargs):
            self.in_forward = True
            self.per_forward.append(0)
            try:
                return forward(*args, **kwargs)
            finally:
                self.in_forward = False

        monkeypatch.setattr(lm.hf, "forward", marked)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            if self.in_forward:
                self.per_forward[-1] += 1
            else:
                self.outside += 1
        return func(*args, **(kwargs or {}))


def test_a_static_cache_decode_step_never_waits_on_the_device(lm, monkeypatch):
    # what a CUDA graph needs: no value read back inside a decode step's forward
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("cuda_graph needs transformers 5")
    prompt_ids, prompt_mask = lm.encode_prompts(PROMPTS)  # row 1 is left-padded
    for cache in ("static", "dynamic"):
        with ReadBacks(lm, monkeypatch) as read_backs:
            sampling.sample_ids(lm, prompt_ids, prompt_mask, max_new_tokens=6, temperature=0.0, cache=cache)
        monkeypatch.undo()
        decode_steps = read_backs.per_forward[1:]  # per_forward[0] is the prefill
        assert len(decode_steps) == 5
        assert sum(decode_steps) == 0 if cache == "static" else sum(decode_steps) > 0  # dynamic checks its mask
    with pytest.raises(ValueError, match="cuda_graph needs cache='static'"):
        sampling.sample_ids(lm, prompt_ids, prompt_mask, max_new_tokens=2, cache="dynamic", cuda_graph=True)


class ReplayedGraph:
    """torch.cuda.CUDAGraph's semantics on the CPU. Capture records every operator with its arguments as they are
    then: tensors by address, numbers by value. Replay runs that list again and writes each result into the tensor
    captured in its place, so every later operator, and the caller, reads the same addresses. A value read back
    during capture fails, as it does on a GPU. A CUDA capture records without running and the first replay runs
    the step; here the capture runs it, so the first replay does nothing."""

    def __init__(self):
        self.ops, self.replays = [], 0

    def replay(self):
        from torch.utils._pytree import tree_leaves

        self.replays += 1
        if self.replays == 1:
            return
        for func, args, kwargs, out in self.ops:
            if func.is_view:  # a view of a captured tensor sees what is written into that tensor
                continue
            new = func(*args, **kwargs)
            for old, fresh in zip(tree_leaves(out), tree_leaves(new), strict=True):
                if isinstance(old, torch.Tensor) and fresh.data_ptr() != old.data_ptr():
                    old.copy_(fresh)


@contextlib.contextmanager
def capture(graph):
    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
                raise RuntimeError("a CUDA graph cannot read a value back during capture")
            out = func(*args, **(kwargs or {}))
            graph.ops.append((func, args, kwargs or {}, out))
            return out

    with Record():
        yield


def test_a_rollout_reads_values_back_once_per_step_not_once_per_row_and_token(lm, monkeypatch):
    # around the model: the loop checks the stop strings on one copy of every row's tail per step and decodes the
    # texts from one copy of all tokens (reading ids one by one, it read back 1,662 values in this rollout)
    with ReadBacks(lm, monkeypatch) as read_backs:
        tokens, lengths, texts = sampling.generate(lm, [PROMPTS[0]] * 16, max_new_tokens=40, stop_strings=["model"],
                                                   generator=torch.Generator().manual_seed(0))
    assert sum("model" in text for text in texts) >= 8 and len(set(lengths.tolist())) > 1  # rows stopped apart
    steps = len(read_backs.per_forward)
    # done.all() a step, the longest row, and (the 16 rows share one prompt, whose prefill the cache copies to them)
    # one per layer where transformers' reorder_cache checks that the layer holds something
    once = lm.hf.config.num_hidden_layers
    assert 0 < read_backs.outside <= steps + 1 + once, (read_backs.outside, steps)


@pytest.mark.parametrize("shared", [False, True])
def test_a_decode_step_replayed_from_a_recording_samples_the_same_tokens(lm, monkeypatch, shared):
    # cuda_graph=True on the CPU, with the graph emulated: if a decode step depended on a number that changes from
    # step to step (a Python-side cache slot, a length), or wrote its state anywhere but in place, replaying step
    # 1's recording would sample other tokens than the eager loop does
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("cuda_graph needs transformers 5")
    graphs = []

    def new_graph():
        graphs.append(ReplayedGraph())
        return graphs[-1]

    class Stream:  # one CPU stream: waiting on it is a no-op
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", new_graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    prompts = PROMPTS + [PROMPTS[0][:20], PROMPTS[1]]  # rows 1-3 are left-padded, 2 by another amount
    keys = prompts if shared else None  # shared: rows 1 and 3 share a prefill, recorded after it
    prompt_ids, prompt_mask = lm.encode_prompts(prompts)
    saved = lm.adapter_state()
    for p in lm.adapter_params("policy"):  # a trained-looking adapter, so that its LoRA terms are in the recording
        torch.nn.init.normal_(p.data, std=0.02)
    try:
        for temperature, stops in ((0.0, ()), (1.0, ("\n\n",))):
            runs = {}
            for cuda_graph in (False, True):
                runs[cuda_graph] = sampling.sample_ids(lm, prompt_ids, prompt_mask, max_new_tokens=24,
                                                       temperature=temperature, stop_strings=stops,
                                                       generator=torch.Generator().manual_seed(0),
                                                       cuda_graph=cuda_graph, prompts=keys)
            assert graphs[-1].replays > 2 and len(graphs[-1].ops) > 100  # recorded once, replayed for many tokens
            assert torch.equal(runs[True][0], runs[False][0]) and torch.equal(runs[True][1], runs[False][1])
    finally:
        lm.load_adapter_state(saved)


def test_sampling_filters_restrict_the_support():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert int(sampling.sample(logits, top_k=1)) == 1
    assert int(sampling.sample(logits, top_p=0.05)) == 1
    g = torch.Generator().manual_seed(0)
    draws = {int(sampling.sample(logits, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {1, 3}


def test_stop_strings(lm):
    tokens, lengths, texts = sampling.generate(lm, PROMPTS, max_new_tokens=60, temperature=0.0,
                                               stop_strings=["model ="])
    for b, text in enumerate(texts):
        assert "model =" in text
        shorter = lm.tokenizer.decode(tokens[b, : lengths[b] - 1], skip_special_tokens=True)
        assert "model =" not in shorter  # stopped at the token that completed the stop string
