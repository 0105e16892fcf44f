"""Reproducible task data generated in code (no downloads).

`sentiment_splits`: templated sentiment sentences with negation and contrast; the test split uses
templates never seen in training (same word lists), so the task cannot be solved by memorising
surface forms, and a second test split new sentences of the training templates (how well the
training distribution was fitted). `word_problem_splits`: grade-school word problems with GSM8K-style worked answers
("... 3*4=12 ...\n#### 17"): multi-step, ten templates, varied names, items and numbers; the test
split holds different instances (no question text shared with training).
"""
from __future__ import annotations

import random

SUBJECTS = ["the movie", "this restaurant", "the hotel", "that album", "the phone", "this book", "the service",
            "the concert", "the game", "this laptop", "the show", "the meal", "the tour", "that novel",
            "the course", "this app", "the play", "the museum", "the coffee", "the trip"]
NOUNS = ["movie", "restaurant", "hotel", "album", "phone", "book", "service", "concert", "game", "laptop",
         "show", "meal", "tour", "novel", "course", "app", "play", "museum", "coffee", "trip"]
POSITIVE = ["wonderful", "excellent", "delightful", "superb", "charming", "fantastic", "brilliant", "lovely",
            "great", "impressive", "enjoyable", "remarkable", "pleasant", "fun", "satisfying", "amazing"]
NEGATIVE = ["awful", "terrible", "dreadful", "boring", "disappointing", "horrible", "mediocre", "dull",
            "painful", "annoying", "poor", "tedious", "bland", "frustrating", "forgettable", "bad"]

# (template, kind): kind "plain" -> label of {a}; "neg" -> flipped; "contrast" -> label of {b}
TRAIN_TEMPLATES = [
    ("{S} was {a}.", "plain"),
    ("I thought {s} was {a}.", "plain"),
    ("Overall, {s} felt {a}.", "plain"),
    ("{S} is {a}, honestly.", "plain"),
    ("My friends found {s} {a}.", "plain"),
    ("{S} was not {a}.", "neg"),
    ("I would not call {s} {a}.", "neg"),
    ("{S} is far from {a}.", "neg"),
    ("{S} looked {a}, but it was {b}.", "contrast"),
    ("Although {s} seemed {a}, it turned out {b}.", "contrast"),
]
TEST_TEMPLATES = [
    ("What a {a} {n}!", "plain"),
    ("Everyone agreed that {s} was really {a}.", "plain"),
    ("Honestly, {s} was anything but {a}.", "neg"),
    ("It is hard to call {s} {a}.", "neg"),
    ("People say {s} is {a}; I found it {b}.", "contrast"),
    ("{S} started {a} yet ended {b}.", "contrast"),
]


def _sentence(rng: random.Random, template: str, kind: str) -> dict:
    i = rng.randrange(len(SUBJECTS))
    s, n = SUBJECTS[i], NOUNS[i]
    pos_a = rng.random() < 0.5
    a = rng.choice(POSITIVE if pos_a else NEGATIVE)
    pos_b = not pos_a if rng.random() < 0.8 else pos_a
    b = rng.choice(POSITIVE if pos_b else NEGATIVE)
    text = template.format(S=s[0].upper() + s[1:], s=s, a=a, b=b, n=n)
    if kind == "plain":
        label = int(pos_a)
    elif kind == "neg":
        label = int(not pos_a)
    else:
        label = int(pos_b)
    return {"sentence": text, "label": label}


