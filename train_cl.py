"""
Continual learning, task after task, with GORP or a baseline, ending in the forgetting table.

    python train_cl.py                                  # GORP on the built-in toy suite, CPU, ~2 min
    python train_cl.py --method=all                     # every method, one side-by-side table
    python train_cl.py --method=seqft --seed=2          # any key below as --key=value
    python train_cl.py config/my_run.py --lr=3e-4       # or a Python file of assignments
    python train_cl.py --data_dir=../CL_Benchmark --order=1 --init_from=gpt2   # the real benchmark
    python train_cl.py --help                           # every key, its default and what it does
    torchrun --standalone --nproc_per_node=4 train_cl.py --data_dir=...   # data parallel on 4 GPUs

After each task every task of the sequence is evaluated (greedy generation, exact match), so
a[i][j] = accuracy on task j after training task i; the end prints that matrix with AA, BWT
and forgetting (method.md §6) and writes out_dir/results.json.
"""

import ast
import collections
import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch's, when numpy is absent: harmless here
import torch  # noqa: E402
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import gorp
from data import benchmark, toy

# -----------------------------------------------------------------------------
# configuration: every key can be set as --key=value or in a Python config file
# what and where
method = "gorp"  # gorp, seqft, seqlora, inclora, olora, galore, mtl, or all (each in turn, one table)
out_dir = "out"  # results.json, checkpoints and the cached base model go here
data_dir = "toy"  # a CL_Benchmark-layout folder, or toy: the built-in suite, written to out_dir/toy-<seed>
order = 0  # 1..6: a task order of the benchmark (method.md §6); 0: use tasks
tasks = ""  # comma list of tasks in training order; empty with order 0: every task of data_dir
max_train = 1000  # training examples per task at most (0: all)
max_test = 200  # test examples per task at most (0: all)
max_len = 128  # tokens of prompt and answer at most; a longer sentence is cut, never the template
valid = False  # tune: evaluate on max_test examples held out of each task's train.json (a fifth with 0), never on test.json
# the model
init_from = "auto"  # auto (pretrain for the toy suite, smollm2 for a benchmark folder), pretrain (a small GPT pretrained on the toy's unlabeled text, cached), scratch, a checkpoint .pt, a Hugging Face folder or .gguf file, or a name: smollm2, gpt2
n_layer = 4  # model size when not loaded from a checkpoint
n_head = 4
n_embd = 128
block_size = 128
pretrain_iters = 300  # steps of language-model pretraining for init_from=pretrain
pretrain_lr = 3e-3
pretrain_batch_size = 64  # sequences per pretraining step
pretrain_vocab = 8192  # the pretraining loss predicts the text's commonest tokens, this many at most
# the method (method.md §1-5)
full_rank = True  # GORP's L: train the full_rank_pattern weights by projected Adam (ablation switch)
shared_space = True  # GORP's S: the shared gradient space on LoRA A and the full-rank weights (ablation switch)
lora_pattern = "auto"  # regex of the linears that get LoRA adapters (auto: the model family's, FAMILY_PATTERNS)
full_rank_pattern = "auto"  # regex of the weights GORP trains at full rank (auto: the family's)
galore_pattern = "auto"  # regex of the weights galore trains by projected Adam (auto: every block matrix)
lora_r = 8  # LoRA rank
lora_alpha = 16.0  # LoRA scaling is lora_alpha / lora_r
lora_dropout = 0.0
rank = 8  # rank r of the gradient projector
update_proj_gap = 10  # T: steps between projector refreshes (the paper's 10)
scale = 1.0  # alpha: the projected update is scaled by it, so the effective lr is full_rank_lr * scale
space_threshold = 0.9  # eps: energy of a task's first moment the shared space must capture
olora_lambda1 = 0.5  # O-LoRA's orthogonality weight
olora_lambda2 = 0.0  # O-LoRA's L2 weight: on the unsquared norms of the new adapter's A and B (its 15-task runs: 0.1)
exact_svd = False  # torch.linalg.svd instead of the hand-rolled factorisation
# three questions the paper leaves open (method.md §5b), each a switch; defaults measured (README.md, "Open questions")
fresh_A_off_space = False  # a fresh adapter's A starts off its layer's shared space, not only its updates
refresh_moments = "keep"  # at a projector refresh Adam's moments are kept (GaLore's way), sign-aligned (align), or carried into the new basis (rotate)
space_from = "projected"  # the shared space grows from the first moment of the gradient after (projected) or before (raw) the space is taken out, or for LoRA A from the layer's inputs (inputs)
space_sample = 32  # training examples a task is sampled by: the inputs space_from=inputs grows from, and the coverage measured
galore_rank = 8  # galore's projector rank (GORP's, so the two project alike)
galore_update_proj_gap = 200  # galore's T, as GaLore's README trains
galore_scale = 0.25  # galore's alpha, as GaLore's README trains: its effective lr on the matrices is galore_lr * 0.25
# training. Every method has its own learning rate, each chosen by the same procedure: a sweep on
# examples held out of the toy suite's training sets (--valid=True, seeds 1337 and 2), never on
# test sets, the value with the best mean AA; the sweep and its figures are in README.md,
# "Tuning". The paper's (LoRA 1e-3, full rank 1e-5) are for T5-large.
epochs = 2  # passes over each task's training data
batch_size = 16
lr = 3e-4  # gorp's (and mtl's) LoRA adapters
full_rank_lr = 3e-4  # gorp's projected full-rank weights: the effective lr is full_rank_lr * scale
seqlora_lr = 1e-4  # seqlora's one adapter (the sweep's lowest value won: lower was not tried)
inclora_lr = 3e-4  # inclora's adapters
olora_lr = 3e-4  # olora's adapters
ft_lr = 3e-5  # seqft: AdamW on every weight (the sweep's lowest value won: lower was not tried)
galore_lr = 1e-4  # galore: one lr for every weight, as GaLore's usage; effective on the matrices: galore_lr * galore_scale (the lowest value tried)
weight_decay = 0.0
grad_clip = 1.0  # clip the gradient norm to this (0: off)
eval_batch_size = 64
eval_tasks = "all"  # after each task evaluate all tasks; seen: those trained so far (AA, BWT and forgetting need no more); new: the one just trained, and all at the end (AA and BWT need no more)
# system
device = "auto"  # auto (cuda, then mps, then cpu), or cpu, cuda, cuda:1, mps
dtype = "auto"  # auto (bfloat16 autocast on a GPU or CPU with native bfloat16, else float32), float32, bfloat16, float16
seed = 1337
compile = False  # torch.compile the training forward pass (PyTorch 2, a GPU)
resume = False  # continue an interrupted run in out_dir from its last finished task
plot = False  # write out_dir/forgetting.png (needs matplotlib)
summarize = ""  # comma list of finished --method=all out_dirs (other seeds): print mean and spread per method, train nothing; with plot, draw the first one's runs
log_every = 2.0  # seconds between progress lines
CONFIG_KEYS = [k for k, v in list(globals().items()) if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
# -----------------------------------------------------------------------------

# Each method is a small configuration of the same adapter and optimizer machinery:
#   lora: none, one (a single adapter through all tasks), fresh (a new adapter per task, the
#   old merged); full_rank: the regex of weights trained by projected Adam; shared: the
#   shared space; rest: train every other weight by plain AdamW; joint: one model on all tasks;
#   lr: the config key that holds the method's own learning rate.
METHODS = {
    "gorp": dict(lora="fresh", full_rank="pattern", shared=True, lr="lr"),
    "seqft": dict(lora="none", rest=True, lr="ft_lr"),
    "seqlora": dict(lora="one", lr="seqlora_lr"),
    "inclora": dict(lora="fresh", lr="inclora_lr"),
    "olora": dict(lora="fresh", olora=True, lr="olora_lr"),
    "galore": dict(lora="none", full_rank="galore", rest=True, lr="galore_lr"),
    "mtl": dict(lora="fresh", full_rank="pattern", joint=True, lr="lr"),
}


# The method's places in each model family: LoRA on the attention, GORP's full-rank weights in
# the MLP. GPT-2: the fused c_attn and c_fc; the LLaMA family: the paper's own LLaMA-2 setting
# (LoRA on q_proj and v_proj, full rank on gate_proj). galore trains every block matrix.
FAMILY_PATTERNS = {
    "gpt2": dict(lora=r"attn\.c_attn$", full_rank=r"mlp\.c_fc\.weight$", galore=r"\.(c_attn|c_proj|c_fc)\.weight$"),
    "llama": dict(lora=r"self_attn\.(q_proj|v_proj)$", full_rank=r"mlp\.gate_proj\.weight$",
                  galore=r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$"),
}


class ConfigError(ValueError):
    pass


def config_help():
    """Every key with its default and its comment, read from this file's config block."""
    lines = []
    with open(__file__) as f:
        for line in f:
            m = re.match(r"^(\w+) = (.+?)(?:  # (.*))?$", line.rstrip())
            if m and m.group(1) in CONFIG_KEYS:
                lines.append(f"  --{m.group(1)}={m.group(2)}" + (f"    {m.group(3)}" if m.group(3) else ""))
    return "usage: python train_cl.py [config.py] [--key=value ...]\n" + "\n".join(lines)


def parse_config(argv):
    """nanoGPT's configurator, with errors instead of surprises: a config file of plain Python
    assignments, then --key=value; an unknown key or a value of the wrong type is an error."""
    config = {k: globals()[k] for k in CONFIG_KEYS}

    def assign(key, value):
        if key not in config:
            raise ConfigError(f"unknown config key {key!r} (python train_cl.py --help lists them)")
        want = type(config[key])
        if want is float and type(value) is int:
            value = float(value)
        if type(value) is not want:
            raise ConfigError(f"--{key} wants a {want.__name__}, got {value!r}")
        config[key] = value

    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise ConfigError(f"config file {arg} does not exist")
            scope = {}
            try:
                exec(open(arg).read(), {}, scope)
            except Exception as e:
                raise ConfigError(f"config file {arg} does not run: {e}") from None
            for key, value in scope.items():
                if not key.startswith("_"):
                    assign(key, value)
            continue
        key, eq, text = arg[2:].partition("=")
        if not eq:
            raise ConfigError(f"expected --key=value, got {arg}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare string
        if isinstance(config.get(key), str):
            value = text
        assign(key, value)
    check_config(config)
    return config


def check_config(c):
    if c["init_from"] == "auto":
        c["init_from"] = "pretrain" if c["data_dir"] == "toy" else "smollm2"
    if c["method"] not in METHODS and c["method"] != "all":
        raise ConfigError(f"unknown method {c['method']!r}: choose one of {', '.join(METHODS)}, all")
    if c["order"] and c["order"] not in benchmark.ORDERS:
        raise ConfigError(f"unknown order {c['order']}: orders are 1 to {len(benchmark.ORDERS)}")
    for key in ("rank", "lora_r", "update_proj_gap", "galore_rank", "galore_update_proj_gap", "batch_size", "eval_batch_size", "epochs", "max_len",
                "n_layer", "n_head", "n_embd", "block_size", "pretrain_vocab"):
        if c[key] < 1:
            raise ConfigError(f"--{key} must be at least 1, got {c[key]}")
    if c["init_from"] in ("scratch", "pretrain") and c["max_len"] > c["block_size"]:
        raise ConfigError(f"--max_len {c['max_len']} is longer than --block_size {c['block_size']}")
    for key, allowed in (("refresh_moments", ("keep", "align", "rotate")), ("space_from", ("projected", "raw", "inputs")),
                         ("eval_tasks", ("all", "seen", "new")), ("dtype", ("auto", "float32", "bfloat16", "float16"))):
        if c[key] not in allowed:
            raise ConfigError(f"--{key} must be one of {', '.join(allowed)}, got {c[key]!r}")
    if not 0 < c["space_threshold"] <= 1:
        raise ConfigError(f"--space_threshold must be in (0, 1], got {c['space_threshold']}")


# -----------------------------------------------------------------------------
# the data


def tokenizer(init_from="pretrain"):
    """The base model's own tokenizer (gorp.load_tokenizer) and its end token; the small GPTs made
    here, and this project's checkpoints of them, read GPT-2's."""
    source = "gpt2" if init_from in ("scratch", "pretrain") or init_from.endswith(".pt") else init_from
    try:
        enc = gorp.load_tokenizer(source)
    except (FileNotFoundError, ValueError, KeyError, ImportError) as e:
        raise ConfigError(f"init_from {source}: {e}") from None
    return enc, enc.end_token


def task_list(c):
    """[(task, group)] in training order."""
    found = benchmark.find_tasks(c["data_dir"])
    names = [t for t in c["tasks"].split(",") if t] if c["tasks"] else benchmark.ORDERS.get(c["order"], sorted(found))
    if c["data_dir"] == c["_toy_dir"] and not c["tasks"]:
        names = toy.TASKS
    missing = [t for t in names if t not in found]
    if missing:
        raise benchmark.DataError(f"task {missing[0]} is not in {c['data_dir']} (it has: {', '.join(found)})")
    return [(t, found[t]) for t in names]


def load_tasks(c, enc, eot, log=print):
    """Per task: its labels and its train and test examples as (prompt ids, answer ids). With
    valid, the test examples are held out of train.json instead, so tuning never sees test.json."""
    out = []
    for task, group in task_list(c):
        if c["valid"]:
            records, labels = benchmark.load_split(c["data_dir"], group, task, "train", log=log)
            records = random.Random(c["seed"]).sample(records, len(records))
            held = c["max_test"] or len(records) // 5
            if held >= len(records):
                raise benchmark.DataError(f"task {task} has {len(records)} training examples: too few to hold out {held}")
            splits = dict(train=records[held:][: c["max_train"] or None], test=records[:held])
        else:
            splits = {}
            for split, cap in (("train", c["max_train"]), ("test", c["max_test"])):
                splits[split], labels = benchmark.load_split(c["data_dir"], group, task, split, cap, c["seed"], log)
        data = {split: [benchmark.encode_example(enc, group, task, labels, r, c["max_len"], eot) for r in records]
                for split, records in splits.items()}
        out.append(dict(name=task, group=group, labels=labels, **data))
    return out


def collate(examples, device):
    """Right-padded (B, T) inputs and targets; the loss falls on the answer tokens alone."""
    T = max(len(p) + len(a) for p, a in examples) - 1
    idx = torch.zeros(len(examples), T, dtype=torch.long)
    targets = torch.full((len(examples), T), -1, dtype=torch.long)
    for b, (prompt, answer) in enumerate(examples):
        seq = prompt + answer
        idx[b, : len(seq) - 1] = torch.tensor(seq[:-1])
        targets[b, len(prompt) - 1: len(seq) - 1] = torch.tensor(answer)
    pin = device.type == "cuda"
    return (idx.pin_memory() if pin else idx).to(device, non_blocking=pin), \
        (targets.pin_memory() if pin else targets).to(device, non_blocking=pin)


# -----------------------------------------------------------------------------
# the model


def pick_device(c):
    name = c["device"]
    if c["_world"] > 1 and torch.cuda.is_available() and name in ("auto", "cuda"):
        name = f"cuda:{os.environ['LOCAL_RANK']}"  # torchrun: one GPU per process
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name} is not available: torch sees no CUDA GPU")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device mps is not available")
    if name != "cpu" and not name.startswith(("cuda", "mps")):
        raise ConfigError(f"unknown device {name!r}: auto, cpu, cuda, cuda:N or mps")
    return torch.device(name)


def set_precision(c, width):
    """Choose the autocast dtype for a model `width` wide; returns the choice in words. auto:
    bfloat16 on a GPU that has it, and on a CPU that multiplies it natively when the model is 512
    or more wide: narrower, casts eat the faster matmuls (the toy's 128-wide GPT gains 1.1x,
    SmolLM2 2.1x; bench.py), and bfloat16's rounding would move the toy's chaotic results.
    Weights and optimizer state stay float32."""
    device, dtype, why = c["_device"], c["dtype"], ""
    if dtype == "auto":
        if device.type == "cuda":
            fast, why = torch.cuda.is_bf16_supported(), "this GPU has bfloat16"
        else:
            fast = device.type == "cpu" and cpu_has_native_bf16() and width >= 512
            why = f"this CPU has native bfloat16, the model is {width} wide" if fast else ""
        dtype = "bfloat16" if fast else "float32"
    c["_dtype"] = dtype  # recorded in results.json: auto resolves differently on another machine
    ptdtype = getattr(torch, dtype)
    c["_autocast"] = (lambda: torch.autocast(device.type, dtype=ptdtype)) if dtype != "float32" else nullcontext
    return f"{dtype} autocast (auto: {why})" if why else f"{dtype} autocast" if dtype != "float32" else "float32"


def cpu_has_native_bf16():
    """True where the CPU multiplies bfloat16 in hardware (x86's AVX512_BF16 or AMX, ARM's BF16
    extension): there a bfloat16 matmul runs several times faster than a float32 one (bench.py
    measures it); elsewhere it is emulated, and slower. Read from the CPU's flags, not timed, so
    the same machine makes the same choice every run."""
    try:
        with open("/proc/cpuinfo") as f:
            return bool(re.search(r"\b(avx512_bf16|amx_bf16|bf16)\b", f.read()))
    except OSError:
        return False


def base_model(c, enc, eot, log):
    """The model every method starts from, weights in float32 (autocast does the rest)."""
    init = c["init_from"]
    if init in ("scratch", "pretrain"):
        config = gorp.GPTConfig(block_size=c["block_size"], n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"])
        torch.manual_seed(c["seed"])
        model = gorp.GPT(config)
        return pretrained_base(c, model, enc, eot, log) if init == "pretrain" else model
    if init.endswith(".pt"):
        if not os.path.isfile(init):
            raise ConfigError(f"init_from {init} does not exist")
        try:
            ckpt = torch.load(init, map_location="cpu", weights_only=True)
            model = gorp.GPT(gorp.GPTConfig(**ckpt["model_args"]))
            model.load_state_dict(ckpt["model"])
        except Exception as e:
            raise ConfigError(f"init_from {init} is not a checkpoint of this project ({str(e).splitlines()[0]})") from None
        return model
    try:
        return gorp.GPT.from_pretrained(init)
    except (FileNotFoundError, KeyError, ValueError, ImportError) as e:
        raise ConfigError(f"init_from {init}: {str(e).strip(chr(34))}") from None


def pretrained_base(c, model, enc, eot, log):
    """Pretrain the small GPT as a language model on the toy suite's unlabeled text (its
    pretrain.json), once; the result is cached in out_dir and reused."""
    docs = benchmark.pretraining_text(c["data_dir"], enc, eot, c["block_size"])
    key = dict(model=vars(model.config), iters=c["pretrain_iters"], lr=c["pretrain_lr"], seed=c["seed"],
               batch=c["pretrain_batch_size"], vocab=c["pretrain_vocab"],
               n=len(docs), first=docs[0][:32], last=docs[-1][:32])
    path = os.path.join(c["out_dir"], f"base-{hash_of(key) % 10 ** 10}.pt")  # named by what made it
    if os.path.isfile(path):
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
        except Exception as e:
            raise ConfigError(f"cached base model {path} is unreadable ({str(e).splitlines()[0]}): delete it") from None
        log(f"base model: {path} (cached)")
        return model
    counts = collections.Counter(t for d in docs for t in d)
    # a 50257-way softmax is most of the small model's cost, so the loss predicts the text's
    # commonest tokens alone (rare ones are still read as inputs). The others keep their random
    # logits; the toy's wrong answers are nonetheless its own words (README.md, "The toy suite")
    vocab = torch.tensor(sorted(t for t, _ in counts.most_common(c["pretrain_vocab"])))
    index = torch.full((model.config.vocab_size,), -1, dtype=torch.long)
    index[vocab] = torch.arange(len(vocab))
    device = c["_device"]
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=c["pretrain_lr"], weight_decay=0.0, betas=(0.9, 0.95))
    rng, t0 = random.Random(c["seed"]), time.time()
    log(f"pretraining a base model on {len(docs)} texts (predicting {len(vocab)} of their {len(counts)} distinct tokens), "
        f"{c['pretrain_iters']} steps; cached at {path}")
    for step in range(c["pretrain_iters"]):
        batch = rng.sample(docs, min(c["pretrain_batch_size"], len(docs)))
        T = min(max(map(len, batch)), c["block_size"])
        idx = torch.full((len(batch), T), eot)
        targets = torch.full((len(batch), T), -1)
        for b, d in enumerate(batch):
            d = [eot] + d[: T]
            idx[b, : len(d) - 1], targets[b, : len(d) - 1] = torch.tensor(d[:-1]), index[torch.tensor(d[1:])]
        lr_now = c["pretrain_lr"] * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / c["pretrain_iters"]))
        for g in opt.param_groups:
            g["lr"] = lr_now
        with c["_autocast"]():
            loss = model(idx.to(device), targets.to(device), vocab=vocab.to(device))[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == c["pretrain_iters"] - 1:
            log(f"  pretrain step {step}/{c['pretrain_iters']} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    model.cpu()
    if c["_rank"] == 0:  # every process pretrained the same model from the same seed
        save_atomic(dict(model=model.state_dict(), model_args=vars(model.config)), path)
    return model


def provenance(c, model):
    """What a results.json was made from: the weights' file and a digest of it, the types they were
    stored in, the precision run, and the code's git commit (dirty: tracked files had changed)."""
    source = getattr(model, "source", None)
    digest = None
    if source:
        path = source["path"]
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".safetensors", ".bin"))) \
            if os.path.isdir(path) else [path]
        h = hashlib.sha256()
        for f in files:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
        digest = h.hexdigest()
    here = os.path.dirname(os.path.abspath(__file__))
    git = lambda *a: subprocess.run(["git", "-C", here, *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    return dict(weights=source["path"] if source else c["init_from"], sha256=digest,
                stored=source["stored"] if source else "float32", precision=c["_dtype"],
                commit=git("rev-parse", "HEAD") or None, dirty=bool(git("status", "--porcelain", "--untracked-files=no")))


def hash_of(obj):
    return int(hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12], 16)


def prepare_model(c, spec, base_state, model_args):
    """A copy of the base model with the method's adapters."""
    model = gorp.GPT(gorp.GPTConfig(**model_args))
    model.load_state_dict(base_state)
    if spec["lora"] != "none":
        gorp.inject_lora(model, pattern(c, "lora", model), c["lora_r"], c["lora_alpha"], c["lora_dropout"])
    return model.to(c["_device"])


def pattern(c, kind, model):
    """The regex of the lora, full_rank or galore weights: the config's, or the model family's."""
    return FAMILY_PATTERNS[model.config.family][kind] if c[f"{kind}_pattern"] == "auto" else c[f"{kind}_pattern"]


def make_optimizer(c, spec, model):
    lr = c[spec["lr"]]  # the method's own learning rate
    full_rank, projector = spec.get("full_rank"), dict(full_rank_lr=c["full_rank_lr"], rank=c["rank"],
                                                       update_proj_gap=c["update_proj_gap"], scale=c["scale"])
    if full_rank == "pattern":  # GORP's L, which the full_rank switch turns off
        full_rank = pattern(c, "full_rank", model) if c["full_rank"] or spec.get("joint") else None
    elif full_rank == "galore":  # GaLore's own usage: one lr for every weight, its own rank, gap and scale
        full_rank, projector = pattern(c, "galore", model), dict(full_rank_lr=lr, rank=c["galore_rank"], scale=c["galore_scale"],
                                                                 update_proj_gap=c["galore_update_proj_gap"])
    groups = gorp.param_groups(model, lr=lr, rest_lr=lr, full_rank=full_rank, **projector,
                               shared_space=spec.get("shared", False) and c["shared_space"],
                               train_rest=spec.get("rest", False), exact_svd=c["exact_svd"],
                               refresh_moments=c["refresh_moments"], space_from=c["space_from"])
    return gorp.GORP(groups, lr=lr, betas=(0.9, 0.999), weight_decay=c["weight_decay"])


def sample_batches(c, examples):
    """A fixed sample of a task's training examples, batched as gorp.input_grams reads them."""
    sample = examples[: c["space_sample"]]
    for i in range(0, len(sample), c["batch_size"]):
        chunk = sample[i: i + c["batch_size"]]
        idx, _ = collate(chunk, c["_device"])
        lengths = torch.tensor([len(p) + len(a) - 1 for p, a in chunk], device=idx.device)
        yield idx, torch.arange(idx.size(1), device=idx.device)[None] < lengths[:, None]  # (B, T)


def kind_of(name):
    """A parameter's name without its layer: model.layers.3.mlp.gate_proj.weight -> mlp.gate_proj.weight."""
    return re.sub(r"^.*?\.\d+\.", "", name)


def by_kind(values):
    """{name: value} -> {kind: [mean, max]} over the layers."""
    kinds = collections.defaultdict(list)
    for name, v in values.items():
        kinds[kind_of(name)].append(v)
    return {k: [sum(vs) / len(vs), max(vs)] for k, vs in kinds.items()}


@torch.no_grad()
def movement(model, opt, start):
    """How far a task moved each trained group: |W - W_start| / |W_start| for the projected
    full-rank weights, |scaling B A| / |W| for each adapter (before it is merged)."""
    named = dict(model.named_parameters())
    moved = {n: float((named[n] - w).norm() / w.norm()) for n, w in start.items()}
    for n, m in gorp.lora_modules(model):
        moved[n + ".BA"] = float(m.scaling * (m.lora_B.float() @ m.lora_A.float()).norm() / m.weight.float().norm())
    return by_kind(moved)


def space_report(c, model, opt, seen):
    """The shared spaces' sizes, and the share of the tasks seen so far's layer-input energy that
    lies inside each LoRA A's space (a fixed sample of their training examples, through the model now)."""
    name_of = {p: n for n, p in model.named_parameters()}
    spaces = {name_of[p]: S for p, S in opt.shared_spaces().items()}
    model.eval()
    grams = gorp.input_grams(model, (b for t in seen for b in sample_batches(c, t)))
    model.train()
    names = {m: n + ".lora_A" for n, m in gorp.lora_modules(model)}
    cover = {names[m]: gorp.coverage(spaces[names[m]], G) for m, G in grams.items() if names[m] in spaces}
    return by_kind({n: S.size(1) for n, S in spaces.items()}), by_kind(cover)


def count_params(model, opt):
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for g in opt.param_groups for p in g["params"])
    projected = sum(p.numel() for g in opt.param_groups if g["rank"] for p in g["params"])
    return total, trainable, projected


