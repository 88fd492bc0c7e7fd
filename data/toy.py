"""
The built-in task suite: a small synthetic language and four two-way questions about it,
generated deterministically from a seed and written in the benchmark's own layout (group TOY),
so that `python train_cl.py` needs no download.

Every sentence tells of two animals, what one does to the other, where and when:

    the red owl helps the black dog near the river at night

and each task asks a different question of the same kind of sentence:

    friendly   is what the first animal does friendly or hostile?   friendly (helps)
    water      does it happen by water or on land?                  water (river)
    bird       is one of the animals a bird, or both mammals?       bird (owl)
    night      does it happen at night or by day?                   night (night)

Every task reads the same sentences and differs from the others only in its question and its
two answer words, which the prompt's "Dataset:" and "Option:" lines name. A model that simply
follows its latest task answers every question with that task's words, and is 0% right on the
others: the forgetting that sequential fine-tuning shows on the real benchmark. The suite also
writes pretrain.json, unlabeled stories of the language, on which pretrain_base makes the
default base model.

    python data/toy.py out/toy    # write the suite (train_cl.py does this by itself)
"""

import collections
import hashlib
import json
import math
import os
import random
import sys
import time

COLORS = ["red", "blue", "green", "yellow", "black", "white"]
MAMMALS, BIRDS = ["cat", "dog", "bear", "wolf", "horse", "fox"], ["owl", "duck", "crow", "swan", "hawk", "goose"]
FRIENDLY = ["helps", "meets", "greets", "thanks", "feeds", "joins"]
HOSTILE = ["bites", "fights", "scares", "attacks", "robs", "kicks"]
WATER, LAND = ["river", "lake", "sea", "pond", "shore", "bay"], ["park", "forest", "farm", "field", "city", "hill"]
DARK, LIGHT = ["night", "dusk", "midnight"], ["noon", "dawn", "daybreak"]
TASKS = ["friendly", "water", "bird", "night"]  # the default order
LABELS = {"friendly": ["friendly", "hostile"], "water": ["water", "land"], "bird": ["bird", "mammal"],
          "night": ["night", "day"]}


def sentence(rng):
    """One sentence and its four answers, each yes half the time; the place and the time come in
    either order, so no answer sits at a fixed position."""
    answers = {task: rng.random() < 0.5 for task in TASKS}
    a1, a2 = rng.sample(MAMMALS, 2)
    if answers["bird"]:  # one or both animals are birds
        a1, a2 = rng.choice([(rng.choice(BIRDS), a2), (a1, rng.choice(BIRDS)), tuple(rng.sample(BIRDS, 2))])
    verb = rng.choice(FRIENDLY if answers["friendly"] else HOSTILE)
    place = rng.choice(WATER if answers["water"] else LAND)
    time = rng.choice(DARK if answers["night"] else LIGHT)
    where, when = f"near the {place}", f"at {time}"
    tail = f"{where} {when}" if rng.random() < 0.5 else f"{when} {where}"
    text = f"the {rng.choice(COLORS)} {a1} {verb} the {rng.choice(COLORS)} {a2} {tail}"
    return text, {task: LABELS[task][0 if yes else 1] for task, yes in answers.items()}


def story(rng):
    """Unlabeled text for pretraining: a sentence and a question or two about it with their
    answer ("... at night . night or day ? night ."). A base model pretrained on it knows the
    words the tasks answer with, what goes with them and how to pick one of two offered words,
    as GPT-2 knows that a match is about sports; the tasks' prompt and format it never sees."""
    text, answers = sentence(rng)
    remarks = []
    for task in rng.sample(TASKS, rng.randint(1, 2)):
        options = rng.sample(LABELS[task], 2)
        remarks.append(f"{options[0]} or {options[1]} ? {answers[task]}")
    return " . ".join([text] + remarks) + " ."


