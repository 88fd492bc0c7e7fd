"""
The continual-learning benchmark of O-LoRA (which GORP uses), read from its own folder layout:

    <data_dir>/<group>/<task>/train.json   a JSON list of {"label": ..., "sentence": ...}
    <data_dir>/<group>/<task>/test.json    the same (dev.json, where present, is ignored)
    <data_dir>/<group>/<task>/labels.json  the list of label strings

and turned into prompts and answers as method.md section 6 specifies, then into batches. The
built-in toy suite (data/toy.py) is written in this same layout, so one code path reads both.
"""

import collections
import json
import os
import random
import re
import string

import torch

# method.md §6: the task orders of the benchmark
ORDERS = {
    1: ["dbpedia", "amazon", "yahoo", "agnews"],
    2: ["dbpedia", "amazon", "agnews", "yahoo"],
    3: ["yahoo", "amazon", "agnews", "dbpedia"],
    4: ["MNLI", "CB", "WiC", "COPA", "QQP", "BoolQA", "RTE", "IMDB", "yelp", "amazon", "SST-2", "dbpedia",
        "agnews", "MultiRC", "yahoo"],
    5: ["MultiRC", "BoolQA", "WiC", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia", "agnews",
        "yelp", "amazon", "yahoo"],
    6: ["yelp", "amazon", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia", "agnews", "yahoo",
        "MultiRC", "BoolQA", "WiC"],
}

# method.md §6: one instruction per group, each ending in a newline; COPA has none (and no Option line)
INSTRUCTIONS = {
    "TC": "What is the topic of the following paragraph? Choose one from the option.\n",
    "SC": "What is the sentiment of the following paragraph? Choose one from the option.\n",
    "NLI": 'What is the logical relationship between the "sentence 1" and the "sentence 2"? '
           'Choose one from the option.\n',
    "QQP": 'Whether the "first sentence" and the "second sentence" have the same meaning? '
           'Choose one from the option.\n',
    "BoolQA": "According to the following passage, is the question true or false? Choose one from the option.\n",
    "MultiRC": "According to the following passage and question, is the candidate answer true or false? "
               "Choose one from the option.\n",
    "WiC": "Given a word and two sentences, whether the word is used with the same sense in both sentence? "
           "Choose one from the option.\n",
    "COPA": "",
    # the project's built-in suite (data/toy.py): the Dataset line names the question
    "TOY": "What does the dataset ask of the following sentence? Choose one from the option.\n",
}


class DataError(ValueError):
    """Bad input data: train_cl.py prints its message as a one-line error."""


def find_tasks(data_dir):
    """{task: group} for every <group>/<task> folder holding a train.json."""
    if not os.path.isdir(data_dir):
        raise DataError(f"data_dir {data_dir} does not exist")
    found = {}
    for group in sorted(os.listdir(data_dir)):
        gdir = os.path.join(data_dir, group)
        if not os.path.isdir(gdir):
            continue
        for task in sorted(os.listdir(gdir)):
            if os.path.isfile(os.path.join(gdir, task, "train.json")):
                found[task] = group
    if not found:
        raise DataError(f"data_dir {data_dir} holds no task (expected <group>/<task>/train.json)")
    return found


def read_json_list(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise DataError(f"{path} should hold a JSON list of {what}")
    return data


def load_split(data_dir, group, task, split, cap=0, seed=0, log=print):
    """The records of one split, checked; at most cap of them (0: all), a seeded sample so a
    prefix-ordered file still gives every class. Records whose label labels.json does not list
    are left out, and one line says how many and which labels (O-LoRA's MNLI test.json holds
    gold-less pairs labelled "-"; a typo in a user's own file shows up there too)."""
    folder = os.path.join(data_dir, group, task)
    path = os.path.join(folder, f"{split}.json")
    if not os.path.isfile(path):
        raise DataError(f"task {task} has no {split}.json in {folder}")
    records = read_json_list(path, 'records {"label", "sentence"}')
    if not records:
        raise DataError(f"{path} is empty")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("sentence"), str) or "label" not in r:
            raise DataError(f"{path} record {i} lacks a \"label\" or a \"sentence\" string")
    labels = load_labels(folder, records)
    unlisted = collections.Counter(str(r["label"]) for r in records if str(r["label"]) not in labels)
    if unlisted:
        records = [r for r in records if str(r["label"]) in labels]
        if not records:
            raise DataError(f"{path}: no record has a label that labels.json lists "
                            f"(they have {', '.join(map(repr, unlisted))})")
        log(f"{task}: {sum(unlisted.values())} records of {split}.json left out, labelled "
            + ", ".join(f"{label!r} ({n})" for label, n in unlisted.most_common())
            + ", which labels.json does not list")
    if cap and len(records) > cap:
        records = random.Random(seed).sample(records, cap)
    return [dict(sentence=r["sentence"], label=str(r["label"])) for r in records], labels