# -----------------------------------------------------------------------------
# training and evaluation


class NonFinite(RuntimeError):
    pass


def train_task(c, model, opt, examples, spec, task_name, log):
    """One task: epochs over its examples in seeded random order. Returns (tokens, seconds).
    Under torchrun each process takes every world-th example of the global batch, and the loss
    is weighted so that DDP's mean of gradients is the gradient of the global batch's mean loss."""
    model.train()
    rank, world = c["_rank"], c["_world"]
    forward = model
    if c["compile"]:
        forward = torch.compile(forward)
    if world > 1:
        forward = DDP(forward, device_ids=[c["_device"].index] if c["_device"].type == "cuda" else None)
    rng = random.Random(f"{c['seed']}-{task_name}")
    steps_per_epoch = math.ceil(len(examples) / c["batch_size"])
    total = steps_per_epoch * c["epochs"]
    params = [p for g in opt.param_groups for p in g["params"]]
    finite = torch.ones((), dtype=torch.bool, device=c["_device"])
    tokens, t0, last_log, step = 0, time.time(), time.time(), 0
    for epoch in range(c["epochs"]):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order), c["batch_size"]):
            batch = [examples[j] for j in order[i: i + c["batch_size"]]]
            if len(batch) < world:
                continue  # a last batch too small to give every process an example
            idx, targets = collate(batch[rank::world], c["_device"])
            with c["_autocast"]():
                logits, loss = forward(idx, targets)
            answer_tokens = sum(len(a) for _, a in batch)
            local = loss * (sum(len(a) for _, a in batch[rank::world]) * world / answer_tokens)  # world 1: loss
            penalty = gorp.olora_penalty(model) if spec.get("olora") else None
            objective = local  # O-LoRA's penalties are the same on every process: not weighted
            if penalty is not None:  # none in the first task, which has no finished adapter to be orthogonal to
                objective = objective + c["olora_lambda1"] * penalty
            if spec.get("olora") and c["olora_lambda2"]:  # the L2 term acts from the first task on
                objective = objective + c["olora_lambda2"] * gorp.olora_l2(model)
            opt.zero_grad(set_to_none=True)
            objective.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, c["grad_clip"] or float("inf"))
            finite &= torch.isfinite(norm) & torch.isfinite(objective.detach())  # no host sync here
            opt.step()
            step += 1
            tokens += sum(len(p) + len(a) - 1 for p, a in batch)
            if time.time() - last_log >= c["log_every"] or step == total:
                if not bool(finite):  # one sync per progress line, not per step
                    raise NonFinite(f"non-finite loss or gradient in task {task_name} at or before step {step}")
                elapsed = time.time() - t0
                extra = f" | olora {penalty.item():.3f}" if penalty is not None else ""
                log(f"  {task_name} step {step}/{total} | loss {loss.item():.4f}{extra} | "
                    f"{tokens / elapsed:,.0f} tok/s | {elapsed / step * (total - step):.0f}s left")
                last_log = time.time()
    return tokens, time.time() - t0


