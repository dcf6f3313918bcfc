"""Procedural face renderer used by the `synthetic_faces` dataset.

Faces are drawn with Pillow on a canvas `SUPERSAMPLE` times larger than the output and then
box-downsampled, which gives anti-aliased edges at a fraction of the cost of a real rasteriser.
All geometry is expressed in "face units" (`u`, roughly half the head width) around a jittered
face centre so that the same drawing code works at every output resolution.

Every attribute in `attributes.ATTRIBUTE_NAMES` changes the pixels in a way that survives the
downscale to 64 px (a hat covers the forehead, glasses draw dark frames, a goatee fills the
chin...), while the nuisance factors (background, pose, scale, skin tone, lighting, sensor noise)
vary independently so that a model has to look at the right place to recover them.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from tfds_builders.synthetic_faces.attributes import HAIR_COLOURS

SUPERSAMPLE = 4

Colour = tuple[int, int, int]
Points = list[tuple[float, float]]

# Pale skin is kept clearly lighter and pinker than the lightest non-pale tone so that the
# Pale_Skin label stays unambiguous under the lighting jitter applied afterwards.
_PALE_SKIN: Colour = (250, 229, 216)
_SKIN_TONES: tuple[Colour, ...] = ((224, 180, 146), (196, 146, 108), (158, 108, 74), (105, 70, 48))
_HAIR: dict[str, Colour] = {
    "Black_Hair": (28, 24, 22),
    "Brown_Hair": (108, 66, 36),
    "Blond_Hair": (226, 192, 118),
    "Gray_Hair": (178, 178, 176),
}
_IRIS: tuple[Colour, ...] = ((92, 56, 30), (60, 110, 170), (70, 120, 70), (40, 30, 25))
_LIPSTICK: tuple[Colour, ...] = ((196, 18, 40), (214, 40, 96), (138, 18, 62), (226, 66, 58))
_FRAMES: tuple[Colour, ...] = (
    (15, 15, 18), (70, 40, 25), (110, 110, 118), (25, 35, 90), (120, 20, 30)
)
_METALS: tuple[Colour, ...] = ((236, 196, 60), (226, 226, 236), (250, 246, 232), (220, 30, 60))
_BEARD_WHEN_BALD: tuple[Colour, ...] = ((30, 26, 24), (96, 62, 36), (170, 170, 168))


def _mix(a: Colour, b: Colour, t: float) -> Colour:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b, strict=True))


def _shade(c: Colour, f: float) -> Colour:
    return tuple(int(min(255, max(0, round(x * f)))) for x in c)


def _jitter(rng: np.random.Generator, c: Colour, amount: int) -> Colour:
    noise = rng.integers(-amount, amount + 1, size=3)
    return tuple(min(255, max(0, x + int(d))) for x, d in zip(c, noise, strict=True))


def _random_colour(rng: np.random.Generator) -> Colour:
    return tuple(int(x) for x in rng.integers(0, 256, size=3))


@dataclasses.dataclass(frozen=True)
class _Palette:
    skin: Colour
    hair: Colour
    brow: Colour
    beard: Colour
    lips: Colour
    iris: Colour
    shirt: Colour
    hat: Colour
    frame: Colour
    metal: Colour


def _palette(attrs: dict[str, bool], rng: np.random.Generator) -> _Palette:
    if attrs["Pale_Skin"]:
        skin = _jitter(rng, _PALE_SKIN, 4)
    else:
        t = rng.uniform(0, len(_SKIN_TONES) - 1)
        i = min(int(t), len(_SKIN_TONES) - 2)
        skin = _jitter(rng, _mix(_SKIN_TONES[i], _SKIN_TONES[i + 1], t - i), 6)
    if attrs["Bald"]:
        hair = _BEARD_WHEN_BALD[int(rng.integers(2 if attrs["Young"] else 3))]
    else:
        hair = _jitter(rng, _HAIR[next(h for h in HAIR_COLOURS if attrs[h])], 12)
    if attrs["Wearing_Lipstick"]:
        lips = _jitter(rng, _LIPSTICK[int(rng.integers(len(_LIPSTICK)))], 10)
    else:
        lips = _mix(skin, (135, 45, 50), rng.uniform(0.45, 0.6))
    return _Palette(
        skin=skin,
        hair=hair,
        brow=_shade(hair, 0.75),
        beard=_shade(hair, 0.85),
        lips=lips,
        iris=_IRIS[int(rng.integers(len(_IRIS)))],
        shirt=_random_colour(rng),
        hat=_random_colour(rng),
        frame=_FRAMES[int(rng.integers(len(_FRAMES)))],
        metal=_METALS[int(rng.integers(len(_METALS)))],
    )


class _Painter:
    """Draws face parts in face units: x right, y down, (0, 0) between the eyes."""

    def __init__(self, draw: ImageDraw.ImageDraw, cx: float, cy: float, u: float) -> None:
        self.d = draw
        self.cx, self.cy, self.u = cx, cy, u

    def p(self, x: float, y: float) -> tuple[float, float]:
        return (self.cx + x * self.u, self.cy + y * self.u)

    def pts(self, xy: Points) -> Points:
        return [self.p(x, y) for x, y in xy]

    def box(self, x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [*self.p(x0, y0), *self.p(x1, y1)]

    def w(self, k: float) -> int:
        return max(1, round(k * self.u))

    def ellipse(self, x0: float, y0: float, x1: float, y1: float, fill: Colour | None = None,
                outline: Colour | None = None, width: float = 0.0) -> None:
        self.d.ellipse(self.box(x0, y0, x1, y1), fill=fill, outline=outline, width=self.w(width))

    def polygon(self, xy: Points, fill: Colour) -> None:
        self.d.polygon(self.pts(xy), fill=fill)

    def line(self, xy: Points, fill: Colour, width: float) -> None:
        self.d.line(self.pts(xy), fill=fill, width=self.w(width), joint="curve")


def _linspace(start: float, stop: float, n: int) -> list[float]:
    """Plain-Python `np.linspace`: the renderer calls it with tiny n, where numpy is slower."""
    step = (stop - start) / (n - 1)
    return [start + i * step for i in range(n)]


def _arc(x0: float, x1: float, y: Callable[[float], float], n: int = 12) -> Points:
    """Samples the curve (x, y(x)) for x from x0 to x1."""
    return [(x, y(x)) for x in _linspace(x0, x1, n)]


def _ellipse_arc(a: float, b: float, t0: float, t1: float, n: int = 24,
                 y_max: float = math.inf) -> Points:
    """Points on the axis-aligned ellipse (a, b) between angles t0 and t1, clipped at y_max."""
    return [(a * math.cos(t), min(b * math.sin(t), y_max)) for t in _linspace(t0, t1, n)]


@dataclasses.dataclass(frozen=True)
class _Geometry:
    a: float  # head half-width
    b: float  # head half-height below/above the eye line
    ex: float  # eye x offset
    ey: float  # eye y
    my: float  # mouth y
    mw: float  # mouth half-width
    hair_len: float  # how far long hair falls (women only)


def _head_outline(g: _Geometry, male: bool) -> Points:
    pts = []
    for t in _linspace(0, 2 * math.pi * 63 / 64, 64):
        c, s = math.cos(t), math.sin(t)
        if s <= 0:
            pts.append((g.a * c, g.b * s))
        elif male:  # squarer jaw
            pts.append((g.a * math.copysign(abs(c) ** 0.7, c) * (1 - 0.18 * s * s), g.b * s))
        else:  # tapered chin
            pts.append((g.a * c * (1 - 0.3 * s * s), g.b * s))
    return pts


def _draw_back(pt: _Painter, g: _Geometry, attrs: dict[str, bool], pal: _Palette) -> None:
    """Torso, long hair falling behind the shoulders, neck and ears."""
    pt.ellipse(-2.1, g.b + 0.3, 2.1, g.b + 2.6, fill=pal.shirt)
    if not attrs["Male"] and not attrs["Bald"]:
        r = g.a + 0.38
        top = _ellipse_arc(g.a + 0.22, g.b + 0.22, math.pi, 2 * math.pi)
        pt.polygon(top + [(r, g.hair_len - 0.12), (r - 0.2, g.hair_len),
                          (-r + 0.2, g.hair_len), (-r, g.hair_len - 0.12)], fill=pal.hair)
    pt.polygon([(-0.38, 0.6), (0.38, 0.6), (0.42, g.b + 0.55), (-0.42, g.b + 0.55)],
               fill=_shade(pal.skin, 0.86))
    ear = _shade(pal.skin, 0.93)
    for side in (-1, 1):
        x = side * g.a
        pt.ellipse(x - 0.13, -0.22, x + 0.13, 0.32, fill=ear)
        pt.line([(x + side * 0.02, -0.12), (x + side * 0.06, 0.0), (x + side * 0.02, 0.18)],
                fill=_shade(pal.skin, 0.75), width=0.03)


def _draw_skin_details(pt: _Painter, g: _Geometry, attrs: dict[str, bool], pal: _Palette) -> None:
    """Rosy cheeks, wrinkles of older faces, the bald scalp highlight."""
    if attrs["Rosy_Cheeks"]:
        blush = _mix(pal.skin, (225, 55, 85), 0.6)
        for side in (-1, 1):
            x = side * (g.ex + 0.06)
            pt.ellipse(x - 0.22, 0.17, x + 0.22, 0.49, fill=blush)
    if not attrs["Young"]:
        crease = _shade(pal.skin, 0.62)
        for y in (-0.58, -0.7, -0.82):
            pt.line(_arc(-0.38, 0.38, lambda x, y=y: y + 0.25 * x * x, 8), crease, 0.045)
        for side in (-1, 1):
            pt.line([(side * 0.2, 0.36), (side * (g.mw + 0.04), g.my - 0.05),
                     (side * (g.mw + 0.08), g.my + 0.12)], crease, 0.05)
            bag = _arc(side * (g.ex - 0.13), side * (g.ex + 0.13),
                       lambda x, s=side: g.ey + 0.15 + 0.8 * (x - s * g.ex) ** 2, 6)
            pt.line(bag, crease, 0.04)
            x = side * (g.ex + 0.22)
            for dy in (-0.08, 0.0, 0.08):
                pt.line([(x, g.ey + dy * 0.3), (x + side * 0.12, g.ey + dy)], crease, 0.04)
    if attrs["Bald"]:
        pt.ellipse(-0.5, -g.b + 0.1, 0.1, -g.b + 0.32, fill=_mix(pal.skin, (255, 255, 255), 0.35))


def _draw_eyes(pt: _Painter, g: _Geometry, attrs: dict[str, bool], pal: _Palette) -> None:
    half_h = 0.065 if attrs["Smiling"] else 0.085
    brow_w = 0.09 if attrs["Male"] else 0.055
    lid = (30, 22, 20)
    for side in (-1, 1):
        x = side * g.ex
        pt.ellipse(x - 0.17, g.ey - half_h, x + 0.17, g.ey + half_h, fill=(245, 245, 240))
        pt.ellipse(x - 0.075, g.ey - 0.075, x + 0.075, g.ey + 0.075, fill=pal.iris)
        pt.ellipse(x - 0.035, g.ey - 0.035, x + 0.035, g.ey + 0.035, fill=(10, 10, 10))
        pt.line(_arc(x - 0.18, x + 0.18, lambda t, x=x: g.ey - half_h * (1 - ((t - x) / 0.18) ** 2),
                     8), lid, 0.035 if attrs["Male"] else 0.055)
        pt.line(_arc(x - 0.2 * side, x + 0.22 * side,
                     lambda t, x=x: -0.32 - 0.06 * (1 - ((t - x) / 0.21) ** 2), 8),
                pal.brow, brow_w)


def _draw_nose(pt: _Painter, pal: _Palette) -> None:
    pt.line([(0.03, 0.0), (0.08, 0.3), (-0.04, 0.36)], _shade(pal.skin, 0.78), 0.04)
    for side in (-1, 1):
        pt.ellipse(side * 0.08 - 0.03, 0.33, side * 0.08 + 0.03, 0.37, fill=_shade(pal.skin, 0.55))


def _draw_mouth(pt: _Painter, g: _Geometry, attrs: dict[str, bool], pal: _Palette) -> float:
    """Draws the mouth and returns the y of its lowest point (the goatee starts below it)."""
    my, mw = g.my, g.mw
    lip_w = 0.12 if attrs["Wearing_Lipstick"] else 0.06
    inside, teeth = (72, 18, 30), (240, 238, 226)
    if attrs["Smiling"] and attrs["Mouth_Slightly_Open"]:
        top = _arc(-mw, mw, lambda x: my - 0.1 + 0.08 * (1 - (x / mw) ** 2))
        bottom = _arc(mw, -mw, lambda x: my - 0.1 + 0.4 * (1 - (x / mw) ** 2))
        pt.polygon(top + bottom, fill=inside)
        pt.polygon(top + _arc(mw * 0.8, -mw * 0.8, lambda x: my + 0.06 * (1 - (x / mw) ** 2)),
                   fill=teeth)
        pt.line(top + bottom + top[:1], pal.lips, lip_w)
        return my + 0.34
    if attrs["Mouth_Slightly_Open"]:
        pt.ellipse(-0.17, my - 0.09, 0.17, my + 0.15, fill=inside, outline=pal.lips, width=lip_w)
        return my + 0.18
    if attrs["Smiling"]:  # closed smile: an upturned crescent of lip plus smile creases
        upper = _arc(-mw, mw, lambda x: my + 0.04 - 0.18 * (x / mw) ** 2)
        lower = _arc(mw, -mw, lambda x: my + 0.14 + lip_w - (0.28 + lip_w) * (x / mw) ** 2)
        pt.polygon(upper + lower, fill=pal.lips)
        pt.line(upper, _shade(pal.lips, 0.6), 0.035)
        for side in (-1, 1):
            pt.line([(side * (mw + 0.02), my - 0.22), (side * (mw + 0.07), my - 0.06)],
                    _shade(pal.skin, 0.75), 0.035)
        return my + 0.16 + lip_w
    curve = _arc(-mw * 0.85, mw * 0.85, lambda x: my + 0.02 * (x / mw) ** 2)
    if attrs["Wearing_Lipstick"]:
        pt.polygon(curve + _arc(mw * 0.85, -mw * 0.85, lambda x: my - 0.07 + 0.05 * abs(x) / mw),
                   fill=pal.lips)
        pt.polygon(curve + _arc(mw * 0.75, -mw * 0.75, lambda x: my + 0.1 * (1 - (x / mw) ** 2)),
                   fill=pal.lips)
    pt.line(curve, _shade(pal.lips, 0.7), 0.04)
    return my + 0.1


def _draw_facial_hair(pt: _Painter, g: _Geometry, attrs: dict[str, bool], pal: _Palette,
                      mouth_bottom: float) -> None:
    my, mw = g.my, g.mw
    if attrs["Mustache"]:
        top = _arc(-mw - 0.04, mw + 0.04, lambda x: my - 0.22 + 0.06 * (x / mw) ** 2)
        bottom = _arc(mw + 0.08, -mw - 0.08, lambda x: my - 0.07 + 0.08 * (x / mw) ** 2)
        pt.polygon(top + bottom, fill=pal.beard)
    if attrs["Goatee"]:
        y0 = mouth_bottom + 0.03
        pt.polygon([(-0.26, y0), (0.26, y0), (0.3, g.b - 0.12), (0.12, g.b + 0.02),
                    (-0.12, g.b + 0.02), (-0.3, g.b - 0.12)], fill=pal.beard)
        if attrs["Mustache"]:
            for side in (-1, 1):
                pt.line([(side * (mw + 0.06), my - 0.05), (side * 0.28, y0 + 0.05)],
                        pal.beard, 0.09)


def _draw_front_hair(pt: _Painter, g: _Geometry, attrs: dict[str, bool], pal: _Palette,
                     rng: np.random.Generator) -> None:
    """Hair over the top of the head, with a hairline or bangs over the forehead."""
    male = attrs["Male"]
    side_y = -0.12 if male else 0.15
    outer = _ellipse_arc(g.a + 0.1, g.b + (0.12 if male else 0.2), math.pi, 2 * math.pi,
                         y_max=side_y)
    if attrs["Bangs"]:
        tilt = rng.uniform(-0.2, 0.2)
        xs = _linspace(g.a * 0.9, -g.a * 0.9, 11)
        fringe = [(x, -0.44 + tilt * x + (0.05 if i % 2 else -0.02)) for i, x in enumerate(xs)]
        strand_end = -0.45
    else:
        part = rng.uniform(-0.4, 0.4)
        fringe = _arc(g.a * 0.85, -g.a * 0.85,
                      lambda x: -0.8 - 0.2 * (1 - ((x - part) / (2 * g.a)) ** 2) ** 2, 10)
        strand_end = -1.05
    inner = [(g.a - 0.04, side_y), (g.a * 0.9, -0.5), *fringe, (-g.a * 0.9, -0.5),
             (-g.a + 0.04, side_y)]
    pt.polygon(outer + inner, fill=pal.hair)
    streak = _shade(pal.hair, 0.8)
    offset = rng.uniform(-0.1, 0.1)
    for x in _linspace(-0.5 + offset, 0.5 + offset, 4):
        pt.line([(x * 0.6, -g.b - 0.05), (x, strand_end)], streak, 0.025)


def _draw_hat(pt: _Painter, g: _Geometry, pal: _Palette, rng: np.random.Generator) -> None:
    y = -0.55 - rng.uniform(0.0, 0.12)
    top = -g.b - 0.3
    band = _shade(pal.hat, 0.7)
    kind = int(rng.integers(3))
    if kind == 0:  # beanie with a folded band
        pt.d.chord(pt.box(-g.a - 0.14, top, g.a + 0.14, 2 * y - top), 180, 360, fill=pal.hat)
        pt.d.rounded_rectangle(pt.box(-g.a - 0.17, y - 0.24, g.a + 0.17, y + 0.04),
                               radius=pt.w(0.1), fill=band)
    elif kind == 1:  # cap with a visor
        pt.d.chord(pt.box(-g.a - 0.12, top + 0.1, g.a + 0.12, 2 * y - top - 0.1), 180, 360,
                   fill=pal.hat)
        pt.d.chord(pt.box(-g.a - 0.2, y - 0.14, g.a + 0.2, y + 0.24), 0, 180, fill=band)
    else:  # brimmed hat
        pt.d.rounded_rectangle(pt.box(-g.a * 0.82, top - 0.3, g.a * 0.82, y),
                               radius=pt.w(0.2), fill=pal.hat)
        pt.d.rectangle(pt.box(-g.a * 0.82, y - 0.3, g.a * 0.82, y - 0.14), fill=band)
        pt.ellipse(-g.a - 0.6, y - 0.17, g.a + 0.6, y + 0.1, fill=pal.hat)


def _draw_glasses(pt: _Painter, g: _Geometry, pal: _Palette, rng: np.random.Generator) -> None:
    width = rng.uniform(0.06, 0.09)
    tint = (28, 30, 40) if rng.random() < 0.15 else None
    round_frames = rng.random() < 0.5
    for side in (-1, 1):
        x = side * g.ex
        box = pt.box(x - 0.24, g.ey - 0.17, x + 0.24, g.ey + 0.17)
        if round_frames:
            pt.d.ellipse(box, fill=tint, outline=pal.frame, width=pt.w(width))
        else:
            pt.d.rounded_rectangle(box, radius=pt.w(0.07), fill=tint, outline=pal.frame,
                                   width=pt.w(width))
        pt.line([(x + side * 0.23, g.ey - 0.04), (side * g.a, g.ey - 0.08)], pal.frame, width)
    pt.line(_arc(-g.ex + 0.23, g.ex - 0.23, lambda t: g.ey - 0.04 - 0.04 * (1 - t * t * 16), 5),
            pal.frame, width)


def _draw_earrings(pt: _Painter, g: _Geometry, pal: _Palette, rng: np.random.Generator) -> None:
    kind = int(rng.integers(3))
    for side in (-1, 1):
        x, y = side * (g.a + 0.01), 0.3
        if kind == 0:  # stud
            pt.ellipse(x - 0.11, y - 0.11, x + 0.11, y + 0.11, fill=pal.metal)
        elif kind == 1:  # hoop
            pt.ellipse(x - 0.17, y - 0.02, x + 0.17, y + 0.32, outline=pal.metal, width=0.08)
        else:  # drop
            pt.line([(x, y), (x, y + 0.18)], pal.metal, 0.05)
            pt.ellipse(x - 0.12, y + 0.12, x + 0.12, y + 0.36, fill=pal.metal)


@functools.lru_cache(maxsize=8)
def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) pixel-centre coordinates in [0, 1], shape (size, size, 1); cached per size."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size
    return t[:, None, None], t[None, :, None]


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A four-corner colour gradient with a few translucent shapes on top.

    Drawn at output resolution: the clutter only needs to be distracting, not anti-aliased.
    """
    yy, xx = _unit_grid(size)
    c = rng.integers(0, 256, size=(2, 2, 3)).astype(np.float32)
    top = c[0, 0] * (1 - xx) + c[0, 1] * xx
    bottom = c[1, 0] * (1 - xx) + c[1, 1] * xx
    bg = Image.fromarray((top * (1 - yy) + bottom * yy).astype(np.uint8))
    draw = ImageDraw.Draw(bg, "RGBA")
    for _ in range(int(rng.integers(0, 6))):
        x0, y0 = rng.uniform(-0.2, 1.0, size=2) * size
        w, h = rng.uniform(0.1, 0.5, size=2) * size
        fill = (*_random_colour(rng), int(rng.integers(50, 160)))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=fill)
        else:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=fill)
    return bg


