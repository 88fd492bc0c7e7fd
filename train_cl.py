"""
Continual learning, task after task, with GORP or a baseline, ending in the forgetting table.

    python train_cl.py                                  # GORP on the built-in toy suite, CPU, ~2 min
    python train_cl.py --method=all                     # every method, one side-by-side table
    python train_cl.py --method=seqft --seed=2          # any key below as --key=value
    python train_cl.py data/smollm2_cpu.py --order=1    # a config file: SmolLM2 on the real benchmark
    python train_cl.py --summarize=out,out-seed2        # mean, spread and paired gaps of finished runs
    python train_cl.py --help                           # every key, its default and what it does
    torchrun --standalone --nproc_per_node=4 train_cl.py data/smollm2_cpu.py   # data parallel, 4 GPUs

After each task every task of the sequence is evaluated (greedy generation, exact match), so
a[i][j] = accuracy on task j after training task i; the end prints that matrix with AA, BWT
and forgetting (method.md §6) and writes out_dir/results.json.
"""

import ast
import json
import math
import os
import pathlib
import random
import re
import sys
import textwrap
import time
import warnings
from contextlib import nullcontext

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch's, when numpy is absent: harmless
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import gorp  # noqa: E402
from data import benchmark, toy  # noqa: E402
from results import report  # noqa: E402

# -----------------------------------------------------------------------------
# configuration: every key can be set as --key=value or in a Python config file. The defaults are
# the toy suite's; data/smollm2_cpu.py holds SmolLM2's on the real benchmark
# what and where
method = "gorp"  # gorp, seqft, seqlora, inclora, olora, galore, mtl, or all (each in turn, one table)
out_dir = "out"  # results.json, checkpoints and the cached base model go here
data_dir = "toy"  # a CL_Benchmark-layout folder, or toy: the built-in suite, written to out_dir/toy-<seed>
order = 0  # 1..6: a task order of the benchmark (method.md §6); 0: use tasks
tasks = ""  # comma list of tasks in training order; empty with order 0: every task of data_dir
max_train = 1000  # training examples per task at most (0: all)
max_test = 200  # test examples per task at most (0: all)
max_len = 128  # tokens of prompt and answer at most; a longer sentence is cut, never the template
valid = False  # tune: evaluate on max_test examples held out of train.json (a fifth with 0), never test.json
# the model
init_from = "auto"  # auto (toy: pretrain; benchmark: smollm2), pretrain, scratch, a .pt, a folder, a .gguf, a name
n_layer = 4  # model size when made here (pretrain: a small GPT pretrained on the toy's text, cached; scratch)
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
space_threshold = 0.9  # eps: the share of a task's energy the shared space must capture (GPM's rule)
olora_lambda1 = 0.5  # O-LoRA's orthogonality weight
olora_lambda2 = 0.0  # O-LoRA's L2 weight on the unsquared norms of the new A and B (its 15-task runs: 0.1)
exact_svd = False  # torch.linalg.svd instead of the hand-rolled factorisation
# questions the paper leaves open (method.md §5b), each a switch; results/README.md has what each measured
fresh_A_off_space = False  # a fresh adapter's A starts off its layer's shared space, not only its updates
space_from = "projected"  # grow LoRA A's space from Adam's first moment (projected), or from its layer's inputs
space_sample = 32  # training examples per task that space_from=inputs and the coverage figure read
galore_rank = 8  # galore's projector rank (GORP's, so the two project alike)
galore_update_proj_gap = 200  # galore's T, as GaLore's README trains
galore_scale = 0.25  # galore's alpha, as GaLore's README trains: effective lr on the matrices galore_lr * 0.25
# training: each method's own learning rate, chosen by one procedure on examples held out of the
# training sets (--valid=True), never on test sets (results/README.md, "Tuning")
epochs = 2  # passes over each task's training data
batch_size = 16  # the global batch: split across processes and micro-batches
grad_accum = 1  # micro-batches a step's batch is split into, their gradients summed: the same step, less memory
lr = 3e-4  # gorp's (and mtl's) LoRA adapters
full_rank_lr = 3e-4  # gorp's projected full-rank weights: the effective lr is full_rank_lr * scale
seqlora_lr = 1e-4  # seqlora's one adapter
inclora_lr = 3e-4  # inclora's adapters
olora_lr = 3e-4  # olora's adapters
ft_lr = 3e-5  # seqft: AdamW on every weight
galore_lr = 1e-4  # galore: one lr for every weight, as GaLore's usage
weight_decay = 0.0
grad_clip = 1.0  # clip the gradient norm to this (0: off)
eval_batch_size = 64
eval_tasks = "all"  # evaluate after each task all tasks, those seen so far (seen), or the new one and all at the end
# system
device = "auto"  # auto (cuda, then mps, then cpu), or cpu, cuda, cuda:1, mps
dtype = "auto"  # auto (bfloat16 autocast where the GPU or CPU has it natively, else float32), float32, bfloat16
seed = 1337
compile = False  # torch.compile the training forward pass (PyTorch 2, a GPU)
resume = False  # continue an interrupted run in out_dir from its last finished task
plot = False  # write out_dir/forgetting.png (needs matplotlib)
summarize = ""  # comma list (or glob) of finished out_dirs: mean, spread and paired gaps per method; trains nothing
reference = "gorp"  # --summarize pairs every method with this one, run by run
log_every = 2.0  # seconds between progress lines
CONFIG_KEYS = [k for k, v in list(globals().items()) if k[0] != "_" and isinstance(v, (int, float, bool, str))]
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
CHOICES = dict(method=(*METHODS, "all"), order=(0, *benchmark.ORDERS), space_from=("projected", "inputs"),
               eval_tasks=("all", "seen", "new"), dtype=("auto", "float32", "bfloat16", "float16"))