@torch.no_grad()
def evaluate(c, model, task, enc, eot):
    """Accuracy in percent: greedy generation, exact match after normalisation (method.md §6);
    and the percent of answers that are none of the task's labels (another task's words, say),
    which tells forgetting what to answer from answering the wrong option."""
    model.eval()
    examples = sorted(task["test"], key=lambda e: len(e[0]))  # similar lengths batch together
    examples = examples[c["_rank"]::c["_world"]]  # under torchrun each process takes its share
    max_new = max(len(enc.encode_ordinary(" " + label)) for label in task["labels"]) + 1
    labels = {benchmark.normalize(label) for label in task["labels"]}
    counts = torch.zeros(2, dtype=torch.long)  # right, off-label
    for i in range(0, len(examples), c["eval_batch_size"]):
        chunk = examples[i: i + c["eval_batch_size"]]
        with c["_autocast"]():
            outs = model.generate([p for p, _ in chunk], max_new, stop_token=eot)
        for out, (_, answer) in zip(outs, chunk):
            said = benchmark.normalize(enc.decode(out))
            counts[0] += said == benchmark.normalize(enc.decode(answer[:-1]))
            counts[1] += said not in labels
    model.train()
    if c["_world"] > 1:
        counts = counts.to(c["_device"])
        dist.all_reduce(counts)
    right, off_label = (100.0 * int(n) / len(task["test"]) for n in counts)
    return right, off_label


