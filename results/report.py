"""
The forgetting table and its metrics; what each run records about itself (its provenance, its
memory, how far each part moved, the shared spaces); and reading finished runs: the summary of each
method over seeds and orders, the paired gaps, what the two mechanisms did, and the picture.
`python train_cl.py --summarize=DIRS` prints them; every table in results/README.md is its output,
pasted under the command that printed it.
"""

import collections
import glob
import hashlib
import json
import math
import os
import re
import statistics
import subprocess

import torch

import gorp


# -----------------------------------------------------------------------------
# what a run records about itself: its provenance, its memory, how far each part moved, its spaces


def provenance(c, model):
    """What a results.json was made from: the weights' file and a digest of it, the types they were
    stored in, the precision run, and the code's git commit (dirty: tracked files had changed)."""
    source, digest = getattr(model, "source", None), None
    if source:
        path, h = source["path"], hashlib.sha256()
        files = [path] if not os.path.isdir(path) else \
            sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".safetensors", ".bin")))
        for f in files:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
        digest = h.hexdigest()
    git = lambda *a: subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), *a],  # noqa: E731
                                    capture_output=True, text=True).stdout.strip()
    return dict(weights=source["path"] if source else c["init_from"], sha256=digest,
                stored=source["stored"] if source else "float32", precision=c["_dtype"], commit=git("rev-parse", "HEAD")
                or None, dirty=bool(git("status", "--porcelain", "--untracked-files=no")))


def memory_estimate(c, model, opt):
    """Bytes a training step holds, by part, estimated from shapes before anything runs: the weights;
    the trained weights' gradients; the optimizer state (Adam's two moments, (m, r) for a projected
    weight, and its projector); and the activations autograd keeps for one micro-batch of max_len
    tokens: per token and layer about 8 d + 3 h values (LLaMA; GPT-2 4 d + 2 h) of 4 bytes, or about
    2.25 under bfloat16 autocast (the residual stream and norms stay float32), plus there the
    bfloat16 copies autocast makes of every float32 matrix and keeps for the backward pass, and on a CPU
    the (T, T) attention probabilities of its plain attention (attend). test_gorp.py checks it."""
    cfg, trained = model.config, [p for g in opt.param_groups for p in g["params"]]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    state = 0
    for g in opt.param_groups:
        for p in g["params"]:
            r = min(g["rank"] or 0, *p.shape) if g["rank"] else 0
            state += 4 * (2 * r * max(p.shape) + r * min(p.shape) if r else 2 * p.numel())
    B, T, half = math.ceil(c["batch_size"] / c["_world"] / c["grad_accum"]), c["max_len"], c["_dtype"] != "float32"
    d, h = cfg.n_embd, cfg.n_hidden or 4 * cfg.n_embd
    per_token = (8 * d + 3 * h if cfg.family == "llama" else 4 * d + 2 * h) * (2.25 if half else 4)
    activations = int(B * T * cfg.n_layer * per_token)
    if half:  # the matrices' bfloat16 copies, and the CPU's plain attention scores and probabilities
        activations += 2 * sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n
                               and "wte" not in n and "wpe" not in n and p.dtype == torch.float32)
        activations += 2 * B * cfg.n_head * T * T * cfg.n_layer if c["_device"].type == "cpu" else 0
    return dict(weights=weights, gradients=4 * sum(p.numel() for p in trained), optimizer=state,
                activations=activations)


def gib(parts, digits=2):
    """A memory estimate on one line: its total, then each part, in GiB."""
    return f"{sum(parts.values()) / 2 ** 30:.{digits}f} GiB = " \
        + " + ".join(f"{k} {v / 2 ** 30:.{digits}f}" for k, v in parts.items())


def task_end_line(state_bytes, moved, space, cover):
    """What a task did, on one line: the optimizer state, how far each group moved, the shared spaces."""
    line = f"  optimizer state {state_bytes / 2 ** 20:.2f} MB | moved (|change| / |weight|, layers' mean and max): " \
        + ", ".join(f"{k} {v[0]:.1e} ({v[1]:.1e})" for k, v in moved.items())
    if space:
        line += "\n  shared space (directions, mean and max over layers): " \
            + ", ".join(f"{k} {v[0]:.1f} ({v[1]})" for k, v in space.items()) \
            + " | seen tasks' input energy inside: " + ", ".join(f"{k} {v[0]:.1%}" for k, v in cover.items())
    return line


def by_kind(values):
    """{name: value} -> {kind: [mean, max]} over the layers, a kind being a name without its layer
    (model.layers.3.mlp.gate_proj.weight -> mlp.gate_proj.weight)."""
    kinds = collections.defaultdict(list)
    for name, v in values.items():
        kinds[re.sub(r"^.*?\.\d+\.", "", name)].append(v)
    return {k: [sum(vs) / len(vs), max(vs)] for k, vs in kinds.items()}


