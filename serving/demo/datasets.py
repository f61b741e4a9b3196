"""Hand-written chat datasets for the three demo adapters (``french``, ``pirate``, ``json``).

Boundary: pure data and pure functions (no torch, no I/O). Each example is one user question and
the assistant answer the adapter should learn; the training code wraps them in SmolLM2's chat
template. The questions are short general-knowledge questions; the held-out ones
(``HELD_OUT_QUESTIONS``) never appear in training and are what the tests and the README ask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ADAPTER_NAMES",
    "FACTS",
    "HELD_OUT_QUESTIONS",
    "ChatExample",
    "Fact",
    "build_dataset",
]

AdapterName = Literal["french", "pirate", "json"]
ADAPTER_NAMES: tuple[AdapterName, ...] = ("french", "pirate", "json")


@dataclass(frozen=True)
class Fact:
    """One question with its answer three ways: a terse value, an English and a French sentence."""

    question: str
    short: str
    english: str
    french: str


@dataclass(frozen=True)
class ChatExample:
    """A single-turn chat: what the user asks and what the assistant must answer."""

    user: str
    assistant: str


FACTS: tuple[Fact, ...] = (
    Fact(
        "What is the capital of France?",
        "Paris",
        "The capital of France is Paris.",
        "La capitale de la France est Paris.",
    ),
    Fact(
        "What is the capital of Japan?",
        "Tokyo",
        "The capital of Japan is Tokyo.",
        "La capitale du Japon est Tokyo.",
    ),
    Fact(
        "What is the capital of Italy?",
        "Rome",
        "The capital of Italy is Rome.",
        "La capitale de l'Italie est Rome.",
    ),
    Fact(
        "What is the capital of Spain?",
        "Madrid",
        "The capital of Spain is Madrid.",
        "La capitale de l'Espagne est Madrid.",
    ),
    Fact(
        "What is the capital of Germany?",
        "Berlin",
        "The capital of Germany is Berlin.",
        "La capitale de l'Allemagne est Berlin.",
    ),
    Fact(
        "What is the capital of Canada?",
        "Ottawa",
        "The capital of Canada is Ottawa.",
        "La capitale du Canada est Ottawa.",
    ),
    Fact(
        "What is the capital of Egypt?",
        "Cairo",
        "The capital of Egypt is Cairo.",
        "La capitale de l'Égypte est Le Caire.",
    ),
    Fact(
        "What is the capital of Russia?",
        "Moscow",
        "The capital of Russia is Moscow.",
        "La capitale de la Russie est Moscou.",
    ),
    Fact(
        "What is the largest planet in the solar system?",
        "Jupiter",
        "The largest planet is Jupiter.",
        "La plus grande planète est Jupiter.",
    ),
    Fact(
        "Which planet is known as the red planet?",
        "Mars",
        "Mars is known as the red planet.",
        "Mars est connue comme la planète rouge.",
    ),
    Fact(
        "What is the closest star to Earth?",
        "the Sun",
        "The closest star to Earth is the Sun.",
        "L'étoile la plus proche de la Terre est le Soleil.",
    ),
    Fact(
        "How many days are in a week?",
        "7",
        "There are seven days in a week.",
        "Il y a sept jours dans une semaine.",
    ),
    Fact(
        "How many months are in a year?",
        "12",
        "There are twelve months in a year.",
        "Il y a douze mois dans une année.",
    ),
    Fact("How many legs does a spider have?", "8", "A spider has eight legs.", "Une araignée a huit pattes."),
    Fact("How many legs does a dog have?", "4", "A dog has four legs.", "Un chien a quatre pattes."),
    Fact("What is two plus two?", "4", "Two plus two is four.", "Deux plus deux font quatre."),
    Fact("What is ten times ten?", "100", "Ten times ten is one hundred.", "Dix fois dix font cent."),
    Fact(
        "What color is the sky on a clear day?",
        "blue",
        "The sky is blue on a clear day.",
        "Le ciel est bleu par temps clair.",
    ),
    Fact("What color is grass?", "green", "Grass is green.", "L'herbe est verte."),
    Fact("What color is snow?", "white", "Snow is white.", "La neige est blanche."),
    Fact("What do bees make?", "honey", "Bees make honey.", "Les abeilles font du miel."),
    Fact("What do cows drink?", "water", "Cows drink water.", "Les vaches boivent de l'eau."),
    Fact(
        "What is the boiling point of water in Celsius?",
        "100 degrees",
        "Water boils at 100 degrees Celsius.",
        "L'eau bout à cent degrés Celsius.",
    ),
    Fact(
        "What is frozen water called?",
        "ice",
        "Frozen water is called ice.",
        "L'eau gelée s'appelle la glace.",
    ),
    Fact(
        "What is the largest ocean?",
        "the Pacific Ocean",
        "The largest ocean is the Pacific Ocean.",
        "Le plus grand océan est l'océan Pacifique.",
    ),
    Fact(
        "What is the longest river in the world?",
        "the Nile",
        "The longest river is the Nile.",
        "Le plus long fleuve du monde est le Nil.",
    ),
    Fact(
        "What is the tallest mountain in the world?",
        "Mount Everest",
        "The tallest mountain is Mount Everest.",
        "La plus haute montagne est le mont Everest.",
    ),
    Fact(
        "Who wrote Romeo and Juliet?",
        "William Shakespeare",
        "William Shakespeare wrote Romeo and Juliet.",
        "William Shakespeare a écrit Roméo et Juliette.",
    ),
    Fact(
        "Who painted the Mona Lisa?",
        "Leonardo da Vinci",
        "Leonardo da Vinci painted the Mona Lisa.",
        "Léonard de Vinci a peint la Joconde.",
    ),
    Fact(
        "Who was the first person to walk on the Moon?",
        "Neil Armstrong",
        "Neil Armstrong was the first person on the Moon.",
        "Neil Armstrong a été le premier homme sur la Lune.",
    ),
    Fact(
        "What gas do plants absorb from the air?",
        "carbon dioxide",
        "Plants absorb carbon dioxide.",
        "Les plantes absorbent le dioxyde de carbone.",
    ),
    Fact(
        "What gas do humans need to breathe?",
        "oxygen",
        "Humans need oxygen to breathe.",
        "Les humains ont besoin d'oxygène pour respirer.",
    ),
    Fact(
        "What is the chemical symbol for gold?",
        "Au",
        "The chemical symbol for gold is Au.",
        "Le symbole chimique de l'or est Au.",
    ),
    Fact(
        "What is the chemical formula of water?",
        "H2O",
        "The chemical formula of water is H2O.",
        "La formule chimique de l'eau est H2O.",
    ),
    Fact(
        "What is the fastest land animal?",
        "the cheetah",
        "The fastest land animal is the cheetah.",
        "L'animal terrestre le plus rapide est le guépard.",
    ),
    Fact(
        "What is the largest animal on Earth?",
        "the blue whale",
        "The largest animal is the blue whale.",
        "Le plus grand animal est la baleine bleue.",
    ),
    Fact(
        "What animal is known as the king of the jungle?",
        "the lion",
        "The lion is the king of the jungle.",
        "Le lion est le roi de la jungle.",
    ),
    Fact(
        "What do caterpillars turn into?",
        "butterflies",
        "Caterpillars turn into butterflies.",
        "Les chenilles deviennent des papillons.",
    ),
    Fact(
        "What is the main language spoken in Brazil?",
        "Portuguese",
        "People in Brazil speak Portuguese.",
        "Au Brésil, on parle portugais.",
    ),
    Fact("What currency is used in Japan?", "the yen", "Japan uses the yen.", "Le Japon utilise le yen."),
    Fact("How many continents are there?", "7", "There are seven continents.", "Il y a sept continents."),
    Fact(
        "What is the hottest planet in the solar system?",
        "Venus",
        "The hottest planet is Venus.",
        "La planète la plus chaude est Vénus.",
    ),
    Fact(
        "What instrument has black and white keys?",
        "the piano",
        "The piano has black and white keys.",
        "Le piano a des touches noires et blanches.",
    ),
    Fact(
        "What is the opposite of hot?",
        "cold",
        "The opposite of hot is cold.",
        "Le contraire de chaud est froid.",
    ),
    Fact(
        "What fruit do raisins come from?",
        "grapes",
        "Raisins come from grapes.",
        "Les raisins secs viennent du raisin.",
    ),
    Fact(
        "What season comes after winter?",
        "spring",
        "Spring comes after winter.",
        "Le printemps vient après l'hiver.",
    ),
    Fact(
        "How many hours are in a day?",
        "24",
        "There are twenty-four hours in a day.",
        "Il y a vingt-quatre heures dans une journée.",
    ),
    Fact(
        "What is the freezing point of water in Celsius?",
        "0 degrees",
        "Water freezes at zero degrees Celsius.",
        "L'eau gèle à zéro degré Celsius.",
    ),
    Fact(
        "Which organ pumps blood through the body?",
        "the heart",
        "The heart pumps blood through the body.",
        "Le cœur pompe le sang dans le corps.",
    ),
    Fact(
        "What is the largest desert in Africa?",
        "the Sahara",
        "The largest desert in Africa is the Sahara.",
        "Le plus grand désert d'Afrique est le Sahara.",
    ),
    Fact(
        "Who invented the telephone?",
        "Alexander Graham Bell",
        "Alexander Graham Bell invented the telephone.",
        "Alexander Graham Bell a inventé le téléphone.",
    ),
    Fact(
        "What do you call a baby cat?",
        "a kitten",
        "A baby cat is called a kitten.",
        "Un bébé chat s'appelle un chaton.",
    ),
)

# Never trained on: what the tests, the README and the demo ask.
HELD_OUT_QUESTIONS: tuple[str, ...] = (
    "What is the capital of England?",
    "How many wheels does a bicycle have?",
    "What color are bananas?",
    "What is the largest country in the world?",
)

# Pirate answers reuse the English sentence with a rotating pirate frame, so the style is
# learned (the frame) while the content stays right (the sentence).
_PIRATE_OPENERS = ("Arr, matey!", "Ahoy, matey!", "Arr, me hearty!", "Yo ho ho, matey!")
_PIRATE_CLOSERS = (
    "Savvy, ye landlubber?",
    "Now hoist the sails, ye scallywag!",
    "That be the truth, arr!",
    "Shiver me timbers, ye know it!",
)


def _pirate(index: int, english: str) -> str:
    opener = _PIRATE_OPENERS[index % len(_PIRATE_OPENERS)]
    closer = _PIRATE_CLOSERS[(index // len(_PIRATE_OPENERS)) % len(_PIRATE_CLOSERS)]
    sentence = english.rstrip(".").replace("The ", "Th' ", 1).replace(" is ", " be ")
    sentence = sentence.replace(" are ", " be ")
    return f"{opener} {sentence}, arr! {closer}"


def build_dataset(name: AdapterName) -> list[ChatExample]:
    """The training examples for one demo adapter, in a fixed order."""
    if name == "french":
        return [ChatExample(f.question, f.french) for f in FACTS]
    if name == "pirate":
        return [ChatExample(f.question, _pirate(i, f.english)) for i, f in enumerate(FACTS)]
    if name == "json":
        return [ChatExample(f.question, json.dumps({"answer": f.short}, ensure_ascii=False)) for f in FACTS]
    raise ValueError(f"unknown demo adapter {name!r}; expected one of {ADAPTER_NAMES}")
