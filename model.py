"""
One frozen causal LLM with three small LoRA adapters: the four networks of ETPO in one set of weights.

Paper: Wen et al., "Entropy-Regularized Token-Level Policy Optimization for Language Agent Reinforcement",
arXiv 2402.06700; ../shared/ETPO.md section 6. ETPO needs a policy pi_theta, a soft Q-network phi, its
Polyak target phi_bar and the frozen reference pi_bar. Here they are ONE frozen base model plus the LoRA
adapters `policy`, `q` and `q_target`; running with no adapter is the reference. For CodeLlama-7B that is
13.5 GB of bf16 weights plus ~0.1 GB of adapters, where four full copies cost ~54 GB of weights alone.

What a reader finds here, top to bottom:
1. LoRA written out: y = W x + (alpha / r) * B A x with B = 0 at init (Hu et al., arXiv 2106.09685).
2. AdapterLM: choose an adapter with `with lm.adapter("q"):`, logits at the action positions only (LM head in
   float32; rows with one prompt run it once), prompts encoded and actions decoded, save / load adapters without
   the base weights, or save one merged into them (save_merged); torch's fused RMSNorm in place of transformers'.
   Sampling actions, with a KV cache, is sampling.py's.
3. Presets: any Hugging Face model id or path (default codellama/CodeLlama-7b-hf; offline, a cached one loads at
   once), `tiny` (tiny.py: built offline and warm-started on a small corpus of scikit-learn code, so a CPU run has
   signal), `codellama-7b-arch` (CodeLlama-7B's exact shapes with random weights, for benchmarks without a
   download).

Departures from the paper: 1. LoRA adapters instead of four full fine-tuned copies (the official code
fine-tunes all weights of four fp16 models on 8 GPUs). 2. Adapters and their optimizer state are fp32
while the base is bf16, since updates of lr 1e-6 vanish in bf16.
"""

import contextlib
import copy
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import DataDependentOutputException

import env
import tiny

