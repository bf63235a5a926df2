"""
ETPO's update and rollout on CodeLlama-7B, counted on any CPU: the GPU memory they would hold, the kernels they
would launch, the bytes those move and the FLOPs of their matmuls. No GPU and no download: fake tensors
(torch's FakeTensorMode) have shapes, dtypes and devices but no data, so a 7B update runs on a laptop's CPU (the
whole table takes about 12 minutes on 2 cores, most of it finding the largest batch four times).

Paper: Wen et al., "Entropy-Regularized Token-Level Policy Optimization for Language Agent Reinforcement",
arXiv 2402.06700; ../shared/ETPO.md section 6, steps 3-6. The update simulated here is update() below, the same one
bench.py times on a real device: train.py's targets, Q step, policy step and Polyak average on random tokens.

    python simulate.py                          # CodeLlama-7B, B = 8, P = 512, T = 256: peaks, largest B, operators,
                                                # one decode step at B = 8 and 32
    python simulate.py --model tiny --batch 2 --prompt-len 32 --action-len 16 --gpu-gib 0.02   # + the check
    python simulate.py --model codellama/CodeLlama-13b-hf   # any Hugging Face architecture: its config alone
    python simulate.py --by-module              # only one update's kernels and bytes, module by module (about 40 s)

With `--model tiny` it also runs the same update, rollout and decode step on real tensors and prints both counts,
which must be equal (tests/test_simulate.py). Departures from the paper: none; this file measures, it does not train.
"""

import argparse
import collections
import contextlib
import functools
import math
import weakref

import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

import etpo
import model
import sampling

# ----------------------------------------------------------------------------------------------------------------
# the workload: one ETPO update on random tokens (bench.py times it; simulate() counts it)


def random_prompts(lm, B, P, padded=False):
    """Random prompt ids (B, P) and their mask. padded: row b starts with b % (P - 1) pad positions, as prompts of
    different lengths are left-padded to the longest in training (the model then builds its attention mask, as in
    training)."""
    ids = torch.randint(3, lm.hf.config.vocab_size, (B, P), dtype=torch.int32, device=lm.device)  # 0-2 are special
    if not padded:  # int32 and bool, as AdapterLM.encode_prompts returns them
        return ids, torch.ones_like(ids, dtype=torch.bool)
    pads = torch.arange(B, device=lm.device) % (P - 1)  # (B,) row 0 has none: P is the longest prompt
    mask = torch.arange(P, device=lm.device)[None] >= pads[:, None]  # (B, P)
    return ids * mask, mask


def adamw(lm):
    return {name: torch.optim.AdamW(lm.adapter_params(name), lr=1e-4, weight_decay=0.0) for name in ("q", "policy")}