AT_LEAST_1 = ("rank", "lora_r", "update_proj_gap", "galore_rank", "galore_update_proj_gap", "batch_size", "grad_accum",
              "eval_batch_size", "epochs", "max_len", "n_layer", "n_head", "n_embd", "block_size", "pretrain_vocab")


class ConfigError(ValueError):
    pass


def config_help():
    """Every key with its default and its comment, read from this file's config block."""
    lines = []
    for line in open(__file__):
        m = re.match(r"^(\w+) = (.+?)(?:  # (.*))?$", line.rstrip())
        if m and m.group(1) in CONFIG_KEYS:
            lines.append(f"  --{m.group(1)}={m.group(2)}" + (f"    {m.group(3)}" if m.group(3) else ""))
    return "usage: python train_cl.py [config.py] [--key=value ...]\n" + "\n".join(lines)


def parse_config(argv):
    """nanoGPT's configurator, with errors instead of surprises: config files of plain Python
    assignments and --key=value, in the order given; an unknown key or a wrong type is an error."""
    config, pairs = {k: globals()[k] for k in CONFIG_KEYS}, []
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"expected --key=value, got {arg}")
            try:
                value = text if isinstance(config.get(key), str) else ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare word: the type check below names it
            pairs.append((key, value))
        elif not os.path.isfile(arg):
            raise ConfigError(f"config file {arg} does not exist")
        else:
            scope = {}
            try:
                exec(open(arg).read(), {}, scope)
            except Exception as e:
                raise ConfigError(f"config file {arg} does not run: {e}") from None
            pairs += [(k, v) for k, v in scope.items() if not k.startswith("_")]
    for key, value in pairs:
        if key not in config:
            raise ConfigError(f"unknown config key {key!r} (python train_cl.py --help lists them)")
        want = type(config[key])
        value = float(value) if want is float and type(value) is int else value
        if type(value) is not want:
            raise ConfigError(f"--{key} wants a {want.__name__}, got {value!r}")
        config[key] = value
    for key, allowed in CHOICES.items():
        if config[key] not in allowed:
            raise ConfigError(f"unknown {key} {config[key]!r}: one of {', '.join(map(str, allowed))}")
    for key in AT_LEAST_1:
        if config[key] < 1:
            raise ConfigError(f"--{key} must be at least 1, got {config[key]}")
    if config["init_from"] == "auto":  # the small GPT made here for the toy suite, a real model for a real benchmark
        config["init_from"] = "pretrain" if config["data_dir"] == "toy" else "smollm2"
    if not 0 < config["space_threshold"] <= 1:
        raise ConfigError(f"--space_threshold must be in (0, 1], got {config['space_threshold']}")
    return config


# -----------------------------------------------------------------------------
# the data


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


def load_tasks(c, enc, log=print):
    """Per task in training order: its labels and encoded train and test examples (data/benchmark.py)."""
    return [benchmark.load_task(c["data_dir"], group, task, enc, c["max_train"], c["max_test"], c["max_len"],
                                c["seed"], c["valid"], log) for task, group in task_list(c)]