ADAPTERS = ("policy", "q", "q_target")  # ETPO's; PPO-KL (ppo_kl.py) uses ("policy", "value")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------------------------------------------
# 1. LoRA: a frozen linear layer plus one low-rank update per named adapter


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B_a (A_a x) for the active adapter a; y = W x when none is active."""

    def __init__(self, base: nn.Linear, names, r: int, alpha: float):
        super().__init__()
        self.base, self.scale, self.active, self.cached = base, alpha / r, None, (None, None, None)
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for name in names:
            A = torch.empty(r, base.in_features, device=base.weight.device, dtype=torch.float32)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # the same init as nn.Linear's weight
            self.A[name] = nn.Parameter(A)  # (r, in)
            self.B[name] = nn.Parameter(torch.zeros(base.out_features, r, device=A.device))  # (out, r): zero at init

    def forward(self, x):
        y = self.base(x)  # W x, frozen
        if self.active is None:
            return y
        A, B = self.weights(x.dtype)
        # + (alpha / r) * B A x, added by the matmul itself (addmm: C + M1 M2), not by a separate pass over y
        return torch.addmm(y.flatten(0, -2), F.linear(x, A).flatten(0, -2), B.t()).view(y.shape)

    def weights(self, dtype):
        """A and (alpha / r) * B of the active adapter, cast from the fp32 master weights to the base's dtype (the
        (B, T, in) activations are never copied to fp32). Without autograd, as in every step of a rollout, the cast
        copies are kept until the weights change (a parameter's _version counts its in-place updates; .float() or
        .to() gives it a new storage), which saves three small kernels per projection per generated token."""
        A, B = self.A[self.active], self.B[self.active]
        if torch.is_grad_enabled():
            return A.to(dtype), (self.scale * B).to(dtype)
        key = (self.active, dtype, A.untyped_storage(), A._version, B.untyped_storage(), B._version)
        if self.cached[0] != key:
            self.cached = (key, A.to(dtype), (self.scale * B).to(dtype))
        return self.cached[1], self.cached[2]


# ----------------------------------------------------------------------------------------------------------------
# 2. AdapterLM: the base model, its tokenizer and the adapters


def torch_rms_norm(norm):
    """torch.nn.RMSNorm with this Llama RMSNorm's weight and epsilon: the same y = w * x / sqrt(mean(x^2) + eps)
    computed in float32 (bit for bit when x is float32). On a CUDA GPU torch runs it as a fused kernel forward and
    backward (aten._fused_rms_norm, pytorch/pytorch#153666), keeping x and 1 / sqrt(mean(x^2) + eps) in between;
    transformers' runs 8 kernels forward and 14 backward, each a pass over the activations, and keeps a float32
    copy of x. In bf16 torch's rounds once where transformers' rounds twice (x / rms, then w times it). On a CPU
    torch's is the same operations as transformers' (BENCHMARKS.md, "A fused RMSNorm")."""
    fused = nn.RMSNorm(norm.weight.shape, eps=norm.variance_epsilon, device="meta")
    fused.weight = norm.weight  # the same frozen parameter
    return fused


class AdapterLM(nn.Module):
    def __init__(self, hf_model, tokenizer, r=16, alpha=32, targets=LLAMA_TARGETS, adapters=ADAPTERS, name="",
                 max_prompt_tokens=None, fused_norm=True):
        """Wraps every linear layer named in `targets` in a LoRALinear; fused_norm=True also runs each Llama RMSNorm
        as torch's (see torch_rms_norm), False keeps transformers' own."""
        super().__init__()
        self.hf, self.tokenizer, self.name, self.max_prompt_tokens = hf_model, tokenizer, name, max_prompt_tokens
        self.anchor = None  # see decode()
        self.names = tuple(adapters)
        self.lora = {"r": r, "alpha": alpha, "targets": list(targets)}
        for p in self.hf.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.layers = []  # every LoRALinear, in a fixed order
        linear, head = set(), self.hf.get_output_embeddings()  # the names of the linear layers but the LM head's
        for module_name, module in list(self.hf.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear) and child is not head:
                    linear.add(child_name)
                    if child_name in targets:
                        lora = LoRALinear(child, adapters, r, alpha)
                        setattr(module, child_name, lora)
                        self.layers.append(lora)
                elif fused_norm and type(child).__name__ == "LlamaRMSNorm":
                    setattr(module, child_name, torch_rms_norm(child))
        missing = [t for t in targets if t not in linear]  # a typo, or another architecture than Llama's
        if adapters and missing:
            raise ValueError(f"{name} has no linear layer named {', '.join(missing)} (its linear layers are named "
                             f"{', '.join(sorted(linear))}): name the ones to adapt with train.py --lora-targets")
        config = self.hf.config
        if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
            raise ValueError(f"{name} rescales its logits after the LM head, which AdapterLM.head does not do")
        if "value" in self.names:  # PPO-KL's V(s): a scalar head on the last prompt token, zero at init
            self.value_head = nn.Linear(self.hf.config.hidden_size, 1, device=self.device, dtype=torch.float32)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    @property
    def supports_infill(self):
        """CodeLlama's tokenizers split a prompt at <FILL_ME> into the <PRE> prefix <SUF> suffix <MID> format."""
        return getattr(self.tokenizer, "fill_token", None) is not None

    @property
    def device(self):
        return self.hf.get_input_embeddings().weight.device

    @contextlib.contextmanager
    def adapter(self, name):
        """`with lm.adapter("policy"): ...` runs the base with that adapter; name None is the reference pi_bar.
        Call backward() inside the block if gradient checkpointing is on (the recomputation reads the adapter)."""
        previous = self.layers[0].active if self.layers else None
        for layer in self.layers:
            layer.active = name
        try:
            yield
        finally:
            for layer in self.layers:
                layer.active = previous

    def adapter_params(self, name):
        params = [p for layer in self.layers for p in (layer.A[name], layer.B[name])]
        return params + (list(self.value_head.parameters()) if name == "value" else [])

    def action_logits(self, prompt_ids, prompt_mask, tokens, action_mask, prompts=None):
        """Logits at the positions that predict each action token, (B, T, V) in float32, never the prompt's.

        prompt_ids (B, P) left-padded, tokens (B, T) right-padded. Position P - 1 + j holds pi(.|x^j), the
        distribution of action token j given the prompt and the j tokens before it.

        prompts (optional): the rows' prompt texts. Rows with the same prompt (every episode's first step has one)
        run as ONE sequence, the prompt once and then each row's action: [prompt, action 1, ..., action k], where
        each action attends to the prompt and to its own earlier tokens only, at positions continuing from the
        prompt's. Same logits, fewer tokens: 8 rows of one 512-token prompt with 256-token actions are 2,560 tokens
        instead of 6,144. At most rows_per_sequence(...) rows share a sequence (a longer one costs more attention
        than it saves). Without prompts every row is its own sequence.

        Each forward drops the left padding that all of its sequences have: a batch is padded to its longest prompt
        (a reflection prompt quotes a program and its error), which the shared task prompt need not carry along.
        """
        B, P = prompt_ids.shape
        T = tokens.shape[1]
        most = rows_per_sequence(self.hf.config, P, T)
        try:
            prompt_lengths = prompt_mask.sum(1).tolist()  # (B,) real prompt tokens of each row: one read-back
        except DataDependentOutputException:  # a tensor without values (simulate.py's fake tensors): drop none
            prompt_lengths = [P] * B
        by_size = {}  # k -> the groups of k rows; one forward per k, so that no action slot is padding
        for rows in rows_by_prompt(prompts if prompts is not None else range(B)):
            count = math.ceil(len(rows) / most)  # sequences for this prompt, of k or k + 1 rows each
            for group in (rows[start::count] for start in range(count)):
                by_size.setdefault(len(group), []).append(group)
        order, hidden = [], []
        for k, groups in by_size.items():
            P_k = max(prompt_lengths[group[0]] for group in groups)  # the longest prompt of this forward
            S = P_k + k * T
            index = torch.tensor(groups, device=self.device)  # (n, k) n sequences of k rows
            first = index[:, 0]  # (n,) the row whose prompt the sequence shares
            ids = torch.cat([prompt_ids[first, P - P_k :], tokens[index].flatten(1)], dim=1)  # (n, S)
            real = torch.cat([prompt_mask[first, P - P_k :], action_mask[index].flatten(1)], dim=1).bool()  # (n, S)
            counted = prompt_mask[first, P - P_k :].long().cumsum(1)  # (n, P_k) real prompt tokens so far
            positions = torch.cat([(counted - 1).clamp(min=0),  # left padding does not shift positions
                                   counted[:, -1:] + torch.arange(T, device=self.device).repeat(k)], dim=1)  # (n, S)
            if k == 1:  # one action: the padding mask (n, S), from which transformers builds the causal one
                mask = real.long()
            else:  # query i sees key j if j <= i, j is no padding, and j is in the prompt or in i's own action
                part = torch.tensor([0] * P_k + [m + 1 for m in range(k) for _ in range(T)], device=self.device)
                i = torch.arange(S, device=self.device)
                sees = (i[:, None] >= i[None]) & ((part[None] == 0) | (part[:, None] == part[None]))  # (S, S)
                # and every query sees itself, so that a padding query has a key (a row of -inf softmaxes to NaN)
                sees = (sees[None] & real[:, None, :]) | torch.eye(S, dtype=torch.bool, device=self.device)  # (n, S, S)
                dtype = self.hf.get_input_embeddings().weight.dtype  # additive: 0 if seen, the dtype's minimum if not
                mask = torch.zeros_like(sees, dtype=dtype).masked_fill(~sees, torch.finfo(dtype).min)[:, None]
            out = self.hf.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions,
                                        use_cache=False).last_hidden_state  # (n, S, H)
            take = [[P_k - 1] + [P_k + m * T + j for j in range(T - 1)] for m in range(k)]  # (k, T) w^1..w^T
            hidden.append(out[:, torch.tensor(take, device=self.device)].flatten(0, 1))  # (n k, T, H)
            order += [row for group in groups for row in group]
        hidden = torch.cat(hidden)[torch.tensor(order, device=self.device).argsort()]  # (B, T, H) in row order
        return self.head(hidden)  # (B, T, V)

    def head(self, hidden):
        """The LM head in float32: logits = W h, (..., V). ETPO's Q is a difference of two logits, l_Q - l_bar
        (etpo.q_from_logits), later divided by beta (0.01 in the paper); bf16 rounds a logit of 16-32 to a multiple
        of 0.125, which would swamp it. On the tiny model run in bf16, the float32 head cuts the error of Q at the
        taken tokens from 0.023 to 0.005 (BENCHMARKS.md, "bf16 numerics")."""
        return F.linear(hidden.float(), self.hf.get_output_embeddings().weight.float())

    def state_value(self, prompt_ids, prompt_mask, prompts=None):
        """PPO-KL's V(s), (B,): the value head on the decoder's last hidden state of each prompt (run it inside
        `with lm.adapter("value"):`). prompts (the B texts, optional): the decoder runs each distinct prompt once,
        and the rows of one prompt share its value (and, in the backward pass, sum their gradients into it)."""
        firsts, which = first_rows(prompts, len(prompt_ids), self.device)  # (U,), (B,)
        ids, mask = prompt_ids[firsts], prompt_mask[firsts]  # (U, P)
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        hidden = self.hf.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions)
        values = self.value_head(hidden.last_hidden_state[:, -1].float())[:, 0]  # (U,)
        return values[which]  # (B,)

    def last_logits(self, prompt_ids, prompt_mask):
        """Logits of the first action token, pi(.|x^0), (B, V) in float32: used for V(x_{t+1}^0)."""
        positions = (prompt_mask.long().cumsum(1) - 1).clamp(min=0)
        hidden = self.hf.get_decoder()(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
                                       use_cache=False)
        return self.head(hidden.last_hidden_state[:, -1])  # (B, V)

    # ------------------------------------------------------------------------------------------------------------
    # tokenization: the prompt and the action are encoded separately, so the action's token ids never change

    def encode_prompts(self, texts):
        """Left-padded prompt ids (B, P) int32 and mask (B, P) bool, 5 bytes a position where the tokenizer's int64
        would take 16; the tokenizer adds its BOS. Prompts longer than max_prompt_tokens keep BOS and their tail
        (where the signature, the error and the instruction are)."""
        ids = [self.tokenizer(t).input_ids for t in texts]
        if self.max_prompt_tokens:
            ids = [x if len(x) <= self.max_prompt_tokens else x[:1] + x[1 - self.max_prompt_tokens :] for x in ids]
        P = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id
        prompt_ids = torch.tensor([[pad] * (P - len(x)) + x for x in ids], dtype=torch.int32, device=self.device)
        prompt_mask = torch.tensor([[False] * (P - len(x)) + [True] * len(x) for x in ids], device=self.device)
        return prompt_ids, prompt_mask

    def decode(self, ids):
        """The text of some action tokens, every space kept. Llama-family tokenizers (CodeLlama's included) drop
        one leading space when decoding from a sequence's first token, which would leave the first line of a
        function body indented by 3 and the program unparsable; decoding after an anchor token and cutting the
        anchor's text off keeps it."""
        if self.anchor is None:  # once: the anchor's ids and the length of its text
            ids_a = self.tokenizer("a", add_special_tokens=False).input_ids
            self.anchor = (ids_a, len(self.tokenizer.decode(ids_a)))
        text = self.tokenizer.decode(self.anchor[0] + [int(i) for i in ids], skip_special_tokens=True)
        return text[self.anchor[1] :]

    # ------------------------------------------------------------------------------------------------------------
    # adapters on disk: only the LoRA weights, never the base

    def adapter_state(self):
        """The adapters' weights as they are now: a copy on the CPU (from a CPU model too), which later steps leave
        alone, with what load_adapter_state checks."""
        return {"lora": self.lora, "model": self.name,
                "weights": {n: [p.detach().to("cpu", copy=True) for p in self.adapter_params(n)] for n in self.names}}

    def load_adapter_state(self, state):
        same = state.get("lora") == self.lora and state.get("model") == self.name
        if not same or set(state["weights"]) != set(self.names):
            raise ValueError(f"the adapters {sorted(state['weights'])} were trained on {state.get('model')} with LoRA "
                             f"{state.get('lora')}, not {sorted(self.names)} on {self.name} with LoRA {self.lora}: "
                             "pass the same --model, --lora-rank and --algo")
        with torch.no_grad():
            for n in self.names:
                for p, saved in zip(self.adapter_params(n), state["weights"][n], strict=True):
                    p.copy_(saved)