def update(lm, optimizers, B, P, T, shared=False, micro_batch=0):
    """One full ETPO update on random tokens: train.py's steps 3-6 at the paper's settings (one Q step, no
    conservative penalty), gradient clipping and AdamW included, its logged statistics left out. shared: every row
    has the same prompt, as at an episode's first step (action_logits then runs the prompt once per sequence of
    model.rows_per_sequence rows); else B different prompts, each of P tokens, with actions of T. micro_batch: rows
    per forward and backward of steps 4 and 5 (train.py --micro-batch), 0 = all B. Returns the bytes each transition
    keeps between the rollout and the update."""
    device = lm.device
    if shared:
        prompt_ids, prompt_mask = random_prompts(lm, 1, P)
        prompt_ids, prompt_mask, prompts = prompt_ids.expand(B, P), prompt_mask.expand(B, P), ["first step"] * B
    else:
        prompt_ids, prompt_mask = random_prompts(lm, B, P, padded=True)
        prompts = None  # every row its own prompt
    tokens = torch.randint(3, lm.hf.config.vocab_size, (B, T), device=device)  # (B, T)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)  # (B, T)
    lengths = torch.full((B,), T, device=device)
    action = (prompt_ids, prompt_mask, tokens, mask, prompts)
    with torch.no_grad():  # 3. targets: three forwards over the action, three over the next prompts
        with lm.adapter(None):
            ref_logits = lm.action_logits(*action)  # (B, T, V)
            next_ref = lm.last_logits(prompt_ids, prompt_mask)
        with lm.adapter("policy"):
            pi_logits = lm.action_logits(*action)
            next_pi = lm.last_logits(prompt_ids, prompt_mask)
        with lm.adapter("q_target"):
            q_tgt = etpo.q_from_logits(lm.action_logits(*action), ref_logits)
            next_q = etpo.q_from_logits(lm.last_logits(prompt_ids, prompt_mask), next_ref)
        values = etpo.soft_value(pi_logits, q_tgt, ref_logits, 0.01)
        next_values = etpo.soft_value(next_pi, next_q, next_ref, 0.01)
        ref_taken = ref_logits.gather(-1, tokens[..., None])[..., 0].float()
        y = etpo.token_targets(values, lengths, torch.zeros(B, device=device), next_values,
                               torch.zeros(B, device=device), 0.99)
        del pi_logits, q_tgt
    stored = [tokens, mask, y, ref_taken, prompt_ids, prompt_mask]  # what lives between the rollout and step 4
    step = micro_batch or B
    # the micro-batches' rows: train.py takes them prompt by prompt, and here each prompt's rows already sit together
    parts = [slice(start, start + step) for start in range(0, B, step)]

    def part(rows):
        return (*(t[rows] for t in action[:4]), None if prompts is None else prompts[rows])

    optimizers["q"].zero_grad(set_to_none=True)  # 4. Q update
    for rows in parts:
        with lm.adapter("q"):
            q_taken = lm.action_logits(*part(rows)).gather(-1, tokens[rows][..., None])[..., 0].float()
            loss = etpo.q_loss(q_taken - ref_taken[rows], y[rows], mask[rows])
            (loss * (mask[rows].sum() / mask.sum())).backward()
    torch.nn.utils.clip_grad_norm_(lm.adapter_params("q"), 1.0)
    optimizers["q"].step()
    optimizers["policy"].zero_grad(set_to_none=True)  # 5. policy update (the reference logits are kept from step 3)
    for rows in parts:
        with torch.no_grad(), lm.adapter("q"):
            q = etpo.q_from_logits(lm.action_logits(*part(rows)), ref_logits[rows])
        with lm.adapter("policy"):
            loss = etpo.policy_loss(lm.action_logits(*part(rows)), q, ref_logits[rows], 0.01, mask[rows])
            (loss * (mask[rows].sum() / mask.sum())).backward()
    torch.nn.utils.clip_grad_norm_(lm.adapter_params("policy"), 1.0)
    optimizers["policy"].step()
    etpo.polyak_update(lm.adapter_params("q_target"), lm.adapter_params("q"), 0.005)  # 6.
    return sum(t.numel() * t.element_size() for t in stored) / B

# ----------------------------------------------------------------------------------------------------------------
# the counters: kernels and bytes moved, bytes held; on real tensors or fake ones


LOOKUPS = (torch.ops.aten.embedding, torch.ops.aten.gather, torch.ops.aten.index_select, torch.ops.aten.index)


class Operators(TorchDispatchMode):
    """Counts the aten operators that run a kernel (a view only re-describes memory) and the bytes they move if
    each reads its inputs and writes its outputs once (no fusion, no cache reuse; a lookup reads only the entries it
    returns): a decode step is bound by its launches when there are thousands of them, otherwise by these bytes over
    the memory bandwidth; in an update the matmuls are bound by their FLOPs and the other operators by their bytes."""

    def __init__(self):
        super().__init__()
        self.kernels, self.bytes = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func.overloadpacket is torch.ops.aten._unsafe_view or func.namespace == "prim":
            return out  # prim: fake tensors' bookkeeping (prim.device), no kernel
        tensors = lambda tree: {id(t): t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)}  # noqa: E731
        inputs, outputs = tensors((args, kwargs)), tensors(out)
        written = inputs.keys() & outputs.keys()  # in place (KV cache writes, +=): the op writes its other inputs
        read = sum(nbytes(t) for i, t in inputs.items() if i not in written)
        if func.overloadpacket in LOOKUPS:  # reads the entries it returns and their indices, not the whole table
            read += nbytes(out) - nbytes(args[0])
        self.kernels += 1
        self.bytes += read + (read if written else sum(nbytes(t) for t in outputs.values()))
        return out


