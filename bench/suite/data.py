"""Deterministic data for the workload suite: every item comes from a seeded generator over the small tables below.

The tables are written for this repository (same licence as the code): common world facts (capitals, opposites),
everyday activities, and invented towns, people and products. Nothing is downloaded; the same seed gives the same
items on every machine, so every system answers the same questions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Australia", "Canberra"),
    ("India", "New Delhi"), ("the United Kingdom", "London"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Poland", "Warsaw"),
    ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Kenya", "Nairobi"), ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"), ("Thailand", "Bangkok"), ("South Korea", "Seoul"), ("Turkey", "Ankara"),
    ("the Netherlands", "Amsterdam"), ("Denmark", "Copenhagen"), ("Hungary", "Budapest"), ("Cuba", "Havana"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"), ("high", "low"), ("old", "new"),
    ("wet", "dry"), ("rich", "poor"), ("strong", "weak"), ("thick", "thin"), ("loud", "quiet"), ("long", "short"),
    ("clean", "dirty"), ("heavy", "light"), ("inside", "outside"), ("push", "pull"), ("win", "lose"),
    ("buy", "sell"), ("first", "last"),
]
ACTIVITIES = [  # (what the person is doing, a plausible next event)
    ("is washing a car in the driveway", "rinses the soap off with a hose."),
    ("is slicing vegetables in the kitchen", "drops the pieces into a pot of soup."),
    ("is tying the laces of running shoes", "jogs off down the street."),
    ("is painting a fence in the garden", "dips the brush into the can again."),
    ("is brushing a dog on the porch", "pulls a clump of fur out of the brush."),
    ("is climbing a ladder to the roof", "starts to clear leaves from the gutter."),
    ("is kneading dough on a floured table", "shapes it into a round loaf."),
    ("is ironing a shirt in the bedroom", "hangs it neatly in the closet."),
    ("is raking leaves in the yard", "scoops the pile into a large bag."),
    ("is tuning a guitar on the sofa", "strums a few chords to check the sound."),
    ("is pumping air into a bicycle tire", "squeezes the tire to test it."),
    ("is wrapping a present at the table", "tapes the paper shut and adds a bow."),
    ("is watering plants on the balcony", "moves on to the pots by the window."),
    ("is chopping wood behind the house", "stacks the split logs against the wall."),
    ("is mopping the kitchen floor", "wrings the mop out over the bucket."),
    ("is setting up a tent in a field", "hammers the last peg into the ground."),
    ("is shaving in front of a mirror", "rinses the razor under the tap."),
    ("is flipping pancakes on a griddle", "slides them onto a plate."),
    ("is fishing from a small boat", "reels in a wriggling fish."),
    ("is sewing a button onto a coat", "bites off the end of the thread."),
    ("is shoveling snow from the sidewalk", "throws salt on the cleared path."),
    ("is changing a flat tire by the road", "tightens the nuts with a wrench."),
    ("is frosting a cake in the kitchen", "adds sprinkles on top."),
    ("is folding laundry on the bed", "puts the stacks into a drawer."),
    ("is planting seeds in a garden bed", "covers them with soil and waters them."),
    ("is grilling burgers in the backyard", "flips the patties with a spatula."),
    ("is skating on a frozen pond", "glides in a wide circle."),
    ("is juggling three balls in a park", "catches them all and bows."),
    ("is polishing shoes by the door", "buffs them with a soft cloth."),
    ("is blowing up balloons for a party", "ties a knot in each one."),
]
PEOPLE = [("A man", "He"), ("A woman", "She"), ("A boy", "He"), ("A girl", "She"), ("An old man", "He"),
          ("An old woman", "She"), ("A young man", "He"), ("A young woman", "She")]
SYLLABLES = ["var", "nok", "mel", "ta", "rin", "dor", "sel", "ka", "lun", "bri", "os", "fen", "gal", "mor", "ti",
             "zan", "pel", "qui", "ras", "ul"]
PRODUCTS = ["copper", "cheese", "glass", "wool", "honey", "salt", "timber", "pottery", "silk", "olives", "paper",
            "tea", "leather", "marble", "apples", "rope", "clocks", "ink", "barley", "soap"]
REGIONS = ["northern", "southern", "eastern", "western", "central", "coastal", "mountain", "lake"]
FIRST_NAMES = ["Mara", "Tomas", "Ilse", "Bruno", "Nadia", "Oskar", "Lena", "Pavel", "Rosa", "Emil", "Vera", "Hugo"]
LAST_NAMES = ["Vell", "Dunmore", "Kasper", "Oyelaran", "Lindqvist", "Moreau", "Tanaka", "Quist", "Ferro", "Abbot"]
JOBS = ["engineer", "baker", "nurse", "pilot", "teacher", "carpenter", "chemist", "librarian", "farmer", "lawyer"]
CHAT_TOPICS = ["cooking pasta", "learning the guitar", "training for a 5k run", "keeping houseplants alive",
               "planning a budget", "starting a vegetable garden", "writing a cover letter", "sleeping better",
               "learning Spanish", "fixing a squeaky door", "taking better photos", "reading more books"]
FOLLOW_UPS = ["Can you give me one concrete tip?", "What is a common mistake to avoid?",
              "How long does it usually take to see progress?", "What should I do first tomorrow?",
              "Can you summarise that in one sentence?", "What tools do I need?"]


def letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


@dataclass(frozen=True)
class MultipleChoice:
    question: str
    options: list[str]
    answer: int


def _choices(rng: random.Random, correct: str, pool: list[str]) -> tuple[list[str], int]:
    options = rng.sample([p for p in pool if p != correct], 3) + [correct]
    rng.shuffle(options)
    return options, options.index(correct)


def mmlu_subjects() -> dict[str, callable]:
    """Subject -> item generator (rng -> MultipleChoice)."""
    capitals = [c for _, c in CAPITALS]
    antonyms = [b for _, b in OPPOSITES]

    def geography(rng):
        country, capital = rng.choice(CAPITALS)
        options, answer = _choices(rng, capital, capitals)
        return MultipleChoice(f"What is the capital of {country}?", options, answer)

    def arithmetic(rng):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        pool = [str(a + b + d) for d in (-10, -2, -1, 1, 2, 10)] + [str(a + b)]
        options, answer = _choices(rng, str(a + b), pool)
        return MultipleChoice(f"What is {a} + {b}?", options, answer)

    def vocabulary(rng):
        word, opposite = rng.choice(OPPOSITES)
        options, answer = _choices(rng, opposite, antonyms)
        return MultipleChoice(f"Which word means the opposite of '{word}'?", options, answer)

    def sequences(rng):
        start, step = rng.randint(1, 20), rng.randint(2, 9)
        seq = [start + i * step for i in range(4)]
        nxt = start + 4 * step
        pool = [str(nxt + d) for d in (-step, -1, 1, step, 2 * step)] + [str(nxt)]
        options, answer = _choices(rng, str(nxt), pool)
        return MultipleChoice(f"What number comes next: {', '.join(map(str, seq))}, ...?", options, answer)

    return {"geography": geography, "elementary arithmetic": arithmetic, "vocabulary": vocabulary,
            "number sequences": sequences}


def hellaswag_item(rng: random.Random) -> tuple[str, list[str], int]:
    """(context, 4 endings, index of the right one): the wrong endings belong to other activities."""
    i = rng.randrange(len(ACTIVITIES))
    person, pronoun = rng.choice(PEOPLE)
    doing, ending = ACTIVITIES[i]
    wrong = [e for j, (_, e) in enumerate(ACTIVITIES) if j != i]
    options = rng.sample(wrong, 3) + [ending]
    rng.shuffle(options)
    return f"{person} {doing}. {pronoun}", options, options.index(ending)


def town_name(rng: random.Random) -> str:
    return "".join(rng.sample(SYLLABLES, 3)).capitalize()


@dataclass(frozen=True)
class Town:
    name: str
    region: str
    population: int
    product: str
    mayor: str

    def document(self) -> str:
        return (f"{self.name} is a town in the {self.region} region. About {self.population:,} people live there. "
                f"{self.name} is best known for its {self.product}, which it sells across the country. "
                f"The mayor of {self.name} is {self.mayor}.")


def corpus(size: int, seed: int = 7) -> list[Town]:
    rng = random.Random(seed)
    towns, names = [], set()
    while len(towns) < size:
        name = town_name(rng)
        if name in names:
            continue
        names.add(name)
        towns.append(Town(name, rng.choice(REGIONS), rng.randrange(2_000, 90_000, 100), rng.choice(PRODUCTS),
                          f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"))
    return towns


@dataclass(frozen=True)
class Person:
    name: str
    age: int
    job: str
    city: str

    def bio(self, rng: random.Random) -> str:
        templates = [
            "{name} is a {age}-year-old {job} who lives in {city}.",
            "Born {age} years ago, {name} now works as a {job} in {city}.",
            "In {city}, the {job} {name} ({age}) runs a small workshop on weekends.",
        ]
        return rng.choice(templates).format(name=self.name, age=self.age, job=self.job, city=self.city)


def person(rng: random.Random) -> Person:
    return Person(f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}", rng.randint(19, 78), rng.choice(JOBS),
                  rng.choice(CAPITALS)[1])