def _photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Global brightness, colour cast, a directional light gradient and sensor noise."""
    yy, xx = _unit_grid(img.shape[0])
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle)
    gain = rng.uniform(0.88, 1.1) * rng.uniform(0.95, 1.05, size=3).astype(np.float32)
    out = img.astype(np.float32) * gain * (1.0 + rng.uniform(0.0, 0.25) * ramp)
    out += rng.uniform(0.0, 6.0) * rng.standard_normal(size=out.shape, dtype=np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render_face(attrs: dict[str, bool], rng: np.random.Generator, image_size: int) -> np.ndarray:
    """Renders one face with the given attributes as a (image_size, image_size, 3) uint8 array.

    All randomness (nuisance factors, colours, accessory styles) comes from `rng`, so the image
    is a pure function of the generator state.
    """
    size = image_size * SUPERSAMPLE
    bg = _background(rng, image_size)
    # Premultiplied alpha ("RGBa"): every stroke is opaque, so drawing is unchanged, and the box
    # downscale below then blends the face edges correctly without a conversion pass.
    layer = Image.new("RGBa", (size, size), (0, 0, 0, 0))
    cx = size * (0.5 + rng.uniform(-0.07, 0.07))
    cy = size * (0.47 + rng.uniform(-0.05, 0.06))
    pt = _Painter(ImageDraw.Draw(layer), cx, cy, size * 0.22 * rng.uniform(0.85, 1.1))
    male = attrs["Male"]
    g = _Geometry(
        a=(1.0 if male else 0.9) * rng.uniform(0.95, 1.05),
        b=1.28 * rng.uniform(0.96, 1.04),
        ex=0.4 * rng.uniform(0.95, 1.05),
        ey=-0.05,
        my=0.68 + rng.uniform(-0.03, 0.03),
        mw=(0.42 if attrs["Smiling"] else 0.32) * rng.uniform(0.92, 1.08),
        hair_len=rng.uniform(0.6, 2.0),
    )
    pal = _palette(attrs, rng)

    _draw_back(pt, g, attrs, pal)
    pt.polygon(_head_outline(g, male), fill=pal.skin)
    _draw_skin_details(pt, g, attrs, pal)
    _draw_eyes(pt, g, attrs, pal)
    _draw_nose(pt, pal)
    mouth_bottom = _draw_mouth(pt, g, attrs, pal)
    _draw_facial_hair(pt, g, attrs, pal, mouth_bottom)
    if not attrs["Bald"]:
        _draw_front_hair(pt, g, attrs, pal, rng)
    if attrs["Wearing_Hat"]:
        _draw_hat(pt, g, pal, rng)
    if attrs["Eyeglasses"]:
        _draw_glasses(pt, g, pal, rng)
    if attrs["Wearing_Earrings"]:
        _draw_earrings(pt, g, pal, rng)

    # Nearest-neighbour rotation is enough at SUPERSAMPLE x; the box downscale anti-aliases it.
    layer = layer.rotate(rng.uniform(-12, 12), resample=Image.Resampling.NEAREST, center=(cx, cy))
    face = layer.reduce(SUPERSAMPLE).convert("RGBA")
    image = Image.alpha_composite(bg.convert("RGBA"), face).convert("RGB")
    return _photometric(np.asarray(image), rng)


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """JPEG-encodes an RGB uint8 array (stored as raw bytes so that reading needs no TF).

    Chroma subsampling is off: at 64 px it would smear small colour-coded details (blush,
    lipstick, earrings) that carry attributes.
    """
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()