def sentiment_splits(n_train: int = 2000, n_test: int = 400, seed: int = 0, n_test_seen: int = 0) -> dict:
    """{"train": [...], "test": [...], "test_seen": [...]} of {"sentence", "label"}. "test" uses
    held-out templates (generalisation); "test_seen" holds new sentences of the training templates,
    none of them in "train" (fit). Each split has its own random stream, so asking for "test_seen"
    leaves the other two unchanged."""
    rng = random.Random(seed)
    train = [_sentence(rng, *TRAIN_TEMPLATES[rng.randrange(len(TRAIN_TEMPLATES))]) for _ in range(n_train)]
    rng_t = random.Random(seed + 1_000_003)
    test = [_sentence(rng_t, *TEST_TEMPLATES[rng_t.randrange(len(TEST_TEMPLATES))]) for _ in range(n_test)]
    rng_s = random.Random(seed + 2_000_029)
    in_train = {r["sentence"] for r in train}
    test_seen = []
    while len(test_seen) < n_test_seen:
        template = TRAIN_TEMPLATES[rng_s.randrange(len(TRAIN_TEMPLATES))]
        row = _sentence(rng_s, *template)
        if row["sentence"] not in in_train:  # a new instance of the template, never trained on
            test_seen.append(row)
    return {"train": train, "test": test, "test_seen": test_seen}


# ----------------------------------------------------------------------------------------------
# grade-school word problems with worked answers

NAMES = ["Tom", "Anna", "Ravi", "Lena", "Omar", "Mia", "Kenji", "Sara", "Diego", "Nora", "Ali", "Emma", "Yusuf",
         "Chloe", "Ivan", "Priya"]
ITEMS = ["apples", "stickers", "marbles", "pencils", "cookies", "stamps", "books", "shells", "cards", "eggs"]


def _p_buy_give(r, name, item):
    a, b, c = r.randint(3, 30), r.randint(2, 9), r.randint(2, 9)
    d = r.randint(1, a + b * c - 1)
    q = (f"{name} has {a} {item}. {name} buys {b} bags with {c} {item} in each bag, then gives away {d} {item}. "
         f"How many {item} does {name} have now?")
    bc = b * c
    ans = f"{name} buys {b}*{c}={bc} {item}.\n{name} then has {a}+{bc}={a + bc} {item}.\nAfter giving away {d}, {name} has {a + bc}-{d}={a + bc - d} {item}.\n#### {a + bc - d}"
    return q, ans


def _p_price(r, name, item):
    n1, p1, n2, p2 = r.randint(2, 9), r.randint(2, 15), r.randint(2, 9), r.randint(2, 15)
    q = (f"{name} buys {n1} notebooks at ${p1} each and {n2} pens at ${p2} each. How much does {name} spend in total?")
    t1, t2 = n1 * p1, n2 * p2
    ans = f"The notebooks cost {n1}*{p1}=${t1}.\nThe pens cost {n2}*{p2}=${t2}.\nIn total {name} spends {t1}+{t2}=${t1 + t2}.\n#### {t1 + t2}"
    return q, ans


