"""An E2E-style data-to-text task generated in code (no downloads): restaurant records of
slot-value pairs, each with several reference descriptions.

Like the E2E NLG challenge's data (Novikova et al. 2017), a record is a meaning representation
(`name[The Punter], eatType[pub], food[Italian], priceRange[cheap], area[riverside], near[Avalon]`)
of three to eight of eight slots, and its references are fluent sentences that say every slot.
The references of one record differ in clause order, sentence split and wording (each slot value
has several phrasings), so a model has to learn both what to say (every slot, with the right
value) and how these texts say it; no single template reproduces them. Held-out records are slot
combinations that never occur in training (names and values are shared, as in E2E).
Deterministic from the seed.
"""
from __future__ import annotations

import random

SLOTS = ("name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near")

NAMES = ["The Punter", "The Eagle", "Blue Spice", "The Mill", "Cotto", "Zizzi", "Aromi", "Fitzbillies", "Strada",
         "The Wrestlers", "Clowns", "Giraffe", "The Rice Boat", "The Phoenix", "Wildwood", "Alimentum", "Cocum",
         "The Dumpling Tree", "The Olive Grove", "The Plough", "The Twenty Two", "The Waterman", "Browns Cambridge",
         "The Golden Curry", "The Cricketers", "Green Man", "Bibimbap House", "Loch Fyne", "Midsummer House",
         "The Vaults", "Taste of Cambridge", "The Cambridge Blue", "Travellers Rest", "The Golden Palace",
         "The Copper Kettle", "Nandos City", "The Red Lion", "Saffron Brasserie", "Little Italy", "The Anchor"]
LANDMARKS = ["Avalon", "Burger King", "Café Sicilia", "The Sorrento", "Yippee Noodle Bar", "Raja Indian Cuisine",
             "All Bar One", "Crowne Plaza Hotel", "Rainbow Vegetarian Café", "Express by Holiday Inn", "The Bakers",
             "Café Rouge", "Ranch", "Café Brazil", "The Portland Arms", "Clare Hall", "The Six Bells", "Café Adriatic",
             "The Bridge", "Crowne Plaza"]
EAT_TYPES = ["restaurant", "pub", "coffee shop"]
FOODS = ["English", "French", "Italian", "Chinese", "Indian", "Japanese", "Fast food"]
PRICES = ["cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"]
RATINGS = ["low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"]
AREAS = ["city centre", "riverside"]
FAMILY = ["yes", "no"]
# probability that an optional slot is in a record (name and eatType always are)
SLOT_P = {"food": 0.8, "priceRange": 0.7, "customer rating": 0.65, "area": 0.75, "familyFriendly": 0.6, "near": 0.5}

# ----------------------------------------------------------------------------------------------
# phrasings of each slot value: attributive (before the eat type), predicative ("it is ..."),
# and as a participial phrase (", serving ...")


def _food_noun(food: str, r: random.Random) -> str:
    if food == "Fast food":
        return r.choice(["fast food", "fast food", "burgers and fast food"])
    return r.choice([f"{food} food", f"{food} food", f"{food} cuisine", f"{food} dishes"])


def _food_phrase(food: str, r: random.Random) -> str:
    noun = _food_noun(food, r)
    return r.choice([f"serving {noun}", f"that serves {noun}", f"offering {noun}", f"which provides {noun}"])


def _price_phrase(price: str, r: random.Random) -> str:
    if price == "cheap":
        return r.choice(["with cheap prices", "with low prices", "where prices are cheap", "that is inexpensive"])
    if price == "moderate":
        return r.choice(["with moderate prices", "that is moderately priced", "with mid-range prices"])
    if price == "high":
        return r.choice(["with high prices", "that is expensive", "with a high price range"])
    if price == "less than £20":
        return r.choice(["with meals for less than £20", "with prices under £20", "costing less than £20"])
    if price == "£20-25":
        return r.choice(["with prices of £20-25", "in the £20-25 price range", "costing £20-25 per meal"])
    return r.choice(["with prices of more than £30", "costing more than £30", "in the more than £30 price range"])


def _rating_phrase(rating: str, r: random.Random) -> str:
    return r.choice([f"with a {rating} customer rating", f"rated {rating} by customers",
                     f"that has a customer rating of {rating}", f"with a customer rating of {rating}"])


def _area_phrase(area: str, r: random.Random) -> str:
    if area == "riverside":
        return r.choice(["in the riverside area", "by the riverside", "located on the riverside"])
    return r.choice(["in the city centre", "located in the city centre", "in the centre of the city"])


def _family_phrase(family: str, r: random.Random) -> str:
    if family == "yes":
        return r.choice(["that is family-friendly", "which is kid friendly", "where children are welcome",
                         "that welcomes families"])
    return r.choice(["that is not family-friendly", "which is not kid friendly", "where children are not welcome",
                     "that is for adults only"])


def _near_phrase(near: str, r: random.Random) -> str:
    return r.choice([f"near {near}", f"close to {near}", f"not far from {near}", f"near the {near}"])


