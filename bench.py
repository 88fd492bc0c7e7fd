"""
Where GORP's time and memory go, against the plain baselines, measured side by side in one run.

    python bench.py               # the table, and bench.json; about six minutes on 2 CPU cores
    python bench.py --quick       # fewer repeats and no GPT-2-small model, for a first look

Every figure that matters is a ratio of two timings taken in the same run, interleaved, so a
noisy shared machine moves both; absolute times are printed for information only.
Targets (README.md, Performance) are checked at the end and printed as PASS or MISS.
"""

import json
import os
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch's, when numpy is absent: harmless here
import torch  # noqa: E402

import gorp
import train_cl
from results import report

QUICK = "--quick" in sys.argv
REPEATS = 3 if QUICK else 7


def timed(fn, repeats=REPEATS):
    """Median seconds of fn() over repeats, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired(fn_a, fn_b, repeats=REPEATS):
    """Median of a and of b, timed alternately so drifts in machine load hit both alike."""
    fn_a(), fn_b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, ts in ((fn_a, ta), (fn_b, tb)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def power_law(m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=g))[0]
    return U * torch.arange(1, k + 1).float().pow(-0.5) @ V.t()


def energy(A, Q):
    return float((Q.t() @ A).pow(2).sum())


# -----------------------------------------------------------------------------


def bench_projector(results):
    """The hand-rolled top-r factorisation against torch.linalg.svd on GPT-2 small's shapes."""
    torch.manual_seed(0)
    model = gorp.GPT(gorp.GPTConfig(n_layer=1, block_size=64))  # GPT-2 small's widths, one block
    idx = torch.randint(0, 50257, (4, 64))
    model(idx, torch.roll(idx, -1, 1))[1].backward()
    block = model.transformer.h[0]
    real = {(768, 2304): block.attn.c_attn.weight.grad.t(), (3072, 768): block.mlp.c_fc.weight.grad,
            (768, 3072): block.mlp.c_fc.weight.grad.t(), (768, 768): block.attn.c_proj.weight.grad}
    rows = []
    for (m, n), G in real.items():
        A = power_law(m, n)
        for r in (4, 8, 32):
            ratio = {name: energy(M, gorp.top_r_basis(M, r)) / energy(M, gorp.top_r_basis(M, r, exact=True))
                     for name, M in (("power_law", A), ("gradient", G))}
            t_ours, t_svd = paired(lambda: gorp.top_r_basis(A, r), lambda: torch.linalg.svd(A, full_matrices=False),
                                   repeats=3)
            rows.append(dict(shape=f"{m}x{n}", rank=r, energy_power_law=ratio["power_law"],
                             energy_gradient=ratio["gradient"], ours_ms=1e3 * t_ours, svd_ms=1e3 * t_svd,
                             speedup=t_svd / t_ours))
    results["projector"] = rows
    print("\nprojector refresh: hand-rolled top-r against torch.linalg.svd (energy: share of the exact top-r's)")
    print(f"{'shape':>10} {'r':>3} {'energy, power law':>18} {'energy, gradient':>17} "
          f"{'ours ms':>8} {'svd ms':>8} {'speedup':>8}")
    for row in rows:
        print(f"{row['shape']:>10} {row['rank']:>3} {row['energy_power_law']:18.4f} {row['energy_gradient']:17.4f} "
              f"{row['ours_ms']:8.2f} {row['svd_ms']:8.1f} {row['speedup']:7.1f}x")


def optimizer_setups(model):
    """The optimizers compared, each built fresh on the same model."""
    def torch_adamw():
        for p in model.parameters():
            p.requires_grad_(True)
        return torch.optim.AdamW(model.parameters())
    return {
        "torch AdamW, all": torch_adamw,
        "LoRA, plain Adam": lambda: gorp.GORP(gorp.param_groups(model)),
        "LoRA + c_fc, plain Adam":
            lambda: gorp.GORP(gorp.param_groups(model, full_rank=r"mlp\.c_fc\.weight$", rank=None)),
        "GORP": lambda: gorp.GORP(gorp.param_groups(model, full_rank=r"mlp\.c_fc\.weight$", rank=8,
                                                    update_proj_gap=10, shared_space=True)),
    }