def _p_change(r, name, item):
    n, p = r.randint(2, 8), r.randint(3, 12)
    bill = ((n * p) // 10 + 1 + r.randint(0, 3)) * 10
    q = f"{name} buys {n} tickets that cost ${p} each and pays with ${bill}. How much change does {name} get?"
    t = n * p
    ans = f"The tickets cost {n}*{p}=${t}.\nThe change is {bill}-{t}=${bill - t}.\n#### {bill - t}"
    return q, ans


def _p_share(r, name, item):
    k, per = r.randint(2, 9), r.randint(2, 12)
    extra = r.randint(1, 20)
    total = k * per + extra
    q = (f"{name} has {total} {item}. {name} keeps {extra} and shares the rest equally among {k} friends. "
         f"How many {item} does each friend get?")
    ans = f"{name} shares {total}-{extra}={total - extra} {item}.\nEach friend gets {total - extra}/{k}={per} {item}.\n#### {per}"
    return q, ans


def _p_weeks(r, name, item):
    d, w, s = r.randint(2, 12), r.randint(2, 6), r.randint(1, 20)
    q = (f"{name} reads {d} pages every day. How many pages does {name} read in {w} weeks if {name} "
         f"skips {s} pages in total?")
    days = 7 * w
    tot = days * d
    ans = f"{w} weeks have 7*{w}={days} days.\n{name} would read {days}*{d}={tot} pages.\nSkipping {s} pages gives {tot}-{s}={tot - s}.\n#### {tot - s}"
    return q, ans


def _p_twice(r, name, item):
    a, m, k = r.randint(2, 20), r.randint(2, 5), r.randint(1, 15)
    other = r.choice([n for n in NAMES if n != name])
    q = (f"{name} has {a} {item}. {other} has {m} times as many {item} as {name}, plus {k} more. "
         f"How many {item} do they have together?")
    b = m * a + k
    ans = f"{other} has {m}*{a}+{k}={b} {item}.\nTogether they have {a}+{b}={a + b} {item}.\n#### {a + b}"
    return q, ans


def _p_boxes(r, name, item):
    rows, cols, boxes, broken = r.randint(2, 8), r.randint(2, 8), r.randint(2, 6), r.randint(1, 10)
    q = (f"A box holds {rows} rows of {cols} {item}. {name} fills {boxes} boxes, but {broken} {item} are damaged. "
         f"How many good {item} are there?")
    per = rows * cols
    tot = per * boxes
    ans = f"Each box holds {rows}*{cols}={per} {item}.\n{boxes} boxes hold {per}*{boxes}={tot} {item}.\nGood ones: {tot}-{broken}={tot - broken}.\n#### {tot - broken}"
    return q, ans


def _p_save(r, name, item):
    goal, have, per = r.randint(50, 300), r.randint(5, 40), r.randint(5, 25)
    goal = have + per * r.randint(2, 12)
    q = (f"{name} wants to save ${goal} for a bike and already has ${have}. {name} saves ${per} each week. "
         f"How many weeks will it take?")
    need = goal - have
    ans = f"{name} still needs {goal}-{have}=${need}.\nAt ${per} a week it takes {need}/{per}={need // per} weeks.\n#### {need // per}"
    return q, ans


def _p_speed(r, name, item):
    v, h1, h2 = r.randint(20, 70), r.randint(1, 5), r.randint(1, 4)
    q = (f"{name} drives at {v} miles per hour for {h1} hours, stops, then drives {h2} more hours at the same speed. "
         f"How many miles does {name} drive?")
    h = h1 + h2
    ans = f"{name} drives {h1}+{h2}={h} hours.\nThe distance is {v}*{h}={v * h} miles.\n#### {v * h}"
    return q, ans


def _p_age(r, name, item):
    a, d, y = r.randint(5, 15), r.randint(2, 30), r.randint(2, 10)
    other = r.choice([n for n in NAMES if n != name])
    q = f"{name} is {a} years old. {other} is {d} years older than {name}. How old will {other} be in {y} years?"
    b = a + d
    ans = f"{other} is {a}+{d}={b} years old.\nIn {y} years {other} will be {b}+{y}={b + y}.\n#### {b + y}"
    return q, ans


PROBLEM_TEMPLATES = [_p_buy_give, _p_price, _p_change, _p_share, _p_weeks, _p_twice, _p_boxes, _p_save, _p_speed,
                     _p_age]


def word_problem_splits(n_train: int = 2000, n_test: int = 200, seed: int = 0) -> dict:
    """{"train": [...], "test": [...]} of {"question", "answer"} (answer ends "#### N")."""
    rng = random.Random(seed)
    seen, test, train = set(), [], []
    rng_t = random.Random(seed + 7_777_777)
    while len(test) < n_test:
        t = PROBLEM_TEMPLATES[len(test) % len(PROBLEM_TEMPLATES)]
        q, a = t(rng_t, rng_t.choice(NAMES), rng_t.choice(ITEMS))
        if q not in seen:
            seen.add(q)
            test.append({"question": q, "answer": a})
    while len(train) < n_train:
        t = PROBLEM_TEMPLATES[rng.randrange(len(PROBLEM_TEMPLATES))]
        q, a = t(rng, rng.choice(NAMES), rng.choice(ITEMS))
        if q not in seen:
            seen.add(q)
            train.append({"question": q, "answer": a})
    return {"train": train, "test": test}