# -----------------------------------------------------------------------------
# the model


def pick_device(c):
    name = c["device"]
    if c["_world"] > 1 and torch.cuda.is_available() and name in ("auto", "cuda"):
        name = f"cuda:{os.environ['LOCAL_RANK']}"  # torchrun: one GPU per process
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name != "cpu" and not name.startswith(("cuda", "mps")):
        raise ConfigError(f"unknown device {name!r}: auto, cpu, cuda, cuda:N or mps")
    available = torch.cuda.is_available() if name.startswith("cuda") else torch.backends.mps.is_available()
    if name != "cpu" and not available:
        raise ConfigError(f"device {name} is not available here")
    return torch.device(name)


def set_precision(c, width):
    """The autocast dtype for a model `width` wide, and the choice in words. auto: bfloat16 on a GPU
    that has it, and on a CPU with native bfloat16 (its flags: AVX512_BF16, AMX, ARM's BF16) for models
    512 or more wide; narrower, casts eat the gain (toy 1.1x, SmolLM2 2.1x; bench.py). Where bfloat16
    is emulated it is far slower: float32. Weights and optimizer state stay float32 either way."""
    device, dtype, why = c["_device"], c["dtype"], ""
    if dtype == "auto":
        if device.type == "cuda":
            fast, why = torch.cuda.is_bf16_supported(), "this GPU has bfloat16"
        else:
            flags = open("/proc/cpuinfo").read() if os.path.isfile("/proc/cpuinfo") else ""
            fast = device.type == "cpu" and width >= 512 and bool(re.search(r"\b(avx512_bf16|amx_bf16|bf16)\b", flags))
            why = f"this CPU has native bfloat16, the model is {width} wide" if fast else ""
        dtype = "bfloat16" if fast else "float32"
    c["_dtype"] = dtype  # recorded in results.json: auto resolves differently on another machine
    ptdtype = getattr(torch, dtype)
    c["_autocast"] = (lambda: torch.autocast(device.type, dtype=ptdtype)) if dtype != "float32" else nullcontext
    return f"{dtype} autocast (auto: {why})" if why else f"{dtype} autocast" if dtype != "float32" else "float32"


def load_base(c):
    """The one place init_from is read: the model every method starts from, in float32 (autocast
    does the rest), and its tokenizer. A GPT made here, or this project's checkpoint of one, reads
    GPT-2's tokenizer; a pretrained model its own. init_from=pretrain is pretrained later, by
    toy.pretrain_base, once the data are known to be good."""
    init = c["init_from"]
    if init in ("scratch", "pretrain"):
        if c["max_len"] > c["block_size"]:
            raise ConfigError(f"--max_len {c['max_len']} is longer than --block_size {c['block_size']}")
        torch.manual_seed(c["seed"])
        config = gorp.GPTConfig(**{k: c[k] for k in ("block_size", "n_layer", "n_head", "n_embd")})
        return gorp.GPT(config), gorp.load_tokenizer("gpt2")
    if init.endswith(".pt"):
        if not os.path.isfile(init):
            raise ConfigError(f"init_from {init} does not exist")
        try:
            ckpt = torch.load(init, map_location="cpu", weights_only=True)
            model = gorp.GPT(gorp.GPTConfig(**ckpt["model_args"]))
            model.load_state_dict(ckpt["model"])
        except Exception as e:
            raise ConfigError(f"init_from {init} is not a checkpoint of this project ({str(e).splitlines()[0]})") \
                from None
        if model.config.family != "gpt2":  # GPT-2's tokenizer would give it wrong ids, silently
            raise ConfigError(f"init_from {init} holds a {model.config.family} model: start from the model itself "
                              "(its folder or .gguf), whose tokenizer it needs")
        return model, gorp.load_tokenizer("gpt2")
    try:
        return gorp.GPT.from_pretrained(init), gorp.load_tokenizer(init)
    except Exception as e:  # a bad file fails inside its reader (gguf, safetensors, torch) in many ways
        raise ConfigError(f"init_from {init}: {type(e).__name__}: {textwrap.shorten(str(e), 300)}") from None