def evaluated(c, spec, i, j, n):
    """Whether task j is evaluated after training stage i of n (eval_tasks)."""
    if c["eval_tasks"] == "all" or spec.get("joint") or i == n - 1:
        return True
    return j == i if c["eval_tasks"] == "new" else j <= i


def metrics(acc):
    """AA, BWT and forgetting of an accuracy matrix (rows: after task i; method.md §6).
    A single row (mtl) has no backward transfer: BWT and forgetting are None; forgetting is None
    too where a task went unevaluated between learning it and the end (eval_tasks=new)."""
    last, n = acc[-1], len(acc[-1])
    aa = sum(last) / n
    if len(acc) < n or n < 2:
        return aa, None, None
    bwt = sum(last[j] - acc[j][j] for j in range(n - 1)) / (n - 1)
    if any(acc[i][j] is None for j in range(n - 1) for i in range(j, n - 1)):
        return aa, bwt, None
    forgetting = sum(max(acc[i][j] for i in range(n - 1) if acc[i][j] is not None) - last[j] for j in range(n - 1)) / (n - 1)
    return aa, bwt, forgetting


def fmt(x, spec="6.1f"):
    return "     -" if x is None else format(x, spec)


def matrix_table(acc, names):
    width = max(8, max(len(n) for n in names) + 1)
    lines = ["after task".ljust(14) + "".join(n[: width - 1].rjust(width) for n in names)]
    for i, row in enumerate(acc):
        label = f"{i + 1} {names[i] if len(acc) == len(names) else 'all tasks'}"[:13]
        lines.append(label.ljust(14) + "".join(f"{'-':>{width}}" if a is None else f"{a:{width}.1f}" for a in row))
    aa, bwt, forgetting = metrics(acc)
    lines.append(f"AA {aa:.1f}   BWT {fmt(bwt, '.1f').strip()}   forgetting {fmt(forgetting, '.1f').strip()}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# checkpoints: written whole or not at all


def save_atomic(obj, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic: a reader sees the old file or the new one, never half


def save_checkpoint(c, run_dir, model, spaces, acc, stats, done):
    save_atomic(dict(model=model.state_dict(), spaces=spaces, acc=acc, stats=stats, done=done,
                     method=c["method"], tasks=c["_task_names"], config=public(c)), os.path.join(run_dir, "ckpt.pt"))


def load_checkpoint(c, run_dir):
    """The run's last checkpoint, or None where it was stopped before its first one."""
    path = os.path.join(run_dir, "ckpt.pt")
    if not os.path.isfile(path):
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"--resume: {path} is not readable ({str(e).splitlines()[0]})") from None
    if ckpt["method"] != c["method"] or ckpt["tasks"] != c["_task_names"]:
        raise ConfigError(f"--resume: {path} was made by method {ckpt['method']} on tasks {','.join(ckpt['tasks'])}, "
                          f"not {c['method']} on {','.join(c['_task_names'])}")
    return ckpt


def public(c):
    return {k: v for k, v in c.items() if not k.startswith("_")}


# -----------------------------------------------------------------------------
# one method over the whole sequence


def run_method(c, tasks, base_state, model_args, enc, eot, log):
    spec = METHODS[c["method"]]
    run_dir = c["_run_dir"]
    os.makedirs(run_dir, exist_ok=True)
    names = [t["name"] for t in tasks]
    torch.manual_seed(c["seed"])
    model = prepare_model(c, spec, base_state, model_args)
    stages = [("all", [e for t in tasks for e in t["train"]])] if spec.get("joint") else \
        [(t["name"], t["train"]) for t in tasks]
    acc, stats, spaces, start = [], [], {}, 0
    ckpt = load_checkpoint(c, run_dir) if c["resume"] else None
    if ckpt:
        model.load_state_dict(ckpt["model"])
        acc, stats, spaces, start = ckpt["acc"], ckpt["stats"], ckpt["spaces"], ckpt["done"]
        log(f"resuming {c['method']} after task {start} of {len(stages)} from {run_dir}/ckpt.pt")
    elif c["resume"]:  # killed before its first checkpoint, or not started: the same run, from its start
        log(f"--resume: no checkpoint in {run_dir} yet, so {c['method']} starts from its beginning")
    named = dict(model.named_parameters())
    # method.md §4, two decisions: one model carries every task's updates, full-rank weights
    # included (the released code reloads the original weights for each task), and the shared
    # spaces persist into every later task (the released code reads them from the wrong folder)
    for i in range(start, len(stages)):
        stage, examples = stages[i]
        torch.manual_seed(c["seed"] * 1000 + i)  # each task's randomness depends on the seed and the task alone
        opt = make_optimizer(c, spec, model)
        opt.load_shared_spaces({named[n]: S for n, S in spaces.items()})
        if c["fresh_A_off_space"]:
            opt.start_adapters_off_spaces()
        total, trainable, projected = count_params(model, opt)
        log(f"task {i + 1}/{len(stages)} {stage}: {len(examples)} examples | params {total:,} total, "
            f"{trainable:,} trained, {projected:,} of them projected")
        start_weights = {n: p.detach().clone() for n, p in named.items() if any(p is q for g in opt.param_groups
                                                                               if g["rank"] for q in g["params"])}
        tokens, seconds = train_task(c, model, opt, examples, spec, stage, log)
        state_bytes = opt.state_bytes()
        moved, space, cover = movement(model, opt, start_weights), {}, {}
        log("  moved (|change| / |weight|, mean and max over layers): "
            + ", ".join(f"{k} {v[0]:.1e} ({v[1]:.1e})" for k, v in moved.items()))
        if spec.get("shared") and c["shared_space"]:
            inputs = None
            if c["space_from"] == "inputs":  # GPM's own representation: what the task fed each adapted layer
                model.eval()
                grams = gorp.input_grams(model, sample_batches(c, examples))
                model.train()
                inputs = {m.lora_A: gorp.gram_columns(G) for m, G in grams.items()}
            opt.grow_shared_space(c["space_threshold"], inputs)
            name_of = {p: n for n, p in named.items()}
            spaces = {name_of[p]: S.cpu() for p, S in opt.shared_spaces().items()}  # by name, for the checkpoint
            space, cover = space_report(c, model, opt, [t["train"] for t in tasks[: i + 1]] if not spec.get("joint")
                                        else [examples])
            log("  shared space (directions, mean and max over layers): "
                + ", ".join(f"{k} {v[0]:.1f} ({v[1]})" for k, v in space.items())
                + " | inputs of the tasks so far it covers: " + ", ".join(f"{k} {v[0]:.1%}" for k, v in cover.items()))
        if spec["lora"] == "fresh":
            gorp.end_task(model)
        t_eval = time.time()
        scores = [evaluate(c, model, t, enc, eot) if evaluated(c, spec, i, j, len(stages)) else (None, None)
                  for j, t in enumerate(tasks)]  # None: left unevaluated
        row = [right for right, _ in scores]
        acc.append(row)
        stats.append(dict(task=stage, train_seconds=round(seconds, 2), eval_seconds=round(time.time() - t_eval, 2),
                          tokens_per_second=round(tokens / max(seconds, 1e-9)), trainable_params=trainable,
                          projected_params=projected, optimizer_state_bytes=state_bytes,
                          off_label=[off for _, off in scores], moved=moved, space=space, coverage=cover))
        log(f"after {stage}: " + "  ".join(f"{n} {a:.1f}" for n, a in zip(names, row) if a is not None))
        if c["_rank"] == 0:
            save_checkpoint(c, run_dir, model, spaces, acc, stats, i + 1)
    aa, bwt, forgetting = metrics(acc)
    results = dict(method=c["method"], tasks=names, acc=acc, AA=aa, BWT=bwt, forgetting=forgetting,
                   per_task=stats, precision=c["_dtype"], provenance=c["_provenance"], config=public(c))
    if c["_rank"] == 0:
        with open(os.path.join(run_dir, "results.json.tmp"), "w") as f:
            json.dump(results, f, indent=1)
        os.replace(os.path.join(run_dir, "results.json.tmp"), os.path.join(run_dir, "results.json"))
    log(f"\n{c['method']}: accuracy (%) on each task (columns) after training each task (rows)\n"
        + matrix_table(acc, names) + "\nanswers that are none of the task's labels, at the end (%): "
        + "  ".join(f"{n} {off:.1f}" for n, off in zip(names, stats[-1]["off_label"])))
    return results


def comparison_table(all_results):
    lines = [f"{'method':<9}{'AA':>7}{'BWT':>7}{'forget':>8}{'trained params':>16}{'opt state':>12}{'time':>8}"]
    for r in all_results:
        trained = max(s["trainable_params"] for s in r["per_task"])
        state = max(s["optimizer_state_bytes"] for s in r["per_task"])
        seconds = sum(s["train_seconds"] + s["eval_seconds"] for s in r["per_task"])
        lines.append(f"{r['method']:<9}{r['AA']:7.1f}{fmt(r['BWT'], '7.1f')}{fmt(r['forgetting'], '8.1f')}"
                     f"{trained:16,}{state / 2 ** 20:10.2f}MB{seconds:7.0f}s")
    return "\n".join(lines)


def plot_results(all_results, path, log):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("--plot needs matplotlib: pip install matplotlib (the rest of the run does not)")
        return
    side = max(4, 0.45 * len(all_results[0]["tasks"]))  # a 15-task matrix needs room for its numbers
    cols = min(len(all_results), 5)
    rows = math.ceil(len(all_results) / cols)  # each a row of matrices over a row of their curves
    fig, axes = plt.subplots(2 * rows, cols, figsize=(side * cols, (3 + side) * rows), squeeze=False)
    for k in range(len(all_results), rows * cols):  # the last row's empty places
        axes[2 * (k // cols)][k % cols].axis("off")
        axes[2 * (k // cols) + 1][k % cols].axis("off")
    for k, r in enumerate(all_results):
        acc, names = r["acc"], r["tasks"]
        ax = axes[2 * (k // cols)][k % cols]
        ax.imshow([[math.nan if a is None else a for a in row] for row in acc], vmin=0, vmax=100, cmap="viridis")
        ax.set_title(f"{r['method']}\nAA {r['AA']:.1f}  BWT {fmt(r['BWT'], '.1f').strip()}", fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(acc)), [f"after {n}" for n in (names if len(acc) > 1 else ["all"])], fontsize=8)
        for i, row in enumerate(acc):
            for j, a in enumerate(row):
                if a is not None:
                    ax.text(j, i, f"{a:.0f}", ha="center", va="center", color="w" if a < 60 else "k", fontsize=8)
        ax = axes[2 * (k // cols) + 1][k % cols]
        for j, n in enumerate(names):
            seen = [(i + 1, row[j]) for i, row in enumerate(acc) if row[j] is not None]  # the evaluated points, joined
            ax.plot(*zip(*seen), marker="o", label=n, color=(plt.cm.tab20 if len(names) > 10 else plt.cm.tab10)(j % 20))
        ax.set_ylim(0, 100)
        ax.set_xticks(range(1, len(acc) + 1))
        ax.set_xlabel("tasks trained")
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    log(f"wrote {path}")


def finished_runs(out_dir):
    """The results.json of every method finished in out_dir, in METHODS order, then the others."""
    names = sorted(e for e in os.listdir(out_dir) if os.path.isfile(os.path.join(out_dir, e, "results.json")))
    runs = []
    for name in [m for m in METHODS if m in names] + [n for n in names if n not in METHODS]:
        with open(os.path.join(out_dir, name, "results.json")) as f:
            runs.append(dict(json.load(f), method=name))
    return runs


def summary_table(out_dirs):
    """Mean and standard deviation of AA, BWT and forgetting per method over finished runs, and
    of the accuracy on each task just after training it: what was learned, before any forgetting.
    A method is averaged over the folders that hold it (mtl, which no task order changes, may run
    once per seed), and its row says over how many; other runs (the ablation's, a sweep's) are
    shown where every folder holds them."""
    import statistics
    runs_of = collections.defaultdict(list)
    for d in out_dirs:
        runs = finished_runs(d) if os.path.isdir(d) else []
        if not runs:
            raise ConfigError(f"--summarize: {d} holds no finished run (a folder of <method>/results.json)")
        for r in runs:
            runs_of[r["method"]].append(r)
    order = list(METHODS) + sorted(m for m in runs_of if m not in METHODS)  # METHODS first, whichever folder held them
    runs_of = {m: runs_of[m] for m in order if m in runs_of and (m in METHODS or len(runs_of[m]) == len(out_dirs))}
    width = max(9, max(len(m) + 1 for m in runs_of))  # as the ablation's, or a tuning sweep's
    lines = [f"{'method':<{width}}{'AA':>14}{'BWT':>14}{'forgetting':>14}{'just learned':>14}   runs"]
    for m, runs in runs_of.items():
        for r in runs:  # mtl's one row is what it learned of every task
            r["learned"] = sum(r["acc"][min(i, len(r["acc"]) - 1)][i] for i in range(len(r["acc"][-1]))) / len(r["acc"][-1])
        cells = []
        for key in ("AA", "BWT", "forgetting", "learned"):
            values = [r[key] for r in runs if r[key] is not None]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):7.1f} ± {spread:4.1f}" if values else f"{'-':>14}")
        lines.append(f"{m:<{width}}" + "".join(f"{cell:>14}" for cell in cells) + f"{len(runs):7d}")
    return "\n".join(lines)


def main(argv, log=print):
    c = parse_config(argv)
    if c["summarize"]:
        out_dirs = [d for d in c["summarize"].split(",") if d]
        log(summary_table(out_dirs))
        if c["plot"]:  # the first run folder's methods, one panel each, drawn from their results.json
            plot_results(finished_runs(out_dirs[0]), os.path.join(c["out_dir"], "forgetting.png"), log)
        return []
    c["_rank"], c["_world"] = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if c["_world"] > 1 and not dist.is_initialized():  # launched by torchrun
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if c["_rank"] != 0:
        log = lambda s: None  # one process speaks
    torch.manual_seed(c["seed"])
    random.seed(c["seed"])
    device = c["_device"] = pick_device(c)
    if c["resume"] and not os.path.isdir(c["out_dir"]):  # said before any slow work
        raise ConfigError(f"--resume: {c['out_dir']} does not exist, so there is no run to resume")
    c["_toy_dir"] = os.path.join(c["out_dir"], f"toy-{c['seed']}")  # the suite depends on the seed too
    if c["data_dir"] == "toy":
        c["data_dir"] = c["_toy_dir"]
        if c["_rank"] == 0 and not os.path.isfile(os.path.join(c["_toy_dir"], "pretrain.json")):
            toy.write_suite(c["_toy_dir"], seed=c["seed"])
        if c["_world"] > 1:
            dist.barrier()  # the others read what process 0 wrote
    task_list(c)  # a wrong folder or task name is named before anything slower happens
    enc, eot = tokenizer(c["init_from"])
    tasks = load_tasks(c, enc, eot, log)
    c["_task_names"] = [t["name"] for t in tasks]
    threads = torch.get_num_threads() if device.type == "cpu" else ""
    log(f"device {device}{f' ({threads} threads)' if threads else ''}, {c['_world']} process(es); data {c['data_dir']}: "
        + ", ".join(f"{t['name']} ({len(t['train'])}/{len(t['test'])})" for t in tasks)
        + (" | valid: the test sets are held out of train.json" if c["valid"] else ""))
    made_here = c["init_from"] in ("scratch", "pretrain")
    if made_here:  # its width is known now, and its pretraining runs under the chosen autocast
        precision = set_precision(c, c["n_embd"])
    model = base_model(c, enc, eot, log)
    if c["init_from"].endswith(".pt") and model.config.family != "gpt2":  # its tokenizer is not in the file
        raise ConfigError(f"init_from {c['init_from']} holds a {model.config.family} model: start from the model itself "
                          "(its folder or .gguf), whose tokenizer it needs")
    if not made_here:
        precision = set_precision(c, model.config.n_embd)
    where = "made here" if made_here else c["init_from"] if c["init_from"].endswith(".pt") else gorp.resolve(c["init_from"])
    log(f"model {c['init_from']}: {model.config.family} family, {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{model.config.n_layer} layers x {model.config.n_embd}, weights in float32 ({where}); {precision}")
    if c["max_len"] > model.config.block_size:
        raise ConfigError(f"--max_len {c['max_len']} is longer than the model's block_size {model.config.block_size}")
    c["_provenance"] = provenance(c, model)
    base_state, model_args = model.state_dict(), vars(model.config)
    methods = list(METHODS) if c["method"] == "all" else [c["method"]]
    all_results = []
    for m in methods:
        mc = dict(c, method=m, _run_dir=os.path.join(c["out_dir"], m) if c["method"] == "all" else c["out_dir"])
        if c["method"] == "all":
            log(f"\n=== {m} ===")
        all_results.append(run_method(mc, tasks, base_state, model_args, enc, eot, log))
    if len(all_results) > 1:
        log("\nall methods, same base model and data:\n" + comparison_table(all_results))
    if c["plot"] and c["_rank"] == 0:
        plot_results(all_results, os.path.join(c["out_dir"], "forgetting.png"), log)
    if dist.is_initialized():
        dist.destroy_process_group()
    return all_results


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(config_help())
        sys.exit(0)
    try:
        main(sys.argv[1:], log=lambda s: print(s, flush=True))
    except (ConfigError, benchmark.DataError, NonFinite) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted: the last finished task's checkpoint is kept; --resume=True continues", file=sys.stderr)
        sys.exit(130)