@torch.no_grad()
def movement(model, start):
    """How far a task moved each trained group: |W - W_start| / |W_start| for the projected
    full-rank weights, |scaling B A| / |W| for each adapter (before it is merged)."""
    named = dict(model.named_parameters())
    moved = {n: float((named[n] - w).norm() / w.norm()) for n, w in start.items()}
    for n, m in gorp.lora_modules(model):
        moved[n + ".BA"] = float(m.scaling * (m.lora_B.float() @ m.lora_A.float()).norm() / m.weight.float().norm())
    return by_kind(moved)


def space_record(model, spaces, grams):
    """The shared spaces by parameter name (to checkpoint), their sizes by kind, and the share of
    the seen tasks' layer-input energy (grams: {LoRALinear: X^T X}) inside each LoRA A's space."""
    name_of = {p: n for n, p in model.named_parameters()}
    spaces = {name_of[p]: S for p, S in spaces.items()}
    names = {m: n + ".lora_A" for n, m in gorp.lora_modules(model)}
    cover = {names[m]: gorp.coverage(spaces[names[m]], G) for m, G in grams.items() if names[m] in spaces}
    return {n: S.cpu() for n, S in spaces.items()}, by_kind({n: S.size(1) for n, S in spaces.items()}), by_kind(cover)


# -----------------------------------------------------------------------------
# the forgetting table (method.md §6)


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
    forgetting = sum(max(acc[i][j] for i in range(n - 1) if acc[i][j] is not None) - last[j] for j in range(n - 1))
    return aa, bwt, forgetting / (n - 1)


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def matrix_table(acc, names):
    width = max(8, max(len(n) for n in names) + 1)
    lines = ["after task".ljust(14) + "".join(n[: width - 1].rjust(width) for n in names)]
    for i, row in enumerate(acc):
        label = f"{i + 1} {names[i] if len(acc) == len(names) else 'all tasks'}"[:13]
        lines.append(label.ljust(14) + "".join(f"{fmt(a):>{width}}" for a in row))
    aa, bwt, forgetting = metrics(acc)
    return "\n".join(lines + [f"AA {aa:.1f}   BWT {fmt(bwt)}   forgetting {fmt(forgetting)}"])


# -----------------------------------------------------------------------------
# reading finished runs


class NoRuns(ValueError):
    pass


def summarize(patterns, methods, reference="gorp", plot_dir=None, log=print):
    """Print the tables of the finished runs in the folders (globs expanded); with plot_dir, draw
    the first folder's runs to plot_dir/forgetting.png."""
    out_dirs = [d for p in patterns if p for d in (sorted(glob.glob(p)) if set("*?[") & set(p) else [p])]
    runs_of = runs_by_method(out_dirs, methods)
    tables = summary_table(runs_of), paired_table(runs_of, reference), mechanism_table(runs_of)
    log("\n\n".join(t for t in tables if t))
    if plot_dir:  # the first folder's methods, one panel each
        plot_results([r for runs in runs_of.values() for r in runs if r["folder"] == out_dirs[0]],
                     os.path.join(plot_dir, "forgetting.png"), log)



def learned(r):
    """The mean accuracy on each task just after training it: what was learned, before any
    forgetting (mtl's one row is what it learned of every task)."""
    n = len(r["acc"][-1])
    return sum(r["acc"][min(i, len(r["acc"]) - 1)][i] for i in range(n)) / n


def summary_table(runs_of):
    """{method: [results]} -> mean ± standard deviation of AA, BWT, forgetting and what was learned."""
    width = max(9, max(len(m) + 1 for m in runs_of))  # as the ablation's, or a tuning sweep's
    lines = [f"{'method':<{width}}{'AA':>14}{'BWT':>14}{'forgetting':>14}{'just learned':>14}   runs"]
    for m, runs in runs_of.items():
        cells = []
        for key in ("AA", "BWT", "forgetting", "learned"):
            values = [learned(r) if key == "learned" else r[key] for r in runs]
            values = [v for v in values if v is not None]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):7.1f} ± {spread:4.1f}" if values else "-")
        lines.append(f"{m:<{width}}" + "".join(f"{cell:>14}" for cell in cells) + f"{len(runs):7d}")
    return "\n".join(lines)


def paired_table(runs_of, reference="gorp"):
    """The reference method minus each other one, run by run over the folders holding both: mean
    and standard deviation of the gap, and in how many runs it is above zero, below it, or level."""
    ref = {r["folder"]: r for r in runs_of.get(reference, [])}
    lines = [f"{reference} minus each method, paired by folder: mean ± sd of the gap (runs above / below / level)"]
    for m, runs in runs_of.items():
        pairs = [(ref[r["folder"]], r) for r in runs if r["folder"] in ref and m != reference]
        cells = []
        for key in ("AA", "BWT"):
            gaps = [a[key] - b[key] for a, b in pairs if a[key] is not None and b[key] is not None]
            if gaps:
                spread = statistics.stdev(gaps) if len(gaps) > 1 else 0.0
                signs = f"{sum(g > 0 for g in gaps)}/{sum(g < 0 for g in gaps)}/{sum(g == 0 for g in gaps)}"
                cells.append(f"{key} {statistics.mean(gaps):+5.1f} ± {spread:4.1f} ({signs})")
        if cells:
            lines.append(f"  {m:<{max(9, max(map(len, runs_of)) + 1)}}" + "   ".join(cells))
    return "\n".join(lines) if len(lines) > 1 else ""


