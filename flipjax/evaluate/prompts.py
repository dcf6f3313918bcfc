"""Zero-shot prompts for the 40 CelebA attributes (the synthetic faces use a subset of the same
names), and where a dataset's attribute names come from.

Each attribute has positive and negative descriptions of a person; every description is put
into every template, the prompt embeddings are L2-normalised and averaged per side (prompt
ensembling, as in CLIP). Negatives describe the absence concretely where a natural opposite
exists ("a woman" for Male), since "not X" is weak in contrastive text encoders. Both sides
name the same subject ("a person"), Male's aside: "a man with a goatee" against "a person
without a goatee" would add a man-versus-person term to every score, leaning every man
towards the attribute.
"""

from __future__ import annotations

import ml_collections

from flipjax.data.pipeline import data_source
from tfds_builders.builder_utils import CELEBA_ATTRIBUTE_NAMES

TEMPLATES: tuple[str, ...] = ("a photo of {}.", "a close-up photo of {}.", "a face of {}.",
                              "{}.")

# name -> (positive descriptions, negative descriptions)
PROMPTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "5_o_Clock_Shadow": (("a person with stubble", "a person with a five o'clock shadow"),
                         ("a clean-shaven person", "a person without stubble")),
    "Arched_Eyebrows": (("a person with arched eyebrows",),
                        ("a person with straight eyebrows", "a person with flat eyebrows")),
    "Attractive": (("an attractive person", "a beautiful person"),
                   ("an unattractive person", "a plain-looking person")),
    "Bags_Under_Eyes": (("a person with bags under the eyes", "a person with puffy eyes"),
                        ("a person without bags under the eyes", "a person with smooth skin "
                                                                 "under the eyes")),
    "Bald": (("a bald person", "a person with a bald head"),
             ("a person with hair", "a person with a full head of hair")),
    "Bangs": (("a person with bangs", "a person with a fringe"),
              ("a person without bangs", "a person with an uncovered forehead")),
    "Big_Lips": (("a person with big lips", "a person with full lips"),
                 ("a person with thin lips", "a person with small lips")),
    "Big_Nose": (("a person with a big nose", "a person with a large nose"),
                 ("a person with a small nose",)),
    "Black_Hair": (("a person with black hair",),
                   ("a person with blond hair", "a person with brown hair",
                    "a person with gray hair")),
    "Blond_Hair": (("a person with blond hair",),
                   ("a person with black hair", "a person with brown hair",
                    "a person with gray hair")),
    "Blurry": (("a blurry photo of a person", "an out-of-focus person"),
               ("a sharp photo of a person", "an in-focus person")),
    "Brown_Hair": (("a person with brown hair",),
                   ("a person with black hair", "a person with blond hair",
                    "a person with gray hair")),
    "Bushy_Eyebrows": (("a person with bushy eyebrows", "a person with thick eyebrows"),
                       ("a person with thin eyebrows",)),
    "Chubby": (("a chubby person", "a person with a round, full face"),
               ("a slim person", "a person with a thin face")),
    "Double_Chin": (("a person with a double chin",),
                    ("a person with a defined jawline", "a person without a double chin")),
    "Eyeglasses": (("a person wearing eyeglasses", "a person wearing glasses"),
                   ("a person without eyeglasses", "a person not wearing glasses")),
    "Goatee": (("a person with a goatee",),
               ("a person without a goatee", "a clean-shaven person")),
    "Gray_Hair": (("a person with gray hair", "a person with grey hair"),
                  ("a person with black hair", "a person with blond hair",
                   "a person with brown hair")),
    "Heavy_Makeup": (("a person wearing heavy makeup",),
                     ("a person without makeup", "a person with a natural face")),
    "High_Cheekbones": (("a person with high cheekbones",),
                        ("a person with low cheekbones",)),
    "Male": (("a man", "a male person", "a guy"),
             ("a woman", "a female person", "a lady")),
    "Mouth_Slightly_Open": (("a person with the mouth slightly open", "a person with parted "
                                                                      "lips"),
                            ("a person with the mouth closed", "a person with closed lips")),
    "Mustache": (("a person with a mustache", "a person with a moustache"),
                 ("a person without a mustache", "a clean-shaven person")),
    "Narrow_Eyes": (("a person with narrow eyes",), ("a person with wide open eyes",)),
    "No_Beard": (("a clean-shaven person", "a person without a beard"),
                 ("a person with a beard", "a person with a mustache",
                  "a person with a goatee")),
    "Oval_Face": (("a person with an oval face",),
                  ("a person with a round face", "a person with a square face")),
    "Pale_Skin": (("a person with pale skin",), ("a person with tanned skin",
                                                 "a person with dark skin")),
    "Pointy_Nose": (("a person with a pointy nose",), ("a person with a round nose",)),
    "Receding_Hairline": (("a person with a receding hairline",),
                          ("a person with a full hairline",)),
    "Rosy_Cheeks": (("a person with rosy cheeks", "a person with blushing cheeks"),
                    ("a person without rosy cheeks", "a person with an even complexion")),
    "Sideburns": (("a person with sideburns",), ("a person without sideburns",)),
    "Smiling": (("a smiling person", "a person with a smile"),
                ("a person with a neutral expression", "a serious person, not smiling")),
    "Straight_Hair": (("a person with straight hair",),
                      ("a person with wavy hair", "a person with curly hair")),
    "Wavy_Hair": (("a person with wavy hair",),
                  ("a person with straight hair",)),
    "Wearing_Earrings": (("a person wearing earrings",), ("a person without earrings",)),
    "Wearing_Hat": (("a person wearing a hat",), ("a person without a hat",
                                                  "a person with an uncovered head")),
    "Wearing_Lipstick": (("a person wearing lipstick",), ("a person without lipstick",
                                                         "a person with natural lips")),
    "Wearing_Necklace": (("a person wearing a necklace",), ("a person without a necklace",)),
    "Wearing_Necktie": (("a person wearing a necktie", "a person wearing a tie"),
                        ("a person without a tie", "a person with an open collar")),
    "Young": (("a young person", "a young adult"),
              ("an old person", "an elderly person", "a middle-aged person")),
}


def prompts_for(name: str) -> tuple[list[str], list[str]]:
    """Every template filled with every positive / negative description of `name`."""
    if name not in PROMPTS:
        raise KeyError(f"no zero-shot prompts for attribute {name!r}; add them to "
                       "flipjax/evaluate/prompts.py")
    pos, neg = PROMPTS[name]
    return ([t.format(p) for p in pos for t in TEMPLATES],
            [t.format(n) for n in neg for t in TEMPLATES])


def attribute_names(data_cfg: ml_collections.ConfigDict, num: int,
                    split: str = "test") -> list[str]:
    """The names of a dataset's `attributes` entries: `data_cfg.attribute_names` if set, else
    the dataset metadata's "attribute_names", else CelebA's order for 40, else attr_i."""
    names, source = data_cfg.get("attribute_names"), "the evaluator's attribute_names"
    if not names:
        info = data_source(data_cfg, split).dataset_info
        names = (info.metadata or {}).get("attribute_names")
        source = f"the metadata of dataset {data_cfg.name!r}"
    if not names and num == len(CELEBA_ATTRIBUTE_NAMES):
        names = CELEBA_ATTRIBUTE_NAMES
    names = list(names or [f"attr_{i}" for i in range(num)])
    if len(names) != num:
        raise ValueError(f"{source} names {len(names)} attributes, but the {split!r} records "
                         f"of dataset {data_cfg.name!r} have {num}")
    return names