PHRASES = {"food": _food_phrase, "priceRange": _price_phrase, "customer rating": _rating_phrase,
           "area": _area_phrase, "familyFriendly": _family_phrase, "near": _near_phrase}


def _predicate(slot: str, phrase: str) -> str:
    """The phrase as the predicate of a sentence whose subject is the place ("It is ...")."""
    for lead in ("that is ", "which is ", "that has ", "that serves ", "which provides ", "that welcomes "):
        if phrase.startswith(lead):
            verb = lead.split()[1]
            return {"is": "is ", "has": "has ", "serves": "serves ", "provides": "provides ",
                    "welcomes": "welcomes "}[verb] + phrase[len(lead):]
    if phrase.startswith("where "):
        return "is a place " + phrase
    if phrase.startswith(("serving", "offering", "costing", "rated", "located")):
        verb = {"serving": "serves", "offering": "offers", "costing": "costs", "rated": "is rated",
                "located": "is located"}[phrase.split()[0]]
        return verb + phrase[len(phrase.split()[0]):]
    return "is " + phrase if not phrase.startswith("with") else "comes " + phrase


def _join(parts: list, r: random.Random) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + r.choice([" and ", ", and "]) + parts[-1]


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def realise(record: dict, r: random.Random) -> str:
    """One reference description of `record`: an opening that names the place and its type
    (maybe with the food), then every other slot in a random order, in one or more sentences."""
    name, eat = record["name"], record["eatType"]
    rest = [s for s in SLOTS[2:] if s in record]
    r.shuffle(rest)
    food_in_opening = "food" in record and record["food"] != "Fast food" and r.random() < 0.5
    if food_in_opening:
        rest.remove("food")
        kind = f"{record['food']} {eat}"
    else:
        kind = eat
    opening = r.choice([f"{name} is {_article(kind)} {kind}", f"There is {_article(kind)} {kind} called {name}",
                        f"{name} is {_article(kind)} {kind} {'' if r.random() < 0.5 else 'you can visit '}".rstrip(),
                        f"{_article(kind).capitalize()} {kind} named {name}"])
    opening_is_np = opening.startswith(("A ", "An "))
    phrases = [(s, PHRASES[s](record[s], r)) for s in rest]
    if not phrases:
        return opening + (" is worth a visit." if opening_is_np else ".")
    split = r.randint(0, len(phrases)) if not opening_is_np else r.randint(1, len(phrases))
    first, later = phrases[:split], phrases[split:]
    if opening_is_np:
        sentence = opening + " " + _predicate(*first[0]) + (", " + ", ".join(p for _, p in first[1:]) if first[1:] else "")
        sentences = [sentence + "."]
    else:
        sentences = [opening + (" " + ", ".join(p for _, p in first) if first else "") + "."]
    while later:
        k = min(len(later), r.randint(1, 3))
        chunk, later = later[:k], later[k:]
        subject = r.choice(["It", "It", name, f"The {eat}"])
        sentences.append(f"{subject} " + _join([_predicate(s, p) for s, p in chunk], r) + ".")
    return " ".join(sentences)


def sample_record(r: random.Random) -> dict:
    """A record: name and eatType always, each other slot with its own probability."""
    rec = {"name": r.choice(NAMES), "eatType": r.choice(EAT_TYPES)}
    values = {"food": FOODS, "priceRange": PRICES, "customer rating": RATINGS, "area": AREAS,
              "familyFriendly": FAMILY, "near": LANDMARKS}
    for slot in SLOTS[2:]:
        if r.random() < SLOT_P[slot]:
            rec[slot] = r.choice(values[slot])
    return rec


def format_mr(record: dict) -> str:
    """The E2E meaning representation: `slot[value]` pairs in the fixed slot order."""
    return ", ".join(f"{s}[{record[s]}]" for s in SLOTS if s in record)


def e2e_splits(n_train: int = 1500, n_val: int = 100, n_test: int = 200, n_refs: int = 4, seed: int = 0) -> dict:
    """{"train", "val", "test"}: lists of {"mr", "record", "refs"} with `n_refs` distinct references
    each; no meaning representation is in two splits or twice in one."""
    r = random.Random(seed)
    seen: set = set()
    out = {}
    for split, n in (("test", n_test), ("val", n_val), ("train", n_train)):
        rows = []
        while len(rows) < n:
            rec = sample_record(r)
            mr = format_mr(rec)
            if mr in seen:
                continue
            seen.add(mr)
            refs: list = []
            for _ in range(20 * n_refs):
                text = realise(rec, r)
                if text not in refs:
                    refs.append(text)
                if len(refs) == n_refs:
                    break
            while len(refs) < n_refs:  # a record with few slots has few distinct texts
                refs.append(refs[len(refs) % max(1, len(refs))])
            rows.append({"mr": mr, "record": rec, "refs": refs})
        out[split] = rows
    return out


__all__ = ["SLOTS", "e2e_splits", "format_mr", "realise", "sample_record"]
