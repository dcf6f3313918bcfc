"""Attribute vocabulary and the joint sampler for synthetic faces.

The names follow CelebA so that code written for the real attribute benchmarks (linear probes,
zero-shot attribute prompts) runs unchanged on the synthetic data. Only attributes that the
renderer can make unambiguous at 64 px are included, and the sampler enforces the logical
dependencies a real annotator would respect, so that a model cannot be rewarded for learning
impossible combinations.
"""

from __future__ import annotations

import numpy as np

ATTRIBUTE_NAMES: tuple[str, ...] = (
    "Male",
    "Young",
    "Smiling",
    "Mouth_Slightly_Open",
    "Eyeglasses",
    "Wearing_Hat",
    "Black_Hair",
    "Blond_Hair",
    "Brown_Hair",
    "Gray_Hair",
    "Bald",
    "Bangs",
    "Mustache",
    "Goatee",
    "No_Beard",
    "Pale_Skin",
    "Rosy_Cheeks",
    "Wearing_Lipstick",
    "Wearing_Earrings",
)

HAIR_COLOURS: tuple[str, ...] = ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")

# Hair colour distribution by age group. Gray hair only occurs on older faces, which ties the
# Gray_Hair and Young attributes together the way they are in CelebA.
_HAIR_P_YOUNG = (0.35, 0.30, 0.35, 0.0)
_HAIR_P_OLD = (0.15, 0.10, 0.15, 0.60)


def sample_attributes(rng: np.random.Generator) -> dict[str, bool]:
    """Draws one consistent attribute assignment.

    Rules that always hold (the tests check them):
      * exactly one of the four hair colours or Bald;
      * Bald implies Male, no Bangs and no hat (a hat would hide the baldness);
      * Gray_Hair implies not Young;
      * Mustache and Goatee only on men, and No_Beard == not (Mustache or Goatee);
      * Wearing_Lipstick and Wearing_Earrings only on women.
    Marginal rates are chosen so every attribute is positive for 10-90% of faces, which keeps
    per-attribute probes and balanced-accuracy metrics meaningful.
    """
    male = bool(rng.random() < 0.5)
    young = bool(rng.random() < 0.7)
    hat = bool(rng.random() < 0.2)
    bald = male and not hat and bool(rng.random() < (0.25 if young else 0.55))
    attrs = dict.fromkeys(ATTRIBUTE_NAMES, False)
    attrs.update(Male=male, Young=young, Wearing_Hat=hat, Bald=bald)
    if not bald:
        hair = rng.choice(len(HAIR_COLOURS), p=_HAIR_P_YOUNG if young else _HAIR_P_OLD)
        attrs[HAIR_COLOURS[hair]] = True
        attrs["Bangs"] = bool(rng.random() < 0.3)
    attrs["Smiling"] = bool(rng.random() < 0.5)
    attrs["Mouth_Slightly_Open"] = bool(rng.random() < 0.4)
    attrs["Eyeglasses"] = bool(rng.random() < (0.25 if young else 0.5))
    attrs["Pale_Skin"] = bool(rng.random() < 0.2)
    attrs["Rosy_Cheeks"] = bool(rng.random() < (0.1 if male else 0.35))
    if male:
        attrs["Mustache"] = bool(rng.random() < 0.35)
        attrs["Goatee"] = bool(rng.random() < 0.3)
    else:
        attrs["Wearing_Lipstick"] = bool(rng.random() < 0.45)
        attrs["Wearing_Earrings"] = bool(rng.random() < 0.45)
    attrs["No_Beard"] = not (attrs["Mustache"] or attrs["Goatee"])
    return attrs