class OperatorsByModule(Operators):
    """Operators, each kernel also charged to where it runs (by_module: {where: [kernels, bytes moved]}, and
    by_operator: {where: {operator: bytes moved}}): the innermost module of the model whose forward runs it, by class
    (a LoRALinear's frozen matmul is its Linear's), the backward pass, or "outside the model" (ETPO's math, AdamW).
    It shows where fused kernels could pay off, before a GPU profile says what the time is."""

    def __init__(self, lm):
        super().__init__()
        self.by_module = collections.defaultdict(lambda: [0, 0])  # where -> [kernels, bytes moved]
        self.by_operator = collections.defaultdict(collections.Counter)  # where -> {operator: bytes moved}
        self.inside = []  # the classes of the modules whose forwards are running now, outermost first
        self.modules, self.hooks = list(lm.hf.modules()), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kernels, moved = self.kernels, self.bytes
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.kernels == kernels:  # a view: no kernel, nothing moved
            return out
        if torch._C._current_autograd_node() is not None:  # the autograd engine is running a backward node
            where = "backward"
        else:
            where = self.inside[-1] if self.inside else "outside the model"
        self.by_module[where][0] += self.kernels - kernels
        self.by_module[where][1] += self.bytes - moved
        self.by_operator[where][func.overloadpacket.__name__] += self.bytes - moved
        return out

    def __enter__(self):  # the hooks live as long as the mode: no module keeps one after the `with` block
        self.hooks = [hook for m in self.modules for hook in (
            m.register_forward_pre_hook(lambda module, inputs: self.inside.append(type(module).__name__)),
            m.register_forward_hook(lambda module, inputs, out: self.inside.pop() and None))]  # None: out unchanged
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        return super().__exit__(*exc)


def counted_flops(counter):
    """(matmuls, attention): the FLOPs a torch.utils.flop_counter.FlopCounterMode counted, split by operator. It
    counts a fused attention kernel as full S x S scores (no causal half) and its backward as 2.5 forwards: the GPU's,
    and the CPU's in torch 2.15 (torch 2.4 and 2.13 leave that one out)."""
    by_operator = counter.get_flop_counts()["Global"]  # {aten operator: FLOPs}
    attention = sum(flops for operator, flops in by_operator.items() if "attention" in str(operator))
    return counter.get_total_flops() - attention, attention


def nbytes(t):  # the bytes a tensor addresses: a broadcast (stride 0) dimension is read once
    return math.prod(n for n, stride in zip(t.shape, t.stride()) if stride != 0) * t.element_size()