def save_merged(lm, adapter, path):
    """Write the base model with one adapter folded into its weights as a plain Hugging Face model folder (config,
    safetensors weights, tokenizer), which transformers' from_pretrained, and any tool that reads such a folder,
    loads as the trained policy without this code. Each adapted projection's weight becomes W + (alpha / r) B A,
    computed in float32 and rounded once to the base's dtype (bf16 on a GPU: the merged model then differs from
    base + adapter by that rounding); its LM head runs in that dtype too, where AdapterLM.head runs in float32."""
    lora = {name: module for name, module in lm.hf.named_modules() if isinstance(module, LoRALinear)}
    # every tensor but those of the adapted layers (NAME.base.weight, NAME.A.<adapter>, NAME.B.<adapter>) ...
    state = {key: tensor for key, tensor in lm.hf.state_dict().items() if key.rsplit(".", 2)[0] not in lora}
    with torch.no_grad():
        for name, layer in lora.items():  # ... which become plain linear layers again, NAME.weight (and NAME.bias)
            W, A, B = layer.base.weight, layer.A[adapter], layer.B[adapter]
            # W + (alpha / r) B A, kept in host memory: a second copy of every projection would not fit on the GPU
            # beside the model on a 24 GB card (13.5 + 13 GB for CodeLlama-7B)
            state[f"{name}.weight"] = (W.float() + layer.scale * B @ A).to(W.dtype).cpu()
            if layer.base.bias is not None:  # Qwen2's q, k and v, say
                state[f"{name}.bias"] = layer.base.bias
    lm.hf.save_pretrained(path, state_dict=state)
    lm.tokenizer.save_pretrained(path)


