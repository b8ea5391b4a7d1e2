"""Writes the example datasets: a narrow, checkable task (plain-English requests → one kubectl
command) in chat, instruction and preference formats, plus raw text for domain adaptation.

Deterministic: rerunning it rewrites the same files. Run from anywhere:
    python3 examples/data/generate.py
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEM = "You turn requests into a single kubectl command. Answer with the command only."

RESOURCES = [("pods", "pod"), ("deployments", "deployment"), ("services", "service"),
             ("configmaps", "configmap"), ("secrets", "secret"), ("jobs", "job"),
             ("finetunejobs", "finetunejob"), ("adapters", "adapter")]
NAMESPACES = ["default", "staging", "prod", "ml-team", "research"]
NAMES = ["web", "api", "trainer", "smollm2-sft", "cache", "ingest"]


def tasks(rng):
    for plural, singular in RESOURCES:
        for ns in NAMESPACES:
            name = rng.choice(NAMES)
            yield (f"List all {plural} in the {ns} namespace.", f"kubectl get {plural} -n {ns}")
            yield (f"Show the details of the {singular} {name} in {ns}.",
                   f"kubectl describe {singular} {name} -n {ns}")
            yield (f"Delete the {singular} called {name} in namespace {ns}.",
                   f"kubectl delete {singular} {name} -n {ns}")
            yield (f"Print the {singular} {name} from {ns} as YAML.",
                   f"kubectl get {singular} {name} -n {ns} -o yaml")


def main():
    rng = random.Random(7)
    pairs = sorted(set(tasks(rng)))
    rng.shuffle(pairs)
    train, evaluation = pairs[:120], pairs[120:150]

    def chat(prompt, answer):
        return {"messages": [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": prompt},
                             {"role": "assistant", "content": answer}]}

    write("chat-train.jsonl", [chat(p, a) for p, a in train])
    write("chat-eval.jsonl", [chat(p, a) for p, a in evaluation])
    write("instruction-train.jsonl",
          [{"instruction": SYSTEM, "input": p, "output": a} for p, a in train])
    write("preference-train.jsonl",
          [{"prompt": p, "chosen": a, "rejected": chatty(a, rng)} for p, a in train])
    write("domain-text.jsonl", [{"text": t} for t in DOMAIN_TEXT])
    narrow = sorted(set(reviews(random.Random(11))))
    rng.shuffle(narrow)
    write("narrow-train.jsonl", [user_assistant(p, a) for p, a in narrow[:300]])
    write("narrow-eval.jsonl", [user_assistant(p, a) for p, a in narrow[300:340]])
    dates = list(date_requests(random.Random(13)))
    write("dates-train.jsonl", [user_assistant(p, a) for p, a in dates[:480]])
    write("dates-eval.jsonl", [user_assistant(p, a) for p, a in dates[480:530]])


# The forgetting example: a narrow format task with no system prompt or instruction to cue it, so
# a model tuned on it alone learns to answer *everything* with a label (see docs/forgetting.md).
POSITIVE = ["great", "excellent", "wonderful", "fantastic", "lovely", "superb", "delightful"]
NEGATIVE = ["terrible", "awful", "disappointing", "horrible", "poor", "dreadful", "useless"]
THINGS = ["the hotel room", "the pizza", "this phone", "the concert", "the delivery", "our guide",
          "the new laptop", "the coffee", "the film", "the train ride", "the support team",
          "this jacket", "the museum tour", "the headphones", "the bakery"]
FRAMES = ["Honestly, {t} was {a}.", "I thought {t} was {a} overall.", "{T} turned out {a}.",
          "My verdict on {t}: {a}.", "Everyone agreed {t} was {a}."]


def reviews(rng):
    for words, label in ((POSITIVE, "POSITIVE"), (NEGATIVE, "NEGATIVE")):
        for t in THINGS:
            for frame in FRAMES:
                for a in rng.sample(words, 3):
                    yield frame.format(t=t, T=t[0].upper() + t[1:], a=a), label


# The second forgetting task: date normalisation, five phrasings of the request and four spellings
# of the date, answered with the ISO date alone. Unlike the reviews, the request says what it
# wants; the task is narrow in its answers (digits and dashes), which is what leaks into general
# ones. Every date is used once, so no eval request repeats a training one.
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
ASKS = ["Convert {d} to ISO 8601 format.", "What is {d} in YYYY-MM-DD form?",
        "Please rewrite the date {d} as an ISO date.", "Normalise this date: {d}",
        "I wrote down {d}. Give me that date in the standard ISO format."]


def date_requests(rng):
    days = rng.sample(range(40 * 12 * 28), 530)
    for k in days:
        year, month, day = 1985 + k // 336, (k // 28) % 12, 1 + k % 28
        name = MONTHS[month]
        spelled = rng.choice([f"{name} {day}, {year}", f"{day} {name} {year}",
                              f"{day:02d}/{month + 1:02d}/{year}", f"{name[:3]}. {day} {year}"])
        yield rng.choice(ASKS).format(d=spelled), f"{year}-{month + 1:02d}-{day:02d}"


def user_assistant(prompt, answer):
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": answer}]}


def chatty(answer, rng):
    openers = ["Sure! You can run", "Great question. Try", "To do that, use the command"]
    return f"{rng.choice(openers)} `{answer}` and it should work. Let me know if you need more help!"


def write(name, rows):
    with open(HERE / name, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


DOMAIN_TEXT = [
    "A FinetuneJob names a base model, a dataset and a method. The operator turns it into a trainer pod, "
    "mounts the manifest, and follows the pod until the adapter is written.",
    "Checkpoints are directories written under a temporary name and renamed when complete, so a reader "
    "never sees half a checkpoint. A manifest lists the sha256 of every file.",
    "When a node is drained, the kubelet sends SIGTERM to the trainer. The trainer finishes its step, "
    "writes a checkpoint and exits with code 143; the next attempt resumes from that step.",
    "LoRA freezes the base weights and learns two small matrices per adapted layer. Their product, "
    "scaled by alpha over rank, is added to the frozen weight.",
    "Direct preference optimisation compares the log-probabilities of a chosen and a rejected answer "
    "under the tuned model and under a reference model, and widens the margin between them.",
    "Catastrophic forgetting shows when a model tuned on a narrow task starts answering every question "
    "in that task's format. A retention probe compares answers to general prompts before and after.",
    "Train and eval data must not overlap. A contamination check counts the n-grams an eval sample "
    "shares with the training set and reports samples above a threshold.",
    "RoPE scaling stretches the rotary position embeddings so a model can read past the context length "
    "it was trained with; linear, dynamic NTK, YaRN and llama3 scaling trade accuracy differently.",
    "Quantized export writes the merged model as GGUF, where q8_0 stores blocks of 32 weights as "
    "8-bit integers with one 16-bit scale each.",
    "Kueue admits a suspended job when its queue has quota; the operator starts the trainer pod only "
    "after the job's suspend field turns false.",
    "Early stopping watches the eval loss. When it has not improved for a number of evaluations, "
    "training stops and the best checkpoint becomes the result.",
    "Gradient accumulation sums gradients over several micro-batches before one optimizer step. The loss "
    "must be normalised by the supervised tokens of all micro-batches together.",
]

if __name__ == "__main__":
    main()