class Allocations(TorchDispatchMode):
    """Bytes of tensor storage alive now and at the peak, counted as torch.cuda.max_memory_allocated counts them
    (less its rounding up to 512-byte blocks): every storage an operator returns, from its creation until it is
    freed. Under FakeTensorMode tensors have shapes, dtypes and devices but no data, so a 7B model and its update
    run on any CPU in seconds while this counts the bytes they would hold."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.storages = 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self.storages:  # a new storage
                storage = t.untyped_storage()
                self.storages.add(storage._cdata)
                self.live += storage.nbytes()
                weakref.finalize(storage, self.freed, storage._cdata, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out

    def freed(self, key, nbytes):
        self.storages.discard(key)
        self.live -= nbytes


def random_lm(config, fused_norm=True):
    """An AdapterLM of this architecture with random bf16 weights, on the CPU (shapes only under FakeTensorMode)."""
    return model.AdapterLM(model.build_random(config, "cpu"), None, name=config.model_type, fused_norm=fused_norm)


class Simulation:
    """A model of this architecture with random bf16 weights, its adapters and AdamW, for the update of any number of
    rows B with P prompt and T action tokens: peaks(B) gives (bytes held before the update, bytes at its peak). A
    first update, of one row, creates the AdamW state; each later one starts from what an update leaves (adapters,
    AdamW state, gradients, the adapters' bf16 copies), none of which depends on B, so one Simulation measures
    every B as a new one would, at one update each (on CodeLlama-7B 12 to 20 s on 2 CPU cores). fake=False runs the
    same on real tensors, to check the simulation; shared: one prompt for all rows, as in update(); fused_norm: as in
    model.AdapterLM; micro_batch: as in update()."""

    def __init__(self, config, P, T, checkpointing=False, fake=True, shared=False, fused_norm=True, micro_batch=0):
        self.mode, self.memory = FakeTensorMode() if fake else contextlib.nullcontext(), Allocations()
        self.P, self.T, self.shared, self.micro_batch = P, T, shared, micro_batch
        with fake_values_checked(), self.mode, self.memory:
            self.lm = random_lm(config, fused_norm)
            if checkpointing:
                model.checkpoint_activations(self.lm.hf)
            self.optimizers = adamw(self.lm)
            update(self.lm, self.optimizers, 1, P, T, shared, micro_batch)

    def peaks(self, B):
        with fake_values_checked(), self.mode, self.memory:
            self.memory.peak = before = self.memory.live
            update(self.lm, self.optimizers, B, self.P, self.T, self.shared, self.micro_batch)
        return before, self.memory.peak


@contextlib.contextmanager
def fake_values_checked():
    """A forward that reads a tensor's values (e.g. transformers 4.x inspects the attention mask's) ends in one
    sentence: fake tensors have none."""
    try:
        yield
    except DataDependentOutputException:
        import transformers

        raise RuntimeError(f"transformers {transformers.__version__} reads tensor values in this model's forward, "
                           "which fake tensors do not have: the simulation needs a newer transformers (5.17 and "
                           "later run it)") from None


def simulate(config, B, P, T, checkpointing=False, fake=True, shared=False, fused_norm=True, micro_batch=0):
    """(bytes held before an update, bytes at its peak) for the update of B rows: Simulation(...).peaks(B)."""
    return Simulation(config, P, T, checkpointing, fake, shared, fused_norm, micro_batch).peaks(B)


def case(shared, checkpointing, micro_batch=0):  # the label of a simulated update in the table
    prompts = "one shared prompt, " if shared else ""
    parts = f"micro-batches of {micro_batch} row{'s' * (micro_batch > 1)}, " if micro_batch else ""
    return prompts + parts + ("gradient checkpointing" if checkpointing else "no checkpointing")


def simulate_rollout(config, B, P, T, fake=True, fused_norm=True):
    """Bytes at the peak of a rollout of B prompts of P tokens (static cache of P + T slots). Fake tensors cannot say
    when rows stop, so a fake rollout ends where it first reads a sampled value, after the prefill and the first
    token; the prefill is its peak (each later step adds one token's activations), which the real tiny model
    confirms. Call it once simulate() has run: where the forward itself reads values (transformers 4.x), simulate()
    says so, while this would stop inside the prefill."""
    with FakeTensorMode() if fake else contextlib.nullcontext(), Allocations() as memory:
        lm = random_lm(config, fused_norm)
        prompt_ids, prompt_mask = random_prompts(lm, B, P, padded=True)
        try:
            sampling.sample_ids(lm, prompt_ids, prompt_mask, "policy", T)
        except DataDependentOutputException:
            assert fake
        return memory.peak


def decode_step(config, B, P, T, fake=True, fused_norm=True):
    """(kernels, bytes moved, bytes of KV cache read, bytes of weights read) of one decode step of a rollout of B
    prompts of P tokens with the policy adapter, as sampling.sample_ids runs it: a static cache of P + T slots, one
    new token per row. The step reads the weights and the filled slots of the cache; the one counted is the
    action's middle step, which reads P + T/2 slots, the mean over the action's steps (its bytes grow linearly
    with the filled slots). A bandwidth-bound step reaches at most weights / bytes moved of the decode roofline
    (which counts the weights)."""
    with FakeTensorMode() if fake else contextlib.nullcontext(), torch.no_grad():
        lm = random_lm(config, fused_norm)
        lm.hf.eval()
        prompt_ids, prompt_mask = random_prompts(lm, B, P, padded=True)
        mask = torch.zeros(B, P + T, dtype=torch.long)  # (B, P + T)
        mask[:, :P] = prompt_mask
        kv, forward = sampling.cached_forward(lm, mask, B)
        positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)  # (B, P)
        with lm.adapter("policy"):
            forward(prompt_ids, positions, 0)  # the prefill fills slots 0 .. P - 1
            start = P + max(T // 2, 1) - 1  # the middle step writes slot `start` and reads slots 0 .. start
            mask[:, : start + 1] = 1
            for layer in kv.layers:  # transformers 5 counts the filled slots itself: as if the steps before had run
                layer.cumulative_length.fill_(start)
            ids, position = torch.zeros(B, 1, dtype=torch.long), positions[:, -1:] + start - P + 1  # (B, 1) each
            with Operators() as ops:  # (every decode step runs the same operators, on more slots each time)
                forward(ids, position, start)
        cache = sum(nbytes(t[:, :, : start + 1]) for layer in kv.layers for t in (layer.keys, layer.values))
        return ops.kernels, ops.bytes, cache, step_weight_bytes(lm)


def step_weight_bytes(lm, adapter="policy"):
    """Bytes of the weights one decode step reads: the frozen base but its input embeddings (a step looks up one row
    per sequence; the LM head is read whole), and the adapter that samples, in the base's dtype (LoRALinear.weights
    casts it once per rollout). The other adapters sit idle in memory."""
    head, embeddings = lm.hf.get_output_embeddings().weight, lm.hf.get_input_embeddings().weight
    skip = {id(p) for name in lm.names for p in lm.adapter_params(name)}
    skip |= {id(embeddings)} if embeddings is not head else set()
    base = sum(nbytes(p) for p in lm.hf.parameters() if id(p) not in skip)
    return base + sum(p.numel() for p in lm.adapter_params(adapter)) * embeddings.element_size()


# ----------------------------------------------------------------------------------------------------------------
# the table


def largest_batch(peak_at, B, budget):
    """The largest n with peak_at(n) <= budget (0 if none). The peak is affine in B (what is held before the update
    + B x one row's activations and logits), so the line through B and 2B lands next to it; a few runs confirm."""
    per_row = (peak_at(2 * B) - peak_at(B)) / B
    n = max(1, int((budget - (peak_at(B) - B * per_row)) // per_row))  # where the line crosses the budget
    while n > 0 and peak_at(n) > budget:
        n -= 1
    while peak_at(n + 1) <= budget:
        n += 1
    return n


def load_config(name):
    """The architecture to simulate: CodeLlama-7B's, the tiny preset's, or a Hugging Face model's config."""
    if name == "codellama-7b-arch":
        return model.codellama_7b_config()
    if name == "tiny":
        return model.load("tiny", device="cpu").hf.config
    from transformers import AutoConfig

    try:
        # the config alone: a few kB, no weights are downloaded; offline, the local cache only (model.hub_options)
        return AutoConfig.from_pretrained(name, **model.hub_options(name))
    except (OSError, ValueError) as e:
        reason = str(e).partition("\n")[0][:120]
        raise SystemExit(f"error: could not read the config of '{name}' ({reason}); pass a Hugging Face id or a "
                         "local folder, or use --model codellama-7b-arch") from None


def batch_sizes(text):
    """--rollout-batches: comma-separated positive integers, or argparse's one-line error."""
    values = [int(s) for s in text.split(",") if s.strip().isdigit()]
    if len(values) != len(text.split(",")) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of positive batch sizes")
    return values


def print_by_module(simulation, name, B, P, T):
    """--by-module: where the bytes of one update go, by the modules whose forwards move them, and the backward."""
    with simulation.mode, OperatorsByModule(simulation.lm) as ops:  # (a Simulation has made the AdamW state)
        update(simulation.lm, simulation.optimizers, B, P, T)
    print(f"| {name}, one update B={B} P={P} T={T}, by module | kernels | GB moved | share of the bytes | "
          "largest operators (GB) |\n|---|---|---|---|---|")
    for where, (kernels, moved) in sorted(ops.by_module.items(), key=lambda item: -item[1][1]):
        largest = ", ".join(f"{op} {b / 1e9:,.3g}" for op, b in ops.by_operator[where].most_common(4))
        print(f"| {where} | {kernels:,} | {moved / 1e9:,.4g} | {moved / ops.bytes:.1%} | {largest} |")
    print(f"| all | {ops.kernels:,} | {ops.bytes / 1e9:,.4g} | | |")


def print_real_check(config, B, P, T, fused_norm=True):
    """The check (--model tiny): the same update, rollout and decode step on real tensors, beside the simulation,
    whose counts must be equal (in micro-batches, at least the real ones: below)."""
    # In micro-batches the fake update holds a little more than the real one: a forward drops the left padding that
    # all of its rows share (random_prompts pads row b by b tokens), and a fake one cannot see it, nor that a mask
    # of one row with none has no padding to build an attention mask for. So it is an upper bound there.
    for shared, checkpointing, micro in [(False, False, 0), (False, True, 0), (True, False, 0), (False, False, 1)]:
        real, simulated = (simulate(config, B, P, T, checkpointing, fake, shared, fused_norm, micro)[1]
                           for fake in (False, True))
        print(f"| update B={B}, {case(shared, checkpointing, micro)}, on real tensors here | {real:,} bytes | "
              f"simulated: {simulated:,} bytes | |")
    real, simulated = (simulate_rollout(config, B, P, T, fake, fused_norm) for fake in (False, True))
    print(f"| rollout B={B}, on real tensors here | {real:,} bytes | simulated: {simulated:,} bytes | |")
    real, simulated = (decode_step(config, B, P, T, fake, fused_norm)[:2] for fake in (False, True))
    print(f"| decode step B={B}, on real tensors here | {real[0]:,} kernels, {real[1]:,} bytes moved | "
          f"simulated: {simulated[0]:,} kernels, {simulated[1]:,} bytes moved | |")


def main():
    parser = argparse.ArgumentParser(description="Simulate the memory and the operators of ETPO's update and rollout.")
    parser.add_argument("--model", default="codellama-7b-arch", help="codellama-7b-arch, tiny, or a Hugging Face "
                        "id or folder (its config is read; no weights are downloaded)")
    parser.add_argument("--batch", type=int, default=8, help="transitions per update B")
    parser.add_argument("--prompt-len", type=int, default=512, help="prompt tokens P")
    parser.add_argument("--action-len", type=int, default=256, help="action tokens T")
    parser.add_argument("--rollout-batches", type=batch_sizes, default="8,32",
                        help="batch sizes for the rollout's peak")
    parser.add_argument("--gpu-gib", type=float, default=78.0, help="GPU memory for the largest B (80 GB H100: 78)")
    parser.add_argument("--transformers-norm", action="store_true", help="keep transformers' RMSNorm instead of "
                        "torch's fused one (model.torch_rms_norm): the figures before it")
    parser.add_argument("--by-module", action="store_true", help="only the operators of one update, module by module")
    args = parser.parse_args()
    for flag in ("batch", "prompt_len", "action_len", "gpu_gib"):  # one sentence, not a division by zero
        if getattr(args, flag) <= 0:
            raise SystemExit(f"error: --{flag.replace('_', '-')} {getattr(args, flag)} must be positive")
    name, fused_norm = args.model, not args.transformers_norm
    B, P, T, budget, gib = args.batch, args.prompt_len, args.action_len, args.gpu_gib * 2**30, 2**30
    config = load_config(name)
    try:  # (a forward that needs tensor values fails here, at once)
        simulations = {(False, False): Simulation(config, P, T, fused_norm=fused_norm)}
    except RuntimeError as e:
        raise SystemExit(f"error: {e}") from None
    if args.by_module:
        return print_by_module(simulations[False, False], name, B, P, T)
    print(f"| {name}, P={P} T={T}, simulated{', transformers RMSNorm' if args.transformers_norm else ''} | peak of "
          "the update | held before it (weights, adapters, AdamW state, gradients) | per row of B |\n|---|---|---|---|")
    largest = []
    for shared, checkpointing in [(False, False), (False, True), (True, False), (True, True)]:
        label = case(shared, checkpointing)
        if (shared, checkpointing) not in simulations:
            simulations[shared, checkpointing] = Simulation(config, P, T, checkpointing, shared=shared,
                                                            fused_norm=fused_norm)
        run = functools.cache(simulations[shared, checkpointing].peaks)
        peak_at = lambda n: run(n)[1]  # noqa: E731  B -> peak bytes
        print(f"| update B={B}, {label} | {peak_at(B) / gib:.3g} GiB | {run(B)[0] / gib:.3g} GiB | "
              f"{(peak_at(2 * B) - peak_at(B)) / B / gib:.3g} GiB |")
        n = largest_batch(peak_at, B, budget)
        fits = f"{peak_at(n) / gib:.3g} GiB" if n > 0 else "none fits"
        largest.append(f"B = {n} ({label}, {fits}; B = {n + 1} needs {peak_at(n + 1) / gib:.3g} GiB)")
    run = functools.cache(Simulation(config, P, T, micro_batch=1, fused_norm=fused_norm).peaks)  # train.py's
    print(f"| update B={B}, {case(False, False, 1)} | {run(B)[1] / gib:.3g} GiB | {run(B)[0] / gib:.3g} GiB | "  # last
          f"{(run(2 * B)[1] - run(B)[1]) / B / gib:.3g} GiB |")  # step before checkpointing: one row at a time
    print(f"| largest B within {args.gpu_gib:g} GiB | " + "; ".join(largest[:2]) + " | " + "; ".join(largest[2:])
          + " | |")
    rollouts = {n: simulate_rollout(config, n, P, T, fused_norm=fused_norm)
                for n in args.rollout_batches}
    print("| rollout, static cache | " + ", ".join(f"B = {n}: {peak / gib:.3g} GiB" for n, peak in rollouts.items())
          + " | | |")
    for n in rollouts:  # what a mean decode step moves: the weights, the filled slots of the cache, and the rest
        kernels, moved, cache, weights = decode_step(config, n, P, T, fused_norm=fused_norm)
        print(f"| decode step B={n}, static cache, P+T/2 of P+T slots read | {kernels:,} kernels | "
              f"{moved / 1e9:.4g} GB moved: weights {weights / 1e9:.4g} GB, KV cache {cache / 1e9:.4g} GB | at most "
              f"{weights / moved:.0%} of the decode roofline (weights / bytes moved) |")
    for shared in (False, True):  # and the kernels one update launches, the bytes they move, its matmul FLOPs
        simulation = simulations[shared, False]  # (its AdamW state made)
        with simulation.mode:
            with Operators() as ops:
                update(simulation.lm, simulation.optimizers, B, P, T, shared)
            with FlopCounterMode(display=False) as counter:  # apart: it changes which operators run inside it
                update(simulation.lm, simulation.optimizers, B, P, T, shared)
        print(f"| operators of one update B={B}{', one shared prompt' if shared else ''} | {ops.kernels:,} kernels | "
              f"{ops.bytes / 1e9:,.4g} GB moved | {counted_flops(counter)[0]:.4g} FLOP in matmuls |")
    if name == "tiny":  # the check: the same update on real tensors holds exactly the bytes simulated
        print_real_check(config, B, P, T, fused_norm)


if __name__ == "__main__":
    main()
