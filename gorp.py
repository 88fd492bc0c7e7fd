"""
GORP: continual fine-tuning of a language model by gradient low-rank projection, in one file.

Paper: Wang, Lyu, Sun, Jing, "Continual Gradient Low-Rank Projection Fine-Tuning for LLMs",
ACL 2025 (arXiv 2507.02503). The project's specification of it is docs/method.md in the
shared folder; section numbers below (method.md §N) point there.

A model learns tasks T1..TN one after another, with no replay. GORP trains three kinds of
parameters at once (method.md §1):
  - a fresh LoRA adapter per task on the attention (cheap, low-rank, plastic);
  - chosen full-rank weights (the MLP's c_fc), but only through Adam in a rank-r projected
    space of their gradient, refreshed every T steps, as GaLore does (§2);
  - nothing else: embeddings, norms and biases stay frozen.
and it protects old tasks with a *shared gradient space*: for every trained matrix an
orthonormal basis S of the directions earlier tasks moved along (grown at the end of each task
from Adam's first moment, GPM-style, §4). New gradients, and the updates Adam makes of them,
are projected off S.

How the pieces fit, top to bottom:
  1. GPT            a small GPT in nanoGPT's shape with GPT-2's names, so GPT-2 weights load
  2. LoRALinear     an nn.Linear with one trainable low-rank adapter, merged at task end
  3. top_r_basis    the hand-rolled top-r factorisation (randomized range finder + QR)
  4. grow_space     the GPM energy rule that grows a shared space from a first moment
  5. GORP           a torch.optim.Optimizer: plain AdamW, GaLore-style projected Adam, and
                    LoRA-A steps, all with the shared space where a group asks for it

Use it from Python:
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64))
    inject_lora(model, r"attn\\.c_attn$", r=8, alpha=16)
    opt = GORP(param_groups(model, full_rank=r"mlp\\.c_fc$", rank=8, shared_space=True))
    ... train task t ...;  opt.grow_shared_space(0.9);  spaces = opt.shared_spaces()
    end_task(model);  opt = GORP(...);  opt.load_shared_spaces(spaces)   # next task
or run the whole continual loop with `python train_cl.py` (see README.md).
"""

