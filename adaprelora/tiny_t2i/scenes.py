"""Procedural scenes for the built-in text-to-image model: one shape in one colour on a plain background.

Everything is drawn from a seed, so the training data, the held-out combinations and the subject
images can be made again anywhere. Shapes in `SHAPES` are what the base model is trained on; the
`SUBJECTS` never appear in its data and are kept for personalisation (DreamBooth), while the judge
is trained on both so it can tell whether a LoRA learned one.

    scene = sample_scene(random.Random(0))
    image = render(scene, size=64)         # PIL.Image, RGB
    caption(scene)                          # "a red circle on a blue background"
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Iterator, Optional

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 135, 30),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
# Six shapes drawn upright: a seventh (a hexagon, too close to a circle at 64 px) or random rotation
# each cost about a fifth of the shape accuracy at 2,300 UNet steps (the model card's Limits).
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
# New shapes and patterns the base model never sees: what a LoRA has to learn.
SUBJECTS = ("heart", "crescent", "striped ring", "arrow")
# (shape, colour) pairs left out of all base training, to test composition.
HELD_OUT = (
    ("circle", "green"), ("square", "purple"), ("triangle", "white"), ("star", "blue"),
    ("diamond", "orange"), ("cross", "yellow"), ("circle", "black"),
)
GENERIC_NOUN = "shape"
# Single-token rare words, seen in the base data as meaningless fillers so their embeddings are
# trained: what trigger words ("a sks shape") are made of.
TRIGGER_WORDS = ("sks", "zwx", "ohwx", "tok")
ALL_SHAPES = SHAPES + SUBJECTS


@dataclass(frozen=True)
class Scene:
    """What is drawn: a shape (or subject) of a colour on a background, at a centre and radius
    given as fractions of the image side."""

    shape: str
    colour: str
    background: str
    cx: float = 0.5
    cy: float = 0.5
    radius: float = 0.3
    angle: float = 0.0


def caption(scene: Scene, noun: Optional[str] = None) -> str:
    """The scene's caption, e.g. "a red circle on a blue background" (`noun` replaces the shape)."""
    return f"a {scene.colour} {noun or scene.shape} on a {scene.background} background"


def is_held_out(shape: str, colour: str) -> bool:
    return (shape, colour) in HELD_OUT


def sample_scene(rng: random.Random, shapes=SHAPES, *, held_out: Optional[bool] = False,
                 colour: Optional[str] = None, background: Optional[str] = None) -> Scene:
    """A random scene. `held_out=False` never gives a held-out (shape, colour) pair, `True` only
    those, None either. `colour` / `background` fix those attributes."""
    while True:
        shape = rng.choice(shapes)
        col = colour or rng.choice(list(COLOURS))
        if held_out is not None and shape in SHAPES and is_held_out(shape, col) != held_out:
            continue
        bg = background or rng.choice([c for c in COLOURS if c != col])
        if bg == col:
            continue
        radius = rng.uniform(0.22, 0.40)
        margin = radius * 1.02
        cx = rng.uniform(margin, 1 - margin)
        cy = rng.uniform(margin, 1 - margin)
        return Scene(shape, col, bg, cx, cy, radius)


def _polygon(cx, cy, r, n, start_deg, radii=None):
    pts = []
    for k in range(n):
        a = math.radians(start_deg + 360.0 * k / n)
        rk = r * (radii[k % len(radii)] if radii else 1.0)
        pts.append((cx + rk * math.cos(a), cy + rk * math.sin(a)))
    return pts