def mechanism_table(runs_of):
    """What the two mechanisms did, per method, from the runs that recorded it: how far a task moved
    the full-rank weights and the adapters (|change| / |weight|, the layers' mean, over tasks and
    runs), and at the end the shared spaces' directions per matrix and the share of the tasks'
    layer-input energy inside LoRA A's space."""
    mean = lambda xs: f"{sum(xs) / len(xs):.3g}" if xs else "-"  # noqa: E731
    width, heads = max(9, max(map(len, runs_of)) + 1), ("full rank moved", "adapter moved", "A space", "W space",
                                                            "input in A space %")
    lines = [f"{'method':<{width}}" + "".join(f"{h:>{len(h) + 3}}" for h in heads)]
    for m, runs in runs_of.items():
        tasks = [t for r in runs for t in r["per_task"] if "moved" in t]
        ends = [r["per_task"][-1] for r in runs if "moved" in r["per_task"][-1]]
        if not tasks:
            continue
        moved = [(k.endswith(".BA"), v[0]) for t in tasks for k, v in t["moved"].items()]
        space = [(k.endswith("lora_A"), v[0]) for t in ends for k, v in t["space"].items()]
        cover = [100 * v[0] for t in ends for v in t["coverage"].values()]
        cells = [mean([v for lora, v in moved if not lora]), mean([v for lora, v in moved if lora]),
                 mean([v for a, v in space if a]), mean([v for a, v in space if not a]), mean(cover)]
        lines.append(f"{m:<{width}}" + "".join(f"{x:>{len(h) + 3}}" for x, h in zip(cells, heads)))
    return "\n".join(lines) if len(lines) > 1 else ""


def runs_by_method(out_dirs, methods):
    """{method: [results.json]} of every run finished in the folders (<folder>/<method>/results.json),
    `methods` first. A method is averaged over the folders that hold it (mtl, which no task order
    changes, may run once per seed); other runs (the ablation's, a sweep's) where every folder does."""
    runs_of = collections.defaultdict(list)
    for d in out_dirs:
        names = sorted(e for e in os.listdir(d) if os.path.isfile(os.path.join(d, e, "results.json"))) \
            if os.path.isdir(d) else []
        if not names:
            raise NoRuns(f"--summarize: {d} holds no finished run (a folder of <method>/results.json)")
        for name in names:
            runs_of[name].append(dict(json.load(open(os.path.join(d, name, "results.json"))), method=name, folder=d))
    order = list(methods) + sorted(m for m in runs_of if m not in methods)
    return {m: runs_of[m] for m in order if m in runs_of and (m in methods or len(runs_of[m]) == len(out_dirs))}


def plot_results(all_results, path, log):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("--plot needs matplotlib: pip install matplotlib (the rest of the run does not)")
        return
    side, cols = max(4, 0.45 * len(all_results[0]["tasks"])), min(len(all_results), 5)  # 15 tasks need room
    rows = math.ceil(len(all_results) / cols)  # each a row of matrices over a row of their curves
    fig, axes = plt.subplots(2 * rows, cols, figsize=(side * cols, (3 + side) * rows), squeeze=False)
    for k in range(len(all_results), rows * cols):  # the cells after the last method's stay empty
        axes[2 * (k // cols)][k % cols].axis("off")
        axes[2 * (k // cols) + 1][k % cols].axis("off")
    for k, r in enumerate(all_results):
        acc, names = r["acc"], r["tasks"]
        ax, curves = axes[2 * (k // cols)][k % cols], axes[2 * (k // cols) + 1][k % cols]
        ax.imshow([[math.nan if a is None else a for a in row] for row in acc], vmin=0, vmax=100, cmap="viridis")
        bwt = fmt(r["BWT"])
        ax.set_title(f"{r['method']}\nAA {r['AA']:.1f}  BWT {bwt}", fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(acc)), [f"after {n}" for n in (names if len(acc) > 1 else ["all"])], fontsize=8)
        for i, row in enumerate(acc):
            for j, a in enumerate(row):
                if a is not None:
                    ax.text(j, i, f"{a:.0f}", ha="center", va="center", color="w" if a < 60 else "k", fontsize=8)
        for j, n in enumerate(names):
            seen = [(i + 1, row[j]) for i, row in enumerate(acc) if row[j] is not None]  # the evaluated points, joined
            colors = plt.cm.tab20 if len(names) > 10 else plt.cm.tab10
            curves.plot(*zip(*seen), marker="o", label=n, color=colors(j % 20))
        curves.set(ylim=(0, 100), xticks=range(1, len(acc) + 1), xlabel="tasks trained", ylabel="accuracy (%)")
        curves.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    log(f"wrote {path}")