def bench_optimizer_step(results, name, config):
    """Seconds per optimizer step (a projector refresh every 10 steps included), with real
    gradients held fixed; GORP's shared space is grown once first so its projections run."""
    torch.manual_seed(0)
    model = gorp.GPT(config)
    gorp.inject_lora(model, r"attn\.c_attn$", r=8, alpha=16)
    idx = torch.randint(0, config.vocab_size, (2, min(64, config.block_size)))
    rows = {}
    for label, make in optimizer_setups(model).items():
        opt = make()
        model.zero_grad(set_to_none=True)
        model(idx, torch.roll(idx, -1, 1))[1].backward()
        opt.step()
        if isinstance(opt, gorp.GORP):
            opt.grow_shared_space(0.9)

        def ten_steps():
            for _ in range(10):
                opt.step()
        step_ms = 1e3 * timed(ten_steps, repeats=3 if QUICK else 5) / 10
        rows[label] = dict(step_ms=step_ms, state_bytes=gorp.GORP.state_bytes(opt))  # reads any optimizer's state
    results[f"optimizer step, {name}"] = rows
    print(f"\noptimizer step, {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    for label, row in rows.items():
        print(f"  {label:<24} {row['step_ms']:9.2f} ms   state {row['state_bytes'] / 2 ** 20:8.2f} MB")


def bench_training(results):
    """Tokens per second of each method of train_cl.py on the default model and toy suite,
    and GORP against the same run with projection and shared space off."""
    c = train_cl.parse_config(["--out_dir=out", "--log_every=1e9", "--max_train=256", "--epochs=1"])
    c["_device"], c["_autocast"], c["_rank"], c["_world"] = torch.device("cpu"), train_cl.nullcontext, 0, 1
    c["_dtype"] = "float32"
    c["_toy_dir"] = c["data_dir"] = os.path.join(c["out_dir"], f"toy-{c['seed']}")
    if not os.path.isfile(os.path.join(c["_toy_dir"], "pretrain.json")):
        train_cl.toy.write_suite(c["_toy_dir"], seed=c["seed"])
    enc = gorp.load_tokenizer("gpt2")
    tasks = train_cl.load_tasks(c, enc)
    torch.manual_seed(0)
    base = gorp.GPT(gorp.GPTConfig(**{k: c[k] for k in ("block_size", "n_layer", "n_head", "n_embd")}))
    state, args = base.state_dict(), vars(base.config)
    examples = tasks[0]["train"]

    def throughput(method, projected=True):
        spec = train_cl.METHODS[method]
        model = train_cl.prepare_model(c, spec, state, args)
        opt = train_cl.make_optimizer(c, spec, model)
        if not projected:  # the same parameters, trained by plain Adam: no projector, no shared space
            for g in opt.param_groups:
                g["rank"], g["shared_space"] = None, False
        else:
            opt.load_shared_spaces({p: torch.linalg.qr(torch.randn(max(p.shape), 16))[0]
                                    for g in opt.param_groups if g["shared_space"] for p in g["params"]})
        tokens, seconds = train_cl.train_task(c, model, opt, examples, spec, "bench", lambda s: None)
        return tokens / seconds, opt.state_bytes(), sum(p.numel() for g in opt.param_groups for p in g["params"])

    rows = {}
    for method in train_cl.METHODS:
        if method != "mtl":  # mtl trains like gorp, on more data
            tps = [throughput(method) for _ in range(1 if QUICK else 2)]
            rows[method] = dict(tokens_per_s=max(t[0] for t in tps), state_bytes=tps[0][1], trained=tps[0][2])
    plain, ours = [], []
    for _ in range(2 if QUICK else 3):  # interleaved pairs
        plain.append(throughput("gorp", projected=False)[0])
        ours.append(throughput("gorp")[0])
    rows["gorp, projection and space off"] = dict(tokens_per_s=statistics.median(plain))
    rows["gorp"]["tokens_per_s"] = statistics.median(ours)
    results["training"] = rows
    adamw_bytes = 2 * 4 * sum(p.numel() for p in base.parameters())
    results["adamw_all_state_bytes"] = adamw_bytes
    print(f"\ntraining throughput on the default model ({c['n_layer']} layers, {c['n_embd']} wide), toy task 1")
    print(f"  {'method':<32}{'tokens/s':>10}{'trained params':>16}{'opt state MB':>14}{'vs AdamW all':>14}")
    for m, row in rows.items():
        extra = ""
        if "state_bytes" in row:
            extra = f"{row['trained']:16,}{row['state_bytes'] / 2 ** 20:14.2f}{row['state_bytes'] / adamw_bytes:13.3f}x"
        print(f"  {m:<32}{row['tokens_per_s']:10,.0f}{extra}")
    return tasks, state, args


def bench_eval(results, tasks, state, args):
    """Examples per second of greedy generation, with and without the KV cache. The cache saves
    more the more tokens are generated: both 8 and 16 new tokens are measured."""
    model = gorp.GPT(gorp.GPTConfig(**args))
    model.load_state_dict(state)
    model.eval()
    prompts = [p for p, _ in tasks[0]["test"][:64]]
    results["eval"] = {}
    for new in (8, 16):
        same = model.generate(prompts, new) == model.generate(prompts, new, use_cache=False)
        t_cache, t_full = paired(lambda: model.generate(prompts, new),
                                 lambda: model.generate(prompts, new, use_cache=False))
        results["eval"][new] = dict(cache_ex_per_s=len(prompts) / t_cache, recompute_ex_per_s=len(prompts) / t_full,
                                    speedup=t_full / t_cache, identical=same)
        print(f"\ngreedy evaluation, 64 prompts of the toy suite, {new} new tokens: "
              f"KV cache {len(prompts) / t_cache:,.0f} ex/s, "
              f"recomputing the prefix {len(prompts) / t_full:,.0f} ex/s ({t_full / t_cache:.1f}x), "
              f"identical outputs: {same}")


def matmul_rate(dtype, n=1024):
    """This CPU's measured matmul rate in FLOP/s for one dtype: the ceiling the rows below are read against."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n ** 3 / timed(lambda: a @ b, repeats=5)


def bench_smollm2(results):
    """SmolLM2-135M-Instruct, the real model of the benchmark runs: training tokens/s of each
    method in float32 and in bfloat16 autocast, GORP's optimizer step against IncLoRA's, and
    greedy evaluation, each with the share of the CPU's measured matmul rate it reaches.
    FLOPs per token: the blocks' 2N forward and 2N backward (through frozen weights too), 2N
    more for each trained weight; the head runs on answer tokens alone, so it is left out."""
    try:
        base = gorp.GPT.from_pretrained("smollm2")
    except (FileNotFoundError, ImportError) as e:
        print(f"\nSmolLM2 rows skipped: {e}")
        return
    c = train_cl.parse_config(["--init_from=smollm2", "--log_every=1e9", "--epochs=1", "--batch_size=16"])
    c["_device"], c["_rank"], c["_world"] = torch.device("cpu"), 0, 1
    state, args = base.state_dict(), vars(base.config)
    g = torch.Generator().manual_seed(0)
    steps = 2 if QUICK else 3
    tokens_of = lambda n: torch.randint(0, 49152, (n,), generator=g).tolist()  # noqa: E731
    examples = [(tokens_of(124), tokens_of(4)) for _ in range(16 * steps)]  # 16 x 128 tokens a step, 4 answer tokens
    block_params = sum(p.numel() for n, p in base.named_parameters() if ".layers." in n)
    rates = {name: matmul_rate(getattr(torch, name)) for name in ("float32", "bfloat16")}
    rows = {}
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    runs = [("gorp", "float32"), ("inclora", "float32")] + [(m, "bfloat16") for m in train_cl.METHODS if m != "mtl"]
    for method, dtype in runs:
        c["_autocast"] = bf16 if dtype == "bfloat16" else train_cl.nullcontext
        c["_dtype"] = dtype
        spec = train_cl.METHODS[method]
        model = train_cl.prepare_model(c, spec, state, args)
        opt = train_cl.make_optimizer(c, spec, model)
        tokens, seconds = train_cl.train_task(c, model, opt, examples, spec, "bench", lambda s: None)
        trained = sum(p.numel() for g in opt.param_groups for p in g["params"])
        trained_in_blocks = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".layers." in n)
        flops = (4 * block_params + 2 * trained_in_blocks) * tokens / seconds
        rows[f"{method} {dtype}"] = dict(tokens_per_s=tokens / seconds, trained=trained,
                                         matmul_share=flops / rates[dtype], state_bytes=opt.state_bytes())
        del model, opt
    results["smollm2 training"] = rows
    results["matmul FLOP/s"] = rates
    print(f"\nSmolLM2-135M-Instruct training, 16 x 128 tokens a step; this CPU's matmul: "
          f"{rates['float32'] / 1e9:.0f} GFLOP/s float32, {rates['bfloat16'] / 1e9:.0f} GFLOP/s bfloat16")
    print(f"  {'method':<20}{'tokens/s':>10}{'trained params':>16}{'opt state MB':>14}{'of matmul rate':>16}")
    for name, row in rows.items():
        print(f"  {name:<20}{row['tokens_per_s']:10,.0f}{row['trained']:16,}{row['state_bytes'] / 2 ** 20:14.1f}"
              f"{100 * row['matmul_share']:15.0f}%")
    c["_autocast"] = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    held = {}
    for dtype in ("bfloat16", "float32"):  # gorp's frozen matrices held in bfloat16, or in float32 and cast every step
        model = train_cl.prepare_model(dict(c, _dtype=dtype), train_cl.METHODS["gorp"], state, args)
        opt = train_cl.make_optimizer(c, train_cl.METHODS["gorp"], model)
        tokens, seconds = train_cl.train_task(c, model, opt, examples, train_cl.METHODS["gorp"], "bench",
                                              lambda s: None)
        held[dtype] = tokens / seconds
        del model, opt
    results["smollm2 frozen matrices held in"] = held
    print(f"  gorp bfloat16, frozen matrices held in bfloat16: {held['bfloat16']:,.0f} tokens/s; held in float32 and "
          f"cast every step: {held['float32']:,.0f} ({held['bfloat16'] / held['float32']:.2f}x)")
    steps_ms, c["_dtype"] = {}, "float32"
    for method in ("gorp", "inclora"):  # the optimizer step alone, real gradients held fixed
        spec = train_cl.METHODS[method]
        model = train_cl.prepare_model(c, spec, state, args)
        opt = train_cl.make_optimizer(c, spec, model)
        idx = torch.tensor([examples[0][0]])
        model(idx, torch.roll(idx, -1, 1))[1].backward()
        steps_ms[method] = 1e3 * timed(opt.step, repeats=5)
        del model, opt
    results["smollm2 optimizer step ms"] = steps_ms
    print(f"  optimizer step alone: gorp {steps_ms['gorp']:.1f} ms, inclora {steps_ms['inclora']:.1f} ms")
    base.eval()
    start = examples[0][0][:64]  # a task's template: the prompts of one task share their first ~40-70 tokens
    prompts = [start + p[64:] for p, _ in examples[:32]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        shared, whole = paired(lambda: base.generate(prompts, 4), lambda: base.generate(prompts, 4, share_start=False),
                               repeats=2)
        flipped = sum(a != b for a, b in zip(base.generate(prompts, 4), base.generate(prompts, 4, share_start=False)))
    same32 = base.generate(prompts, 4) == base.generate(prompts, 4, share_start=False)
    flops = 2 * block_params * (124 + 4) * len(prompts) / whole
    results["smollm2 eval"] = dict(ex_per_s=len(prompts) / shared, ex_per_s_whole=len(prompts) / whole,
                                   matmul_share=flops / rates["bfloat16"], identical_float32=same32,
                                   flipped_bf16=flipped)
    print(f"  greedy evaluation, bfloat16, 124-token prompts sharing their first 64, 4 new tokens: "
          f"{len(prompts) / shared:.1f} examples/s with the shared start run once, "
          f"{len(prompts) / whole:.1f} with every row whole "
          f"({whole / shared:.2f}x; the whole rows reach {100 * flops / rates['bfloat16']:.0f}% of the matmul rate); "
          f"identical outputs in float32: {same32}; in bfloat16 {flipped} of {len(prompts)} differ")


def check_targets(results):
    proj = [r for r in results["projector"] if r["shape"] == "768x3072" and r["rank"] == 8]
    train = results["training"]
    checks = [
        ("refresh r=8 on 768x3072 at least 20x faster than svd", min(r["speedup"] for r in proj) >= 20),
        ("... capturing at least 99% of the exact top-r energy",
         min(min(r["energy_power_law"], r["energy_gradient"]) for r in proj) >= 0.99),
        ("GORP throughput >= 0.95 x projection and space off",
         train["gorp"]["tokens_per_s"] >= 0.95 * train["gorp, projection and space off"]["tokens_per_s"]),
        ("GORP at least as fast as seqft", train["gorp"]["tokens_per_s"] >= train["seqft"]["tokens_per_s"]),
        ("greedy eval with KV cache >= 3x recompute at 16 new tokens, same outputs",
         results["eval"][16]["speedup"] >= 3 and all(e["identical"] for e in results["eval"].values())),
    ]
    if "smollm2 training" in results:
        sm = results["smollm2 training"]
        checks += [
            ("SmolLM2: bfloat16 autocast >= 2x float32 tokens/s (gorp and inclora)",
             all(sm[f"{m} bfloat16"]["tokens_per_s"] >= 2 * sm[f"{m} float32"]["tokens_per_s"]
                 for m in ("gorp", "inclora"))),
            ("SmolLM2: GORP >= 0.9x IncLoRA's tokens/s (bfloat16)",
             sm["gorp bfloat16"]["tokens_per_s"] >= 0.9 * sm["inclora bfloat16"]["tokens_per_s"]),
            ("SmolLM2: greedy eval with the shared start run once >= 1.3x every row whole, same outputs in float32",
             results["smollm2 eval"]["ex_per_s"] >= 1.3 * results["smollm2 eval"]["ex_per_s_whole"]
             and results["smollm2 eval"]["identical_float32"]),
        ]
    results["targets"] = {name: ok for name, ok in checks}
    print("\ntargets")
    for name, ok in checks:
        print(f"  {'PASS' if ok else 'MISS'}  {name}")


def llama_memory(results):
    """What data/llama_gpu.py holds on one GPU for Llama-2-7B's shapes, by train_cl.py's estimate
    (a model on the meta device: no weights, no time)."""
    c = train_cl.parse_config(["data/llama_gpu.py", "--dtype=bfloat16"])
    c.update(_device=torch.device("cuda"), _rank=0, _world=1, _dtype="bfloat16")
    config = gorp.GPTConfig(family="llama", block_size=4096, vocab_size=32000, n_layer=32, n_head=32, n_kv_head=32,
                            n_embd=4096, n_hidden=11008, bias=False, norm_eps=1e-5, tie_embeddings=False)
    with torch.device("meta"):
        model = gorp.GPT(config)
        gorp.inject_lora(model, train_cl.FAMILY_PATTERNS["llama"]["lora"], c["lora_r"], c["lora_alpha"])
        opt = train_cl.make_optimizer(c, train_cl.METHODS["gorp"], model)
        train_cl.hold_frozen_in_autocast_dtype(c, model)
        parts = report.memory_estimate(c, model, opt)
    results["llama2_7b_gib"] = {k: v / 2 ** 30 for k, v in parts.items()}
    print("\nLlama-2-7B shapes under data/llama_gpu.py (gorp, micro-batch 4 x 512, bfloat16 autocast), estimated: "
          + report.gib(parts, digits=1))


if __name__ == "__main__":
    if "--llama-memory" in sys.argv:  # this row alone
        llama_memory({})
        sys.exit(0)
    torch.manual_seed(0)
    results = dict(torch=torch.__version__, threads=torch.get_num_threads(), quick=QUICK)
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}")
    bench_projector(results)
    bench_optimizer_step(results, "default model", gorp.GPTConfig(block_size=128, n_layer=4, n_head=4, n_embd=128))
    if not QUICK:
        bench_optimizer_step(results, "GPT-2 small shapes", gorp.GPTConfig(block_size=128))
    tasks, state, args = bench_training(results)
    bench_eval(results, tasks, state, args)
    bench_smollm2(results)
    llama_memory(results)
    check_targets(results)
    with open("bench.json", "w") as f:
        json.dump(results, f, indent=1)
    print("wrote bench.json")