def rows_by_prompt(prompts):
    """The rows of each distinct prompt, in order of first appearance: ["a", "b", "a"] -> [[0, 2], [1]]."""
    rows = {}
    for row, prompt in enumerate(prompts):
        rows.setdefault(prompt, []).append(row)
    return list(rows.values())


def first_rows(prompts, B, device):
    """For B rows with these prompt texts (None: all different): firsts (U,), one row of each distinct prompt in
    order of first appearance, and which (B,) on `device`, row b -> the number of its prompt, so that a result
    computed on the U rows prompt_ids[firsts] is x[which] for all B."""
    groups = rows_by_prompt(prompts if prompts is not None else range(B))  # U lists of rows
    which = torch.empty(B, dtype=torch.long)  # (B,)
    for u, rows in enumerate(groups):
        which[rows] = u
    return [rows[0] for rows in groups], which.to(device)


def rows_per_sequence(config, P, T):
    """How many rows of one prompt action_logits runs as one sequence.

    Per layer, a token costs 4 d^2 + 4 d d_kv + 6 d d_ff FLOPs in the linear layers (q and o, k and v, the MLP) and a
    query-key pair 4 d in attention, computed for every pair of a sequence, masked or not. In units of one pair, a
    sequence of k rows costs rho (P + k T) + (P + k T)^2 with rho = d + d_kv + 1.5 d_ff, and per row that is
    smallest at k = sqrt(P (rho + P)) / T: 14 for CodeLlama-7B at P = 512, T = 256; 2 for the tiny model at
    P = T = 128, whose attention is dear next to its small linear layers.
    """
    d = config.hidden_size
    heads = config.num_attention_heads
    d_kv = d // heads * (getattr(config, "num_key_value_heads", None) or heads)  # grouped-query attention: < d
    rho = d + d_kv + 1.5 * config.intermediate_size
    return max(1, int(math.sqrt(P * (rho + P)) / T))


