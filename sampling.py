"""
The rollout's sampling: one action per prompt from an AdapterLM (model.py), batched, with a KV cache.

Paper: Wen et al., "Entropy-Regularized Token-Level Policy Optimization for Language Agent Reinforcement",
arXiv 2402.06700; ../shared/ETPO.md section 6, step 1 (roll out a batch of episodes with pi_theta). ETPO
trains on token ids, so this file returns the ids it sampled and decodes the texts only for the environment: a
text encoded again could give other ids than the ones the policy chose.

What a reader finds here, top to bottom:
1. generate(lm, prompts): tokens, lengths and texts; what train.py and eval.py call.
2. sample_ids: the loop itself. One prefill of the left-padded prompts (once per distinct prompt), then one
   token per step for every row, until each row has emitted EOS (or CodeLlama's <EOT>), completed a stop string,
   or reached max_new_tokens.
3. cached_forward: the model with a static KV cache (every slot allocated once, each step writes its own and
   attends to the filled ones) or transformers' dynamic one; graph_step: one decode step recorded and replayed as a
   CUDA graph.
4. sample: temperature, top-k and nucleus (top-p) sampling.

Departures from the paper: none. The loop is written out, not handed to transformers' generate(), so that a reader
sees the cache, the stopping rules and the device read-backs (one per step), and so that rows with one prompt can
share its prefill.
"""

import inspect

import torch
import torch.nn.functional as F

import model


def generate(lm, prompts, adapter="policy", max_new_tokens=256, temperature=1.0, top_k=0, top_p=1.0,
             stop_strings=(), generator=None, progress=None, cache="static", cuda_graph=False):
    """Sample one action per prompt. Returns tokens (B, T) right-padded with pad_token_id, lengths (B,) counting
    EOS (or <EOT>) or the token that completed a stop string, and the decoded texts. Training uses the token ids;
    the text is only for the environment. Only the sampling settings given here apply (no hidden defaults): top_k 0
    and top_p 1.0 mean off. Rows with the same prompt text share its prefill (see sample_ids)."""
    prompt_ids, prompt_mask = lm.encode_prompts(prompts)
    tokens, lengths = sample_ids(lm, prompt_ids, prompt_mask, adapter, max_new_tokens, temperature, top_k, top_p,
                                 stop_strings, generator, progress, cache, cuda_graph, prompts)
    rows = tokens.tolist()  # one read-back, not one per token
    texts = [lm.decode(row[:n]) for row, n in zip(rows, lengths.tolist())]
    return tokens, lengths, texts


