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
writes pretrain.json, unlabeled stories of the language, to pretrain the default base model.

    python data/toy.py out/toy    # write the suite (train_cl.py does this by itself)
"""

import json
import os
import random
import sys

COLORS = ["red", "blue", "green", "yellow", "black", "white"]
MAMMALS, BIRDS = ["cat", "dog", "bear", "wolf", "horse", "fox"], ["owl", "duck", "crow", "swan", "hawk", "goose"]
FRIENDLY, HOSTILE = ["helps", "meets", "greets", "thanks", "feeds", "joins"], ["bites", "fights", "scares", "attacks", "robs", "kicks"]
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


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=0)
    os.replace(tmp, path)  # a reader never sees half a file


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "toy"
    write_suite(out)
    print(f"wrote the toy suite ({', '.join(TASKS)}) to {out}")