import json
import math
import os
import re
import struct
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. The model: nanoGPT's GPT with GPT-2's module names


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (GPT-2: n_positions)
    vocab_size: int = 50257  # GPT-2's BPE vocabulary, tiktoken's "gpt2" encoding
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases in its linears and layer norms


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x, cache=None, mask=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:  # generation: keep this layer's keys and values, attend to all of them
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)  # (B, nh, S, hs)
            cache["k"], cache["v"] = k, v
        dropout = self.dropout if self.training else 0.0
        if mask is None:  # training: plain causal attention, the fused kernel where there is one
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:  # generation over left-padded prompts: mask is (B, 1, T, S), True = may attend
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
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

    def forward(self, x, cache=None, mask=None):
        x = x + self.attn(self.ln_1(x), cache, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, pos=None, cache=None, mask=None, vocab=None):
        """idx (B, T) token ids -> (logits, loss). Targets of -1 are ignored, so the loss can fall
        on answer tokens alone; with targets, logits are computed only where a target is, which
        spares the 50257-wide head on prompt tokens. vocab (V',) restricts the softmax to those
        token ids (targets then index into it): pretraining on a language of a few dozen
        tokens need not pay for all 50257. pos, cache and mask serve generate()."""
        B, T = idx.size()
        if pos is None:
            assert T <= self.config.block_size, f"sequence of {T} tokens, block_size is {self.config.block_size}"
            pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if cache is None else cache[i], mask)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # (B, 1, V): only the next token is wanted
        keep = targets != -1  # (B, T)
        head = self.lm_head.weight if vocab is None else self.lm_head.weight[vocab]  # (V, C)
        logits = F.linear(x[keep], head)  # (K, V)
        return logits, F.cross_entropy(logits.float(), targets[keep])

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, stop_token=None, use_cache=True):
        """Greedy decoding of a batch of prompts (lists of token ids of any lengths). Prompts are
        left-padded so every row's next token sits in the last column; with use_cache, keys and
        values are kept per layer and each new token costs one position, not the whole prefix.
        Returns the new tokens of each prompt, up to and without stop_token."""
        device = self.transformer.wte.weight.device
        B, T = len(prompts), max(len(p) for p in prompts)
        assert T + max_new_tokens <= self.config.block_size, "prompt + answer longer than block_size"
        idx = torch.zeros(B, T, dtype=torch.long)
        valid = torch.zeros(B, T, dtype=torch.bool)
        for b, p in enumerate(prompts):
            idx[b, T - len(p):], valid[b, T - len(p):] = torch.tensor(p), True
        idx, valid = idx.to(device), valid.to(device)  # (B, T)
        out, done = [], torch.zeros(B, dtype=torch.bool, device=device)
        cache = [{} for _ in self.transformer.h] if use_cache else None
        new_idx = idx
        for _ in range(max_new_tokens):
            S, n = valid.size(1), new_idx.size(1) if use_cache else valid.size(1)  # keys, queries
            pos = (valid.long().cumsum(1) - 1).clamp(min=0)  # (B, S): pads share position 0
            k_pos, q_pos = torch.arange(S, device=device), torch.arange(S - n, S, device=device)
            # a query sees earlier valid keys, and always itself, so a pad row is never all -inf
            sees = (k_pos[None, :] <= q_pos[:, None]) & (valid[:, None, :] | (k_pos[None, :] == q_pos[:, None]))  # (B, n, S)
            x = new_idx if use_cache else idx  # with the cache, only the new positions are fed
            logits, _ = self(x, pos=pos[:, -n:], cache=cache, mask=sees[:, None])
            new_idx = logits[:, -1, :].argmax(-1, keepdim=True)  # (B, 1)
            out.append(new_idx)
            if stop_token is not None:
                done |= new_idx[:, 0] == stop_token
                if bool(done.all()):  # one host sync per token, to stop as soon as all rows have
                    break
            idx = torch.cat([idx, new_idx], dim=1)
            valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
        rows = torch.cat(out, dim=1).tolist()
        return [row[: row.index(stop_token)] if stop_token in row else row for row in rows]

    @classmethod
    def from_pretrained(cls, path_or_name):
        """Load a GPT-2 checkpoint in the Hugging Face layout with torch alone: a folder (or a file
        in it) holding config.json and model.safetensors or pytorch_model.bin. The names gpt2,
        gpt2-medium, gpt2-large and gpt2-xl mean the folder $GORP_MODELS/<name> (default
        ./models/<name>); README.md says how to get one. Nothing is ever downloaded."""
        folder = path_or_name
        if path_or_name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl") and not os.path.exists(path_or_name):
            folder = os.path.join(os.environ.get("GORP_MODELS", "models"), path_or_name)
        if os.path.isfile(folder):
            folder = os.path.dirname(folder) or "."
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise FileNotFoundError(f"no GPT-2 checkpoint at {folder}: config.json is missing "
                                    "(see README.md, 'Starting from GPT-2')")
        with open(os.path.join(folder, "config.json")) as f:
            hf = json.load(f)
        config = GPTConfig(block_size=hf.get("n_positions", hf.get("n_ctx", 1024)), vocab_size=hf["vocab_size"],
                           n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True)
        if os.path.isfile(os.path.join(folder, "model.safetensors")):
            sd = load_safetensors(os.path.join(folder, "model.safetensors"))
        elif os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
            try:
                sd = torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(f"{folder}/pytorch_model.bin is not a readable checkpoint: {e}") from None
        else:
            raise FileNotFoundError(f"{folder} holds neither model.safetensors nor pytorch_model.bin")
        model = cls(config)
        sd = gpt2_to_gorp(sd)
        missing = sorted(set(model.state_dict()) - set(sd))
        if missing:
            raise KeyError(f"GPT-2 checkpoint in {folder} lacks {len(missing)} tensors, e.g. {missing[0]}")
        model.load_state_dict(sd)
        return model