@torch.no_grad()
def sample_ids(lm, prompt_ids, prompt_mask, adapter="policy", max_new_tokens=256, temperature=1.0, top_k=0,
               top_p=1.0, stop_strings=(), generator=None, progress=None, cache="static", cuda_graph=False,
               prompts=None):
    """The sampling loop on token ids (B, P) left-padded, with `adapter` active (None: the reference). Returns tokens
    (B, T) and lengths (B,). `progress` (a tqdm bar, optional) advances one per step.

    prompts (the B texts, optional) lets rows with the same prompt share its prefill: at an episode's first step
    every row has the task's prompt. The prefill then runs on the distinct prompts only, and the cache copies each
    one's keys and values to all of its rows (transformers' reorder_cache, made for beam search). Every row gets the
    keys and values a prefill of its own would give, up to rounding (a matmul of fewer rows may add in another
    order); tests/test_sampling.py checks that the sampled tokens are the same.

    cache="static" preallocates the keys and values of all P + max_new_tokens positions and writes each step's in
    place; a decode step's attention reads the filled slots only (P + T/2 of P + T on average over an action), a
    CUDA graph's all of them (and on transformers 4.x, see cached_forward). "dynamic" (transformers' default)
    concatenates each step's onto a copy of the whole cache, which reads and writes every cached byte once more per
    token: at CodeLlama-7B, B = 32 and P = 512 that is ~17 GB per step, more than the 13.5 GB of weights (bench.py
    measures both).

    cuda_graph=True (static cache, CUDA, transformers 5) replays one recorded decode step for every further token
    (graph_step): thousands of kernel launches and their Python become one launch. Not yet run on a GPU as of this
    writing, so it is off by default; `python bench.py` on a GPU measures it."""
    B, P = prompt_ids.shape
    stop_ids = stop_tokens(lm)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer is not None else 0
    mask = torch.zeros(B, P + max_new_tokens, dtype=torch.long, device=lm.device)  # (B, P + T): 1 = attend
    mask[:, :P] = prompt_mask
    positions = (prompt_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, P), left padding does not shift positions
    tokens = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=lm.device)  # (B, T)
    window = max((len(s) for s in stop_strings), default=0) + 2  # tokens that can hold a just-completed stop
    lengths = torch.zeros(B, dtype=torch.long, device=lm.device)
    done = torch.zeros(B, dtype=torch.bool, device=lm.device)
    firsts, which = model.first_rows(prompts, B, lm.device)  # (U,) one row per distinct prompt, (B,) row -> prompt
    kv, forward = cached_forward(lm, mask, len(firsts), cache, cuda_graph)

    training = lm.hf.training  # train mode (set by gradient checkpointing) would switch the KV cache off
    lm.hf.eval()
    with lm.adapter(adapter):
        if len(firsts) < B:  # prefill the U distinct prompts, then give row b the keys and values of its prompt
            logits = forward(prompt_ids[firsts], positions[firsts], 0, mask[firsts])  # (U, V)
            kv.reorder_cache(which)  # every layer's (U, heads, slots, dim) -> (B, heads, slots, dim)
            logits = logits[which]  # (B, V)
        else:
            logits = forward(prompt_ids, positions, 0)  # (B, V)
        step = graph_step(forward) if cuda_graph else forward
        positions = positions[:, -1:].clone()  # (B, 1)
        new = torch.empty(B, 1, dtype=torch.long, device=lm.device)  # (B, 1) at a fixed address, for a graph
        for t in range(max_new_tokens):
            w = sample(logits, temperature, top_k, top_p, generator)  # (B,)
            w = torch.where(done, torch.full_like(w, pad), w)
            tokens[:, t] = w
            lengths += (~done).long()
            if progress is not None:
                progress.update(1)
            done |= torch.isin(w, stop_ids)
            if stop_strings:  # a stop string ends the action; it can only have been completed by the tail
                done[completed_stop(lm, tokens[:, max(0, t + 1 - window) : t + 1], done, stop_strings)] = True
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            mask[:, P + t] = 1  # token t goes into the cache's slot P + t
            positions += 1
            new.copy_(w[:, None])
            logits = step(new, positions, P + t)  # (B, V)
    lm.hf.train(training)
    return tokens[:, : int(lengths.max())], lengths  # (B, T), (B,)


def stop_tokens(lm):
    """Tokens that end an action: EOS, and CodeLlama's end-of-infill token <EOT> when infilling (none without a
    tokenizer, as in bench.py's random-weight model)."""
    if lm.tokenizer is None:
        return torch.empty(0, dtype=torch.long, device=lm.device)
    ids = [lm.tokenizer.eos_token_id]
    if lm.supports_infill:
        ids.append(lm.tokenizer.convert_tokens_to_ids(lm.tokenizer.eot_token))
    return torch.tensor(ids, device=lm.device)


def completed_stop(lm, tails, done, stop_strings):
    """The rows, not yet done, whose last tokens (B, n) contain a stop string. One read-back of all the tails: reading
    ids one at a time would wait on a GPU each time."""
    tails, ended = tails.tolist(), done.tolist()
    texts = [None if ended[b] else lm.decode(tail) for b, tail in enumerate(tails)]
    return [b for b, text in enumerate(texts) if text and any(s in text for s in stop_strings)]