def load_task(data_dir, group, task, enc, max_train, max_test, max_len, seed, valid=False, log=print):
    """One task: its labels and its train and test examples as (prompt ids, answer ids). With
    valid, the test examples are held out of train.json instead, so tuning never sees test.json."""
    if valid:
        records, labels = load_split(data_dir, group, task, "train", log=log)
        records = random.Random(seed).sample(records, len(records))
        held = max_test or len(records) // 5
        if held >= len(records):
            raise DataError(f"task {task} has {len(records)} training examples: too few to hold out {held}")
        splits = dict(train=records[held:][: max_train or None], test=records[:held])
    else:
        splits = {}
        for split, cap in (("train", max_train), ("test", max_test)):
            splits[split], labels = load_split(data_dir, group, task, split, cap, seed, log)
    data = {split: [encode_example(enc, group, task, labels, r, max_len, enc.end_token) for r in records]
            for split, records in splits.items()}
    return dict(name=task, group=group, labels=labels, **data)


def load_labels(folder, records):
    """labels.json, or, where a task has none, the labels its records use (sorted)."""
    path = os.path.join(folder, "labels.json")
    if os.path.isfile(path):
        return [str(label) for label in read_json_list(path, "label strings")]
    return sorted({str(r["label"]) for r in records})


def prompt_parts(group, task, labels):
    """The template around the sentence (method.md §6): (head, tail), with the prompt being
    head + sentence + tail. Kept apart so a long sentence is cut, never the template."""
    if group not in INSTRUCTIONS:
        raise DataError(f"no instruction for group {group} (known: {', '.join(INSTRUCTIONS)}); add one to "
                        "INSTRUCTIONS in data/benchmark.py")
    head = f"Task:{group}\nDataset:{task}\n"
    if group != "COPA":  # COPA: the sentence carries its two choices; no instruction, no Option line
        head += f"{INSTRUCTIONS[group]}Option: {', '.join(labels)} \n"
    return head, "\nAnswer:"


def normalize(text):
    """method.md §6's exact-match normalisation: lower case, no punctuation, single spaces."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def encode_example(enc, group, task, labels, record, max_len, eot):
    """(prompt ids, answer ids). The answer is " " + label + the model's end token eot: a word
    after a colon is written with its leading space. A tokenizer with a bos_token (Llama 3)
    starts the prompt with it. The prompt leaves room for the task's longest answer, so that
    greedy decoding fits in max_len too; a prompt too long loses the end of its sentence, never
    the template or the "Answer:" tail."""
    head, tail = prompt_parts(group, task, labels)
    bos = [] if getattr(enc, "bos_token", None) is None else [enc.bos_token]
    head_ids, tail_ids = bos + enc.encode_ordinary(head), enc.encode_ordinary(tail)
    sentence_ids = enc.encode_ordinary(record["sentence"])
    longest_answer = max(len(enc.encode_ordinary(" " + label)) for label in labels) + 1
    room = max_len - len(head_ids) - len(tail_ids) - longest_answer
    if room < 1:
        raise DataError(f"max_len {max_len} leaves no room for a sentence of task {task} "
                        f"(its template and longest answer take {max_len - room})")
    return head_ids + sentence_ids[:room] + tail_ids, enc.encode_ordinary(" " + record["label"]) + [eot]


def collate(examples, device):
    """(prompt, answer) examples as one batch: right-padded (B, T) inputs and targets, the loss
    falling on the answer tokens alone (target -1 elsewhere)."""
    T = max(len(p) + len(a) for p, a in examples) - 1
    idx = torch.zeros(len(examples), T, dtype=torch.long)
    targets = torch.full((len(examples), T), -1, dtype=torch.long)
    for b, (prompt, answer) in enumerate(examples):
        seq = prompt + answer
        idx[b, : len(seq) - 1] = torch.tensor(seq[:-1])
        targets[b, len(prompt) - 1: len(seq) - 1] = torch.tensor(answer)
    if device.type == "cuda":  # pinned, so the copy need not block the host
        idx, targets = idx.pin_memory(), targets.pin_memory()
    return idx.to(device, non_blocking=True), targets.to(device, non_blocking=True)


def pretraining_text(data_dir, enc, eot, max_len):
    """Token lists to pretrain the small GPT made here on, each ending in <|endoftext|>: the
    sentences of data_dir/pretrain.json, which the toy suite writes. A real benchmark has none:
    its runs start from a pretrained model (--init_from=smollm2)."""
    path = os.path.join(data_dir, "pretrain.json")
    if not os.path.isfile(path):
        raise DataError(f"init_from=pretrain needs text to pretrain on, and {data_dir} has no pretrain.json (the toy "
                        "suite writes one): start from a pretrained model, --init_from=smollm2, or from scratch")
    return [enc.encode_ordinary(s)[: max_len - 1] + [eot] for s in read_json_list(path, "sentences")]