# ----------------------------------------------------------------------------------------------------------------
# 3. Presets


def hub_options(name, timeout=3.0):
    """from_pretrained's options for `name`: {"local_files_only": True} when it is a Hub id and the Hub cannot be
    reached, else {}. Offline, huggingface_hub retries each file's request 5 times with backoff (about 25 s a file)
    before transformers looks in its cache; one quick connection test (env.reachable; skipped behind a proxy, which
    alone knows whether the Hub is there) lets an offline machine load a cached model, or fail, at once."""
    if os.path.isdir(name) or env.reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout):
        return {}
    return {"local_files_only": True}


def resolve_device(device=None):
    """torch.device(device), by default cuda when torch sees a GPU and cpu otherwise; a device that this machine does
    not have is a ValueError of one sentence here, not an AssertionError deep inside the first .to(device)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device} is not a device torch knows: pass cuda, cuda:N or cpu") from None
    if device.type not in ("cuda", "cpu"):  # mps, xpu, ...: one sentence now, not a failure of some operator later
        raise ValueError(f"--device {device} is not one this code has been run on: pass cuda, cuda:N or cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU build" if torch.version.cuda is None else "torch sees no GPU on this machine"
            raise ValueError(f"--device {device} asks for a CUDA GPU and {why}: drop --device to run on the CPU "
                             "(with --model tiny), or install torch's CUDA build on a machine with a GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device} does not exist: this machine has {torch.cuda.device_count()} "
                             f"GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def load(name="codellama/CodeLlama-7b-hf", device=None, r=16, alpha=32, targets=LLAMA_TARGETS, cache_dir=None,
         checkpointing=False, adapters=ADAPTERS, fused_norm=True):
    """An AdapterLM for `tiny`, `codellama-7b-arch`, or any Hugging Face causal LM id or local path.
    checkpointing=True recomputes each block's activations in the backward pass (less memory; 20% more matmul FLOPs
    in an ETPO update); fused_norm=False keeps transformers' RMSNorm (see torch_rms_norm)."""
    import transformers
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not sys.stderr.isatty():  # at a terminal the bars show a first download (13.5 GB for CodeLlama-7B) and the
        transformers.utils.logging.disable_progress_bar()  # load; in a log file they are noise
    device = resolve_device(device)
    if device.type == "cuda":  # the float32 head (AdapterLM.head) multiplies bf16 values, which TF32 holds exactly
        torch.backends.cuda.matmul.allow_tf32 = True
    options = dict(r=r, alpha=alpha, targets=targets, adapters=adapters, name=name, fused_norm=fused_norm)
    if name == "tiny":
        hf, tok = tiny.build(cache_dir)
        lm = AdapterLM(hf.to(device), tok, max_prompt_tokens=tiny.WINDOW, **options)
    elif name == "codellama-7b-arch":
        if device.type != "cuda":
            raise RuntimeError("codellama-7b-arch needs a CUDA GPU and none is visible: use --model tiny on a CPU")
        lm = AdapterLM(build_random(codellama_7b_config(), device), None, **options)
    elif not os.path.exists(name) and (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1):
        raise RuntimeError(f"there is no model folder {name}: pass a folder that holds a Hugging Face model, or a Hub "
                           "id such as codellama/CodeLlama-7b-hf")  # a Hub id is ORG/NAME, never a path like this
    else:
        try:
            hub = hub_options(name)  # offline: the local Hugging Face cache only, at once
            config = AutoConfig.from_pretrained(name, **hub)
            billions = approx_parameters(config) / 1e9
            if device.type != "cuda" and billions > 1.0:
                raise RuntimeError(f"{name} has about {billions:.0f}B parameters and needs a CUDA GPU, and none is "
                                   "visible: use --model tiny on a CPU")
            tok = AutoTokenizer.from_pretrained(name, **hub)
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            hf = AutoModelForCausalLM.from_pretrained(name, **hub, **dtype_argument(dtype)).to(device)
        except torch.cuda.OutOfMemoryError:  # (CUDA's own message is a paragraph about the allocator)
            raise RuntimeError(f"{name} does not fit in this GPU's memory (about {billions:.1f}B parameters, "
                               f"{2 * approx_parameters(config) / 2**30:.1f} GiB in bf16 before any activation): use a "
                               "GPU with more memory, or a smaller --model") from None
        except (OSError, ValueError, SafetensorError) as e:
            if isinstance(e, SafetensorError) and os.path.exists(name):  # a weights file cut short or damaged
                advice = "its weights could not be read: copy them again"
            elif isinstance(e, SafetensorError):  # (a full disk during a download, say)
                advice = (f"its weights could not be read: delete it from the Hugging Face cache (`hf cache rm "
                          f"model/{name}`), and the next run downloads it anew")
            elif os.path.exists(name):
                advice = ("pass a folder that holds a Hugging Face model (config.json, weights and tokenizer; a run "
                          "folder of train.py holds none), or a Hub id")
            else:
                advice = "if this machine is offline, pass a local path with --model or use --model tiny"
            reason = str(e).partition("\n")[0][:120]
            raise RuntimeError(f"could not load the model '{name}' ({reason}); {advice}") from None
        if tok.pad_token_id is None:
            tok.pad_token = tok.unk_token or tok.eos_token
        hf.eval()  # no dropout: the log-probabilities of the rollout and of the update must agree
        lm = AdapterLM(hf, tok, **options)
    if checkpointing:
        checkpoint_activations(lm.hf)
    return lm