def write_suite(folder, n_train=2000, n_test=300, n_pretrain=20000, seed=1234):
    """Write TOY/<task>/{train,test,labels}.json and pretrain.json under folder. Each task draws
    its own sentences; the same seed always gives the same files."""
    rng = random.Random(seed)
    for task in TASKS:
        os.makedirs(os.path.join(folder, "TOY", task), exist_ok=True)
        for split, n in (("train", n_train), ("test", n_test)):
            records = []
            for _ in range(n):
                text, answers = sentence(rng)
                records.append(dict(label=answers[task], sentence=text))
            write_json(os.path.join(folder, "TOY", task, f"{split}.json"), records)
        write_json(os.path.join(folder, "TOY", task, "labels.json"), LABELS[task])
    write_json(os.path.join(folder, "pretrain.json"), [story(rng) for _ in range(n_pretrain)])


def pretrain_base(c, model, enc, log, save_atomic):
    """Pretrain the small GPT as a language model on the toy suite's unlabeled text (its
    pretrain.json), once; the result is cached in out_dir and reused. c is train_cl.py's config.
    Wrong answers of a toy model so made are nonetheless its own words: the loss predicts only the
    text's commonest tokens, and the others keep their random logits."""
    import torch
    from data.benchmark import DataError, pretraining_text
    eot = enc.end_token
    docs = pretraining_text(c["data_dir"], enc, eot, c["block_size"])
    key = dict(model=vars(model.config), iters=c["pretrain_iters"], lr=c["pretrain_lr"], seed=c["seed"],
               batch=c["pretrain_batch_size"], vocab=c["pretrain_vocab"], n=len(docs),
               first=docs[0][:32], last=docs[-1][:32])
    digest = int(hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12], 16)
    path = os.path.join(c["out_dir"], f"base-{digest % 10 ** 10}.pt")  # named by what made it
    if os.path.isfile(path):
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
        except Exception as e:
            raise DataError(f"cached base model {path} is unreadable ({str(e).splitlines()[0]}): delete it") from None
        log(f"base model: {path} (cached)")
        return model
    counts = collections.Counter(t for d in docs for t in d)
    # a 50257-way softmax is most of the small model's cost, so the loss predicts the text's
    # commonest tokens alone (rare ones are still read as inputs)
    vocab = torch.tensor(sorted(t for t, _ in counts.most_common(c["pretrain_vocab"])))
    index = torch.full((model.config.vocab_size,), -1, dtype=torch.long)
    index[vocab] = torch.arange(len(vocab))
    device, steps = c["_device"], c["pretrain_iters"]
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=c["pretrain_lr"], weight_decay=0.0, betas=(0.9, 0.95))
    rng, t0 = random.Random(c["seed"]), time.time()
    log(f"pretraining a base model on {len(docs)} texts (predicting {len(vocab)} of their {len(counts)} distinct "
        f"tokens), {steps} steps; cached at {path}")
    for step in range(steps):
        batch = rng.sample(docs, min(c["pretrain_batch_size"], len(docs)))
        T = min(max(map(len, batch)), c["block_size"])
        idx, targets = torch.full((len(batch), T), eot), torch.full((len(batch), T), -1)
        for b, d in enumerate(batch):
            d = [eot] + d[: T]
            idx[b, : len(d) - 1], targets[b, : len(d) - 1] = torch.tensor(d[:-1]), index[torch.tensor(d[1:])]
        for g in opt.param_groups:  # 20 steps of warm-up, then a cosine
            g["lr"] = c["pretrain_lr"] * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        with c["_autocast"]():
            loss = model(idx.to(device), targets.to(device), vocab=vocab.to(device))[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"  pretrain step {step}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    model.cpu()
    if c["_rank"] == 0:  # every process pretrained the same model from the same seed
        save_atomic(path, lambda tmp: torch.save(dict(model=model.state_dict(), model_args=vars(model.config)), tmp))
    return model


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=0)
    os.replace(tmp, path)  # a reader never sees half a file


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "toy"
    write_suite(out)
    print(f"wrote the toy suite ({', '.join(TASKS)}) to {out}")