def prepare_model(c, spec, base_state, model_args):
    """A copy of the base model with the method's adapters."""
    model = gorp.GPT(gorp.GPTConfig(**model_args))
    model.load_state_dict(base_state)
    try:  # a pattern that matches nothing is bad input, said in one line
        if spec["lora"] != "none":
            gorp.inject_lora(model, pattern(c, "lora", model), c["lora_r"], c["lora_alpha"], c["lora_dropout"])
        make_optimizer(c, spec, model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    hold_frozen_in_autocast_dtype(c, model)
    return model.to(c["_device"])


@torch.no_grad()
def hold_frozen_in_autocast_dtype(c, model):
    """Under bfloat16 (or float16) autocast, every frozen matrix is held in that dtype: half the memory,
    and no cast copy made every forward and kept for the backward. Trained weights, embeddings and norms
    (which feed the float32 residual stream) stay float32; finished adapters stay beside a bfloat16 W."""
    if c["_dtype"] == "float32":
        return
    for m in model.modules():
        tied = model.config.tie_embeddings and m is model.lm_head
        if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad and not tied:
            m.weight.data = m.weight.data.to(getattr(torch, c["_dtype"]))


def pattern(c, kind, model):
    """The regex of the lora, full_rank or galore weights: the config's, or the model family's."""
    return FAMILY_PATTERNS[model.config.family][kind] if c[f"{kind}_pattern"] == "auto" else c[f"{kind}_pattern"]


def make_optimizer(c, spec, model):
    lr, full_rank = c[spec["lr"]], spec.get("full_rank")  # the method's own learning rate
    projector = dict(full_rank_lr=c["full_rank_lr"], **{k: c[k] for k in ("rank", "update_proj_gap", "scale")})
    if full_rank == "pattern":  # GORP's L, which the full_rank switch turns off
        full_rank = pattern(c, "full_rank", model) if c["full_rank"] or spec.get("joint") else None
    elif full_rank == "galore":  # GaLore's own usage: one lr for every weight, its own rank, gap and scale
        full_rank = pattern(c, "galore", model)
        projector = dict(full_rank_lr=lr, rank=c["galore_rank"], scale=c["galore_scale"],
                         update_proj_gap=c["galore_update_proj_gap"])
    groups = gorp.param_groups(model, lr=lr, rest_lr=lr, full_rank=full_rank, **projector,
                               shared_space=spec.get("shared", False) and c["shared_space"],
                               train_rest=spec.get("rest", False), exact_svd=c["exact_svd"])
    return gorp.GORP(groups, lr=lr, betas=(0.9, 0.999), weight_decay=c["weight_decay"])


# -----------------------------------------------------------------------------
# training and evaluation


class NonFinite(RuntimeError):
    pass


def train_task(c, model, opt, examples, spec, task_name, log):
    """One task: epochs over its examples in seeded random order; returns (tokens, seconds). A step's
    batch is split across torchrun's processes and into grad_accum micro-batches, each loss weighted by
    its share of the batch's answer tokens (times world: DDP averages), so however it is split the
    summed gradient is the whole batch's mean loss's."""
    model.train()
    rank, world, accum = c["_rank"], c["_world"], c["grad_accum"]
    forward = torch.compile(model) if c["compile"] else model
    if world > 1:
        forward = DDP(forward, device_ids=[c["_device"].index] if c["_device"].type == "cuda" else None)
    rng = random.Random(f"{c['seed']}-{task_name}")
    total = math.ceil(len(examples) / c["batch_size"]) * c["epochs"]
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
            local, answer_tokens = batch[rank::world], sum(len(a) for _, a in batch)
            micro = [local[k::accum] for k in range(accum) if local[k::accum]]
            opt.zero_grad(set_to_none=True)
            for k, part in enumerate(micro):
                idx, targets = benchmark.collate(part, c["_device"])
                with c["_autocast"](), forward.no_sync() if world > 1 and k < len(micro) - 1 else nullcontext():
                    loss = forward(idx, targets)[1]
                    objective = loss * (sum(len(a) for _, a in part) * world / answer_tokens)  # alone: the loss
                    penalty = gorp.olora_penalty(model) if spec.get("olora") and k == 0 else None  # once a step
                    if penalty is not None:  # none in the first task, which has no finished adapter yet
                        objective = objective + c["olora_lambda1"] * penalty
                    if spec.get("olora") and k == 0 and c["olora_lambda2"]:  # the L2 term acts from the first task
                        objective = objective + c["olora_lambda2"] * gorp.olora_l2(model)
                    objective.backward()
                finite &= torch.isfinite(objective.detach())  # no host sync here
            norm = torch.nn.utils.clip_grad_norm_(params, c["grad_clip"] or float("inf"))
            finite &= torch.isfinite(norm)
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
def evaluate(c, model, task, enc):
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
            outs = model.generate([p for p, _ in chunk], max_new, stop_token=enc.end_token)
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


# The shared spaces at a task's end


def sample_batches(c, examples):
    """A fixed sample of a task's training examples, batched as gorp.input_grams reads them."""
    sample = examples[: c["space_sample"]]
    for i in range(0, len(sample), c["batch_size"]):
        chunk = sample[i: i + c["batch_size"]]
        idx, _ = benchmark.collate(chunk, c["_device"])
        lengths = torch.tensor([len(p) + len(a) - 1 for p, a in chunk], device=idx.device)
        yield idx, torch.arange(idx.size(1), device=idx.device)[None] < lengths[:, None]  # (B, T)


def grow_spaces(c, model, opt, seen):
    """End of a task: grow the shared spaces (from the finished task's layer inputs with
    space_from=inputs, GPM's representation), then measure them on a fixed sample of each seen
    task, the finished one last, run through the model once (report.space_record)."""
    model.eval()
    with c["_autocast"]():
        per_task = [gorp.input_grams(model, sample_batches(c, t)) for t in seen]  # [{LoRALinear: (d_in, d_in)}]
    model.train()
    inputs = {m.lora_A: gorp.gram_columns(G) for m, G in per_task[-1].items()} if c["space_from"] == "inputs" else None
    opt.grow_shared_space(c["space_threshold"], inputs)
    grams = {m: sum(g[m] for g in per_task) for m in per_task[-1]}
    return report.space_record(model, opt.shared_spaces(), grams)


# -----------------------------------------------------------------------------
# checkpoints, written whole or not at all, and results


def save_atomic(path, write):
    """write(tmp) to a temporary name, then rename it over path: a reader sees the old file or the new one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


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


def run_method(c, tasks, base_state, model_args, enc, log):
    spec, run_dir, names = METHODS[c["method"]], c["_run_dir"], [t["name"] for t in tasks]
    os.makedirs(run_dir, exist_ok=True)  # so a run killed in its first task can be resumed
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
        if i == start:
            log(f"memory estimate: {report.gib(report.memory_estimate(c, model, opt))} (micro-batch of "
                f"{math.ceil(c['batch_size'] / c['_world'] / c['grad_accum'])} x {c['max_len']} tokens)")
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for g in opt.param_groups for p in g["params"])
        projected = sum(p.numel() for g in opt.param_groups if g["rank"] for p in g["params"])
        log(f"task {i + 1}/{len(stages)} {stage}: {len(examples)} examples | params {total:,} total, "
            f"{trainable:,} trained, {projected:,} of them projected")
        start_weights = {n: p.detach().clone() for g in opt.param_groups if g["rank"]
                         for n, p in named.items() if any(p is q for q in g["params"])}
        tokens, seconds = train_task(c, model, opt, examples, spec, stage, log)
        state_bytes, moved, space, cover = opt.state_bytes(), report.movement(model, start_weights), {}, {}
        if spec.get("shared") and c["shared_space"]:
            seen = [examples] if spec.get("joint") else [t["train"] for t in tasks[: i + 1]]
            spaces, space, cover = grow_spaces(c, model, opt, seen)
        log(report.task_end_line(state_bytes, moved, space, cover))
        if spec["lora"] == "fresh":
            gorp.end_task(model)
        t_eval = time.time()
        scores = [evaluate(c, model, t, enc) if evaluated(c, spec, i, j, len(stages)) else (None, None)
                  for j, t in enumerate(tasks)]  # None: left unevaluated
        acc.append([right for right, _ in scores])
        stats.append(dict(task=stage, train_seconds=round(seconds, 2), eval_seconds=round(time.time() - t_eval, 2),
                          tokens_per_second=round(tokens / max(seconds, 1e-9)), trainable_params=trainable,
                          projected_params=projected, optimizer_state_bytes=state_bytes,
                          off_label=[off for _, off in scores], moved=moved, space=space, coverage=cover))
        log(f"after {stage}: " + "  ".join(f"{n} {a:.1f}" for n, a in zip(names, acc[-1]) if a is not None))
        if c["_rank"] == 0:
            ckpt = dict(model=model.state_dict(), spaces=spaces, acc=acc, stats=stats, done=i + 1,
                        method=c["method"], tasks=names, config=public(c))
            save_atomic(os.path.join(run_dir, "ckpt.pt"), lambda tmp: torch.save(ckpt, tmp))
    aa, bwt, forgetting = report.metrics(acc)
    results = dict(method=c["method"], tasks=names, acc=acc, AA=aa, BWT=bwt, forgetting=forgetting, per_task=stats,
                   precision=c["_dtype"], provenance=c["_provenance"], config=public(c))
    if c["_rank"] == 0:
        text = json.dumps(results, indent=1)
        save_atomic(os.path.join(run_dir, "results.json"), lambda tmp: pathlib.Path(tmp).write_text(text))
    log(f"\n{c['method']}: accuracy (%) on each task (columns) after training each task (rows)\n"
        + report.matrix_table(acc, names) + "\nanswers that are none of the task's labels, at the end (%): "
        + "  ".join(f"{n} {off:.1f}" for n, off in zip(names, stats[-1]["off_label"])))
    return results


# -----------------------------------------------------------------------------


def main(argv, log=print):
    c = parse_config(argv)
    if c["summarize"]:
        report.summarize(c["summarize"].split(","), METHODS, c["reference"], c["plot"] and c["out_dir"], log)
        return []
    c["_rank"], c["_world"] = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if c["_world"] > 1 and not dist.is_initialized():  # launched by torchrun
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if c["_rank"] != 0:
        log = lambda s: None  # noqa: E731  (one process speaks)
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
    model, enc = load_base(c)
    tasks = load_tasks(c, enc, log)
    c["_task_names"] = [t["name"] for t in tasks]
    threads = f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else ""
    log(f"device {device}{threads}, {c['_world']} process(es); data {c['data_dir']}: "
        + ", ".join(f"{t['name']} ({len(t['train'])}/{len(t['test'])})" for t in tasks)
        + (" | valid: the test sets are held out of train.json" if c["valid"] else ""))
    precision = set_precision(c, model.config.n_embd)
    if c["init_from"] == "pretrain":  # under the chosen autocast
        model = toy.pretrain_base(c, model, enc, log, save_atomic)
    c["_provenance"] = report.provenance(c, model)
    log(f"model {c['init_from']}: {model.config.family} family, {sum(p.numel() for p in model.parameters()):,} "
        f"parameters, {model.config.n_layer} layers x {model.config.n_embd}, weights in float32 "
        f"({c['_provenance']['weights']}, stored as {c['_provenance']['stored']}); {precision}")
    if c["max_len"] > model.config.block_size:
        raise ConfigError(f"--max_len {c['max_len']} is longer than the model's block_size {model.config.block_size}")
    base_state, model_args = model.state_dict(), vars(model.config)
    all_results = []
    for m in list(METHODS) if c["method"] == "all" else [c["method"]]:
        mc = dict(c, method=m, _run_dir=os.path.join(c["out_dir"], m) if c["method"] == "all" else c["out_dir"])
        if c["method"] == "all":
            log(f"\n=== {m} ===")
        all_results.append(run_method(mc, tasks, base_state, model_args, enc, log))
    if len(all_results) > 1:
        table = report.summary_table({r["method"]: [r] for r in all_results})
        log("\nall methods, same base model and data:\n" + table)
    if c["plot"] and c["_rank"] == 0:
        report.plot_results(all_results, os.path.join(c["out_dir"], "forgetting.png"), log)
    if dist.is_initialized():
        # DDP's gloo threads outlive destroy_process_group; one releasing a finished collective's tensors at
        # shutdown aborts the process, so the last collective is a barrier, which holds no tensors
        dist.barrier()
        dist.destroy_process_group()
    return all_results


if __name__ == "__main__":
    try:
        if any(a in ("-h", "--help") for a in sys.argv[1:]):
            print(config_help())
        else:
            main(sys.argv[1:], log=lambda s: print(s, flush=True))
    except BrokenPipeError:  # the output's reader stopped early (| head): Python's documented remedy
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except (ConfigError, benchmark.DataError, report.NoRuns, NonFinite) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted: the last finished task's checkpoint is kept; --resume=True continues", file=sys.stderr)
        sys.exit(130)