def gpt2_to_gorp(sd):
    """Map a Hugging Face GPT-2 state dict onto GPT's names. GPT-2 stores its linears as Conv1D,
    weight (in, out), so those four are transposed. An unknown or missing key is an error."""
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    out = {}
    for key, value in sd.items():
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue  # causal-mask buffers, and the head tied to wte
        if not re.fullmatch(r"(wte|wpe|ln_f)\.(weight|bias)|h\.\d+\.(ln_1|ln_2|attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)", name):
            raise KeyError(f"unknown key in GPT-2 checkpoint: {key}")
        out["transformer." + name] = value.t().contiguous() if name.endswith(conv1d) else value
    out["lm_head.weight"] = out.get("transformer.wte.weight")
    if out["lm_head.weight"] is None:
        raise KeyError("GPT-2 checkpoint has no wte.weight")
    return out


def load_safetensors(path):
    """Read a .safetensors file with torch alone: 8 bytes of header length, a JSON header
    {name: {dtype, shape, data_offsets}}, then the raw little-endian tensor bytes."""
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
    with open(path, "rb") as f:
        raw = f.read()
    try:
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        header.pop("__metadata__", None)
        data = memoryview(raw)[8 + n:]
        sd = {}
        for name, info in header.items():
            start, end = info["data_offsets"]
            if not 0 <= start <= end <= len(data):
                raise ValueError(f"tensor {name} lies outside the file")
            flat = torch.frombuffer(bytearray(data[start:end]), dtype=dtypes[info["dtype"]]) if end > start \
                else torch.empty(0, dtype=dtypes[info["dtype"]])
            sd[name] = flat.reshape(info["shape"])
    except (struct.error, ValueError, KeyError, RuntimeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from None
    return sd


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
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.scaling = r, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=self.weight.device))  # (r, in)
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=self.weight.device))  # (out, r)
        self.lora_dropout = nn.Dropout(dropout)
        # the A matrices of finished tasks, which O-LoRA keeps its new A orthogonal to
        self.register_buffer("old_A", torch.empty(0, self.in_features, device=self.weight.device))  # (k*r, in)
        self.reset_adapter()

    def reset_adapter(self):
        """A fresh adapter: A as nn.Linear initialises its weight (kaiming), B = 0, so the
        adapted layer starts out exactly equal to the base layer."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "old_A"
        if key in state_dict:  # a checkpoint holds as many finished tasks' A as it holds, not as we do
            self.old_A = torch.empty_like(state_dict[key], device=self.weight.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        return out + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merge(self):
        """Fold the adapter into W (W += scaling * B A) and zero B: the layer computes the same
        function, and the cost of a step stays constant however many tasks went before."""
        self.weight += (self.scaling * self.lora_B.float() @ self.lora_A.float()).to(self.weight.dtype)  # (out, in)
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
def end_task(model, fresh_adapter=True):
    """At a task boundary: keep each adapter's A for O-LoRA, fold the adapter into its weight and
    start a fresh one for the next task (fresh_adapter=False keeps one adapter through all
    tasks, unmerged: sequential LoRA)."""
    for _, m in lora_modules(model):
        if fresh_adapter:
            m.old_A = torch.cat([m.old_A, m.lora_A.detach().float()])
            m.merge()
            m.reset_adapter()


def olora_penalty(model):
    """O-LoRA's orthogonality loss: sum_i |A_t A_i^T| over entries, against the finished tasks' A."""
    terms = [(m.lora_A @ m.old_A.to(m.lora_A.dtype).t()).abs().sum() for _, m in lora_modules(model) if len(m.old_A)]
    return torch.stack(terms).sum() if terms else None


# -----------------------------------------------------------------------------
# 3. The projector: the project's own ("hand-rolled") top-r factorisation


def top_r_basis(A, r, exact=False, n_iter=2, seed=0):
    """An orthonormal (m, r) basis of the top-r left singular subspace of A (m, n), in float32.
    Default: a randomized range finder (Halko, Martinsson, Tropp 2011, algorithms 4.4 and 5.1):
    sketch A with r + p random directions, sharpen the sketch with power iterations, each
    re-orthonormalised by QR so small singular values survive in float32, then an exact SVD
    of the small (r+p, n) matrix Q^T A. Cost O(m n r) instead of the O(m n min(m, n)) of a
    full SVD. exact=True uses torch.linalg.svd. r is clamped to min(m, n). NaN and Inf are
    read as 0, so a bad gradient can never make the factorisation fail (GaLore's users hit this)."""
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
    """GaLore's rule for the side: project the longer side away, so R is as small as can be.
    True (m >= n): P holds right singular vectors (r, n) and R = G P^T is (m, r).
    False (m < n): P holds left singular vectors (m, r) and R = P^T G is (r, n).
    The side is decided once and stored in the optimizer state, never re-derived later."""
    return shape[0] >= shape[1]


def project(G, P, right):
    return G @ P.t() if right else P.t() @ G  # (m, r) or (r, n)


def add_projected_back(W, N, P, right, alpha):
    """W += alpha * (N P) or alpha * (P N), as one fused multiply-add with no (m, n) temporary:
    a full-rank weight is read and written once per step, no more."""
    N, P = N.to(W.dtype), P.to(W.dtype)
    if right:
        W.addmm_(N, P, alpha=alpha)  # (m, r) @ (r, n)
    else:
        W.addmm_(P, N, alpha=alpha)  # (m, r) @ (r, n)


# -----------------------------------------------------------------------------
# 4. The shared gradient space (method.md §4)
#
# A space S (d, k), orthonormal columns, lives on a side of the matrix that keeps its meaning
# across projector refreshes and tasks: the m (output) side of a right-projected W, the n
# (input) side of a left-projected W, and the input side d_in of a LoRA A. Everything below
# works on "column form": a matrix whose columns are vectors of that d-dimensional side.


def remove_space(X, S):
    """X (d, c) minus its component in span(S): X - S S^T X."""
    return X - S @ (S.t() @ X)  # (d, c)


def grow_space(S, M, threshold):
    """GPM's rule. M (d, c) is the finished task's first moment in column form. Add the fewest
    top singular directions of M's part outside S such that S then captures at least
    `threshold` of ||M||_F^2; re-orthonormalise; never exceed d."""
    M = M.float()
    total = M.pow(2).sum()
    if S is None:
        S = M.new_zeros(M.size(0), 0)
    if total == 0 or S.size(1) >= M.size(0):
        return S
    residual = remove_space(M, S)
    captured = total - residual.pow(2).sum()  # energy already explained by earlier tasks
    need = threshold * total - captured
    if need <= 0:
        return S  # the space already holds this task's directions: add nothing twice
    U, sv, _ = torch.linalg.svd(residual, full_matrices=False)
    k = int((sv.pow(2).cumsum(0) < need).sum()) + 1  # fewest top directions reaching the threshold
    room = M.size(0) - S.size(1)
    if k >= room:
        warnings.warn(f"shared space is full: all {M.size(0)} directions are now protected")
        k = room
    S = torch.linalg.qr(torch.cat([S, U[:, :k]], dim=1))[0]  # (d, k_old + k), orthonormal again
    return S


def columns(M, right):
    """A projected-space matrix in column form for its space: M (m, r) of a right-projected W
    is already so; M (r, n) of a left-projected W, or (r, d_in) of a LoRA A, is transposed."""
    return M if right else M.t()


# -----------------------------------------------------------------------------
# 5. The optimizer


class GORP(torch.optim.Optimizer):
    """Adam with low-rank gradient projection and a shared gradient space. A param group says
    what its parameters are, with GaLore's keys for the projected ones:
      - rank (int), update_proj_gap (T), scale (alpha): a full-rank weight trained by Adam in
        the rank-r projected space of its gradient (method.md §2); exact_svd=True for
        torch.linalg.svd instead of the hand-rolled factorisation;
      - shared_space=True: gradients and updates are projected off the parameter's shared
        space, which grow_shared_space() extends at the end of a task. On a group without rank
        this is LoRA's A (the space lives on its input side, §3);
      - neither: plain Adam, or AdamW with weight_decay > 0, step for step as torch's AdamW.
    All state is tensors, ints and bools, so state_dict() loads with weights_only=True."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=None,  # GaLore's
                        update_proj_gap=200, scale=1.0, exact_svd=False, shared_space=False)  # defaults
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if (group["rank"] or group["shared_space"]) and p.dim() != 2:
                    raise ValueError(f"projection needs a matrix, got a parameter of shape {tuple(p.shape)}")
                if group["rank"] is not None and group["rank"] < 1:
                    raise ValueError(f"rank must be at least 1, got {group['rank']}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["rank"]:
                    self._projected_step(p, group)
                else:
                    self._adam_step(p, group)
        return loss

    def _moments(self, state, like):
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(like, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(like, memory_format=torch.preserve_format)
        return state["exp_avg"], state["exp_avg_sq"]

    def _adam_direction(self, state, R, group):
        """Adam's bias-corrected direction for gradient R: M_hat / (sqrt(V_hat) + eps)."""
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = self._moments(state, R)
        state["step"] += 1
        exp_avg.lerp_(R, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(R, R, value=1 - beta2)
        bias1, bias2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(group["eps"])  # as torch.optim.AdamW
        return exp_avg / bias1 / denom

    def _adam_step(self, p, group):
        """Plain Adam(W); for LoRA's A with a shared space, gradient and update are taken off it."""
        state, G = self.state[p], p.grad
        S = state.get("space") if group["shared_space"] else None
        # method.md §3, a decision: S lives on A's input side (d_in), which keeps its meaning when a
        # fresh adapter starts; the released code keeps it in A's rank space, which does not
        if S is not None:  # S (d_in, k): G_A <- G_A - G_A S S^T
            G = remove_space(G.float().t(), S).t().to(G.dtype)  # (r, d_in)
        N = self._adam_direction(state, G, group)
        if S is not None:  # Adam's elementwise division leaks back into S: take it off again
            N = remove_space(N.float().t(), S).t().to(N.dtype)
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled weight decay, as AdamW
        p.add_(N, alpha=-group["lr"])

    def _projected_step(self, p, group):
        """method.md §2, one full-rank weight W (m, n)."""
        state, G = self.state[p], p.grad.float()
        if "proj_right" not in state:
            state["proj_right"] = projects_right(G.shape)  # a bool, so state_dict stays plain
        right, step = state["proj_right"], state.get("step", 0)
        if step % group["update_proj_gap"] == 0:  # refresh every T steps, counted from the task's start
            basis = top_r_basis(G.t() if right else G, group["rank"], exact=group["exact_svd"], seed=step)
            state["proj"] = basis.t() if right else basis  # (r, n) or (m, r)
            # Adam's moments are kept across the refresh, as GaLore and the authors do: they
            # are then read in slightly rotated coordinates, which works in practice.
        P = state["proj"]
        R = project(G, P, right)  # (m, r) or (r, n)
        S = state.get("space") if group["shared_space"] else None
        if S is not None:  # take earlier tasks' directions out (method.md §2.3)
            R = columns(remove_space(columns(R, right), S), right)
        N = self._adam_direction(state, R, group)
        if S is not None:  # the elementwise division leaks back into S: take it off again
            N = columns(remove_space(columns(N, right), S), right)
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        add_projected_back(p, N, P, right, alpha=-group["lr"] * group["scale"])  # effective lr = lr * scale

    # -- the shared space across tasks

    def grow_shared_space(self, threshold=0.9):
        """At the end of a task: grow every shared-space parameter's basis from its Adam first
        moment (method.md §4). Returns {param: dimension of its space}."""
        sizes = {}
        for group in self.param_groups:
            if not group["shared_space"]:
                continue
            for p in group["params"]:
                state = self.state[p]
                if "exp_avg" not in state:
                    continue  # never stepped in this task: nothing learned to protect
                right = state.get("proj_right", False)  # a LoRA A (r, d_in) keeps its space like a left W
                state["space"] = grow_space(state.get("space"), columns(state["exp_avg"], right), threshold)
                sizes[p] = state["space"].size(1)
        return sizes

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


def param_groups(model, lr=1e-3, full_rank=None, full_rank_lr=None, rank=8, update_proj_gap=10,
                 scale=1.0, shared_space=False, train_rest=False, rest_lr=None, exact_svd=False):
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
              dict(params=projected, lr=full_rank_lr or lr, rank=rank, update_proj_gap=update_proj_gap,
                   scale=scale, shared_space=shared_space, exact_svd=exact_svd),
              dict(params=rest, lr=rest_lr or lr)]
    groups = [g for g in groups if g["params"]]
    trained = {id(p) for g in groups for p in g["params"]}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)
    return groups
