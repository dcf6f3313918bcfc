"""A small caption grammar in the style of FaceCaption-15M.

Captions are generated from the attribute dict alone (never from rendering details), so the text
is a noisy but faithful description of what the image shows. Phrasing, order and synonyms vary
to stop a text encoder from keying on a fixed template.

The vocabulary is chosen so that some attributes can be checked exactly from the text (the tests
rely on this):
  * always mentioned, with a unique keyword: gender (man/guy/gentleman/he/his vs
    woman/lady/she/her), Smiling ("smil"), Eyeglasses ("glasses"), Wearing_Hat ("hat"),
    Bald ("bald"), the hair colours ("black", "blond", "brown", "gray"/"grey"/"silver"),
    Bangs ("bangs"/"fringe"), Mustache ("mustache"/"moustache"), Goatee ("goatee"),
    Wearing_Earrings ("earring"), Wearing_Lipstick ("lipstick");
  * mentioned most of the time, never when absent: age ("young"; "older"/"elderly"/
    "middle-aged" when not Young), Mouth_Slightly_Open ("open"/"parted"), Pale_Skin ("pale"),
    Rosy_Cheeks ("cheeks"), and the absence No_Beard ("clean-shaven") for men.
"""

from __future__ import annotations

import numpy as np

_HAIR_WORDS = {
    "Black_Hair": ("black", "jet-black", "dark black"),
    "Blond_Hair": ("blond", "golden blond", "light blond"),
    "Brown_Hair": ("brown", "dark brown", "chestnut brown"),
    "Gray_Hair": ("gray", "grey", "silver-gray"),
}


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _capitalise(s: str) -> str:
    return s[:1].upper() + s[1:]


def _subject(attrs: dict[str, bool], rng: np.random.Generator) -> str:
    """Noun phrase without determiner, e.g. "young woman" or "elderly gentleman"."""
    noun = _pick(rng, ("man", "man", "guy", "gentleman") if attrs["Male"]
                 else ("woman", "woman", "lady"))
    if rng.random() < 0.2:
        return noun
    age = "young" if attrs["Young"] else _pick(rng, ("older", "elderly", "middle-aged"))
    return f"{age} {noun}"


def _hair(attrs: dict[str, bool], rng: np.random.Generator) -> str:
    if attrs["Bald"]:
        return _pick(rng, ("a bald head", "a shiny bald head"))
    colour = _pick(rng, next(v for k, v in _HAIR_WORDS.items() if attrs[k]))
    length = "short " if attrs["Male"] and rng.random() < 0.4 else ""
    return f"{length}{colour} hair"


def _features(attrs: dict[str, bool], rng: np.random.Generator) -> list[str]:
    """Noun phrases that follow "has"/"with": hair (always first), bangs, facial hair, skin."""
    out = [_hair(attrs, rng)]
    if attrs["Bangs"]:
        out.append(_pick(rng, ("bangs", "a fringe", "straight bangs", "a full fringe")))
    if attrs["Mustache"]:
        out.append(_pick(rng, ("a mustache", "a moustache", "a thick mustache")))
    if attrs["Goatee"]:
        out.append(_pick(rng, ("a goatee", "a small goatee", "a neat goatee")))
    if attrs["Pale_Skin"] and rng.random() < 0.85:
        out.append(_pick(rng, ("pale skin", "a pale complexion", "very pale skin")))
    if attrs["Rosy_Cheeks"] and rng.random() < 0.85:
        out.append(_pick(rng, ("rosy cheeks", "rosy pink cheeks", "blushing cheeks")))
    order = rng.permutation(len(out) - 1) + 1
    return [out[0]] + [out[i] for i in order]