def _rotate(points, cx, cy, deg):
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def _draw_shape(draw: ImageDraw.ImageDraw, scene: Scene, side: int, fill, background) -> None:
    cx, cy, r = scene.cx * side, scene.cy * side, scene.radius * side
    rot = scene.angle
    shape = scene.shape
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r * 0.85
        draw.polygon(_rotate([(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)], cx, cy, rot),
                     fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.15, r * 1.05, 3, -90 + rot), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r * 1.05, 10, -90 + rot, radii=(1.0, 0.45)), fill=fill)
    elif shape == "diamond":
        draw.polygon(_rotate([(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)], cx, cy, rot * 0.5),
                     fill=fill)
    elif shape == "cross":
        w = r * 0.34
        arm = [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
               (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
               (cx - r, cy - w), (cx - w, cy - w)]
        draw.polygon(_rotate(arm, cx, cy, rot), fill=fill)
    elif shape == "heart":
        pts = []
        for k in range(80):
            t = 2 * math.pi * k / 80
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + x * r / 16.5, cy - y * r / 16.5 - r * 0.05))
        draw.polygon(_rotate(pts, cx, cy, rot), fill=fill)
    elif shape == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        off = r * 0.5
        a = math.radians(rot - 30)
        ox, oy = cx + off * math.cos(a), cy + off * math.sin(a)
        draw.ellipse([ox - r * 0.85, oy - r * 0.85, ox + r * 0.85, oy + r * 0.85], fill=background)
    elif shape == "striped ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        # stripes of the background colour across the ring, then the hole
        n = 4
        for k in range(n):
            a = math.radians(rot + 180.0 * k / n)
            dx, dy = math.cos(a) * r * 1.1, math.sin(a) * r * 1.1
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=background, width=max(1, int(r * 0.24)))
        h = r * 0.45
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=background)
    elif shape == "arrow":
        w = r * 0.36
        head = r * 0.7
        pts = [(cx - r, cy - w), (cx + r - head, cy - w), (cx + r - head, cy - r * 0.75), (cx + r, cy),
               (cx + r - head, cy + r * 0.75), (cx + r - head, cy + w), (cx - r, cy + w)]
        draw.polygon(_rotate(pts, cx, cy, rot), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(ALL_SHAPES)}")


def render(scene: Scene, size: int = 64, supersample: int = 4) -> Image.Image:
    """Draw the scene as an RGB image of `size` x `size`, anti-aliased by drawing `supersample`x larger."""
    side = size * supersample
    bg = COLOURS[scene.background]
    image = Image.new("RGB", (side, side), bg)
    _draw_shape(ImageDraw.Draw(image), scene, side, COLOURS[scene.colour], bg)
    return image.resize((size, size), Image.Resampling.LANCZOS) if supersample > 1 else image


def render_array(scene: Scene, size: int = 64) -> np.ndarray:
    """`render` as a float32 array (3, size, size) in [-1, 1], the VAE's input range."""
    arr = np.asarray(render(scene, size), dtype=np.float32) / 127.5 - 1.0
    return arr.transpose(2, 0, 1)


def scenes(seed: int, count: int, shapes=SHAPES, *, held_out: Optional[bool] = False) -> Iterator[Scene]:
    rng = random.Random(seed)
    for _ in range(count):
        yield sample_scene(rng, shapes, held_out=held_out)


def subject_scenes(subject: str, count: int, seed: int = 0, colour: Optional[str] = None) -> list[Scene]:
    """`count` views of one subject (fixed colour, varied background, position and size): the
    images a user would upload to personalise the model with it."""
    if subject not in SUBJECTS:
        raise ValueError(f"unknown subject {subject!r}; expected one of {', '.join(SUBJECTS)}")
    colour = colour or SUBJECT_COLOURS[subject]
    rng = random.Random(seed)
    backgrounds = [c for c in COLOURS if c != colour]
    rng.shuffle(backgrounds)
    out = []
    for i in range(count):
        s = sample_scene(rng, (subject,), held_out=None, colour=colour, background=backgrounds[i % len(backgrounds)])
        out.append(replace(s, radius=min(s.radius + 0.04, 0.4)))
    return out


# The colour each subject comes in when it is used as a personal object.
SUBJECT_COLOURS = {"heart": "red", "crescent": "yellow", "striped ring": "orange", "arrow": "green"}

__all__ = ["ALL_SHAPES", "COLOURS", "GENERIC_NOUN", "HELD_OUT", "SHAPES", "SUBJECTS", "SUBJECT_COLOURS",
           "TRIGGER_WORDS", "Scene", "caption", "is_held_out", "render", "render_array", "sample_scene",
           "scenes", "subject_scenes"]