def cached_forward(lm, mask, rows, cache="static", cuda_graph=False):
    """A KV cache for `rows` sequences of mask.shape[1] slots, and forward(ids, positions, start, mask): the logits
    (rows, V) after ids (rows, n), whose keys and values go into the cache's slots start .. start + n - 1.
    mask (rows, slots), 1 = attend: the caller marks each slot once it is filled. With the static cache a decode
    step reads the filled slots 0 .. start only: the cache hands attention views of those (transformers' own update
    returns every slot) and the mask covers the same ones. A prefill, a CUDA graph's step and a step on transformers
    4.x read every slot."""
    from transformers import DynamicCache, StaticCache

    static = cache == "static"
    read = mask.shape[1]  # the slots 0 .. read - 1 whose keys and values a step's attention reads
    if static:  # max_batch_size, device, dtype: transformers 4.x needs them, 5.x allocates at the first write
        kv = StaticCache(config=lm.hf.config, max_batch_size=rows, max_cache_len=mask.shape[1], device=lm.device,
                         dtype=lm.hf.dtype)
        write = kv.update  # transformers' own: writes a step's keys and values, returns those of every slot

        def update(key_states, value_states, layer_idx, *args, **kwargs):  # ... of the first `read` slots only
            keys, values = write(key_states, value_states, layer_idx, *args, **kwargs)
            return keys[:, :, :read], values[:, :, :read]  # (rows, heads, read, dim) views: nothing is copied

        kv.update = update
    else:
        kv = DynamicCache()
    parameters = inspect.signature(lm.hf.forward).parameters
    # transformers 4.x takes the cache slots to write (it guesses them wrongly when row 0 starts with padding); 5.x
    # counts them in the cache itself
    explicit_slots = "cache_position" in parameters
    # the cache's keyword: `cache` since transformers 5.24, `past_key_values` before (deprecated there, removed in 5.40)
    cache_argument = "cache" if "cache" in parameters else "past_key_values"
    if cuda_graph and (not static or explicit_slots):  # (and a CUDA device: torch.cuda says so itself)
        raise ValueError("cuda_graph needs cache='static' and transformers 5 or later")

    def forward(ids, positions, start, mask=mask):
        nonlocal read
        n = ids.shape[1]
        slots = {"cache_position": torch.arange(start, start + n, device=lm.device)} if explicit_slots else {}
        seen = mask if static else mask[:, : start + n]  # a prefill into a static cache: a mask of all its slots
        read = mask.shape[1]
        if static and n == 1:  # a decode step: the new token sees exactly the filled slots 0 .. start
            # (a CUDA graph reads them all: its shapes are fixed; so does transformers 4.x, whose attention makes
            # every key and value tensor contiguous, which would copy a view of the filled slots at every step)
            read = read if cuda_graph or explicit_slots else start + 1
            seen = seen[:, None, None, :read].bool()  # handed over as (B, 1, 1, read): ~9 kernels fewer a step
        out = lm.hf(input_ids=ids, attention_mask=seen, position_ids=positions, use_cache=True, logits_to_keep=1,
                    **{cache_argument: kv}, **slots)
        return out.logits[:, -1].float()  # (rows, V)

    return kv, forward


def graph_step(forward):
    """forward(ids, positions, start) -> logits, run as a CUDA graph: the first call runs eagerly on a side stream
    (the warm-up torch's notes on CUDA graphs ask for), the second records the step once, and every call replays
    the recording. A replay reruns the recorded kernels on the recorded addresses with the recorded numbers, so the
    caller passes the same tensors every time and updates them in place (positions, mask, and the static cache
    advances its own slot counter), and reads the logits before the next call overwrites them.
    tests/test_sampling.py replays a recording on the CPU to check it."""
    graph, logits = None, None

    def step(ids, positions, start):
        nonlocal graph, logits
        if logits is None:  # the warm-up
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = forward(ids, positions, start)
            torch.cuda.current_stream().wait_stream(side)
            return logits
        if graph is None:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records the kernels without running them
                logits = forward(ids, positions, start)
        graph.replay()
        return logits

    return step


def sample(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """One token per row from softmax(logits / temperature), restricted to the top_k and the top_p nucleus."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature  # (B, V)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        sorted_probs = F.softmax(sorted_logits, -1)  # (B, V)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = F.softmax(logits, -1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]  # (B,)