def _accessories(attrs: dict[str, bool], rng: np.random.Generator) -> list[str]:
    """Noun phrases that follow "wearing"."""
    out = []
    if attrs["Eyeglasses"]:
        out.append(_pick(rng, ("glasses", "eyeglasses", "a pair of glasses")))
    if attrs["Wearing_Hat"]:
        out.append(_pick(rng, ("a hat", "a colourful hat", "a hat on the head")))
    if attrs["Wearing_Earrings"]:
        out.append(_pick(rng, ("earrings", "a pair of earrings", "shiny earrings")))
    if attrs["Wearing_Lipstick"]:
        out.append(_pick(rng, ("lipstick", "bright lipstick", "bold lipstick")))
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def _expression(attrs: dict[str, bool], rng: np.random.Generator,
                poss: str) -> tuple[str, str] | None:
    """(finite verb phrase, participle phrase) for the mouth, or None to leave it out."""
    open_ = attrs["Mouth_Slightly_Open"] and rng.random() < 0.85
    if attrs["Smiling"] and open_:
        return _pick(rng, (
            (f"is smiling with {poss} mouth slightly open", "smiling with an open mouth"),
            ("has a wide, open-mouthed smile", "with a wide, open-mouthed smile"),
            ("smiles with parted lips", "smiling with parted lips"),
        ))
    if attrs["Smiling"]:
        return _pick(rng, (
            ("is smiling", "smiling"),
            ("has a gentle smile", "with a gentle smile"),
            ("smiles warmly", "smiling warmly"),
        ))
    if open_:
        return _pick(rng, (
            (f"has {poss} mouth slightly open", f"with {poss} mouth slightly open"),
            ("looks surprised, lips parted", "with parted lips"),
        ))
    if rng.random() < 0.5:
        return _pick(rng, (
            ("has a neutral expression", "with a neutral expression"),
            ("looks serious", "looking serious"),
            (f"keeps {poss} mouth closed", "with a calm, closed mouth"),
        ))
    return None


def make_caption(attrs: dict[str, bool], rng: np.random.Generator) -> str:
    """Builds a caption of one to four short sentences that describes the given attributes."""
    he, his = ("he", "his") if attrs["Male"] else ("she", "her")
    subject = _subject(attrs, rng)
    a = "an" if subject[0] in "aeiou" else "a"
    det = _pick(rng, (a, "the", "this"))
    features = _features(attrs, rng)
    wears = _accessories(attrs, rng)
    expr = _expression(attrs, rng, his)
    extras = []
    if attrs["Male"] and attrs["No_Beard"] and rng.random() < 0.3:
        extras.append(f"{_capitalise(he)} is clean-shaven.")

    template = int(rng.integers(4))
    if template == 0:
        s = f"{_capitalise(det)} {subject} with {_join(features)}"
        if wears:
            s += f", wearing {_join(wears)}"
        sentences = [s + "."]
        if expr:
            sentences.append(f"{_capitalise(he)} {expr[0]}.")
    elif template == 1:
        s = f"{_capitalise(det)} {subject} has {_join(features)}"
        if wears:
            s += f" and wears {_join(wears)}"
        sentences = [s + "."]
        if expr:
            sentences.append(f"{_capitalise(he)} {expr[0]}.")
    elif template == 2:
        lead = _pick(rng, ("In the picture,", "The photo shows", "This image shows"))
        if lead.endswith(","):
            s = f"{lead} {_pick(rng, (a, 'the'))} {subject} "
            s += expr[0] if expr else "looks at the camera"
        else:
            s = f"{lead} {a} {subject}" + (f" {expr[1]}" if expr else "")
        sentences = [s + ".", f"{_capitalise(he)} has {_join(features)}."]
        if wears:
            sentences.append(f"{_capitalise(he)} is wearing {_join(wears)}.")
    else:
        parts = [f"{_capitalise(det)} {subject} with {_join(features)}"]
        if expr:
            parts.append(expr[1])
        if wears:
            parts.append(f"wearing {_join(wears)}")
        sentences = [", ".join(parts) + "."]
    return " ".join(sentences + extras)