def checkpoint_activations(hf):
    """Gradient checkpointing: each block keeps only its input for the backward pass and recomputes the rest.
    transformers checkpoints only in training mode; Llama-family models have no dropout, so that changes nothing
    else."""
    enable = getattr(hf, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.train()


def from_checkpoint(adapter_state, device=None, fused_norm=True):
    """The AdapterLM that train.py's checkpoint["adapters"] describes (base model, LoRA shape, adapter names), with
    those adapters loaded."""
    lora = adapter_state["lora"]
    lm = load(adapter_state["model"], device=device, r=lora["r"], alpha=lora["alpha"], targets=lora["targets"],
              adapters=tuple(adapter_state["weights"]), fused_norm=fused_norm)
    lm.load_adapter_state(adapter_state)
    return lm


def approx_parameters(config):
    """Parameters of a decoder-only transformer from its config: L * (4 d^2 + 3 d * d_ff) + 2 * V * d."""
    d, L = config.hidden_size, config.num_hidden_layers
    d_ff = getattr(config, "intermediate_size", None) or 4 * d
    return L * (4 * d * d + 3 * d * d_ff) + 2 * config.vocab_size * d


def codellama_7b_config():
    """CodeLlama-7B's architecture (the `codellama-7b-arch` preset)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32016, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=16384,
                       rope_theta=1e6, rms_norm_eps=1e-5)


def build_random(config, device):
    """A causal LM of this architecture with random bf16 weights, built directly on the device (no download)."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):  # from_config writes the dtype into the config: give it a copy
        hf = AutoModelForCausalLM.from_config(copy.deepcopy(config), **dtype_argument(torch.bfloat16))
    return hf.eval()


def dtype_argument(dtype):
    """transformers' keyword for a model's dtype: `dtype` since 4.56, `torch_dtype` before."""
    import transformers

    old = tuple(int(v) for v in transformers.__version__.split(".")[:2]) < (4, 56)
    return {"torch_dtype" if old else "dtype": dtype}
