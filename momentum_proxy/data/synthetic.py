"""A procedural fine-grained dataset: stylised birds whose species differ only in subtle details.

Every species is the same kind of bird (tail, body, wing, head, beak, legs); species differ in
tail shape and length, wing bars and spots, breast markings, cap and crest, eye stripe, beak length
and small colour offsets. Images add nuisance variation: pose, scale, position, cluttered
backgrounds, lighting and partial occlusion. Output is deterministic: every species is seeded by
`(seed, class)` and every image by `(seed, class, index)`, so the same arguments give the same bytes.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from momentum_proxy.data.manifest import carve_val, val_class_count, warn_small_data, write_manifest
from momentum_proxy.data.prepare import claim_output
from momentum_proxy.errors import UserError

TAILS = ("fork", "round", "wedge", "square")
BREASTS = ("plain", "spots", "streaks", "bars")
CAPS = ((25, 25, 25), (150, 40, 30), (120, 120, 120), (225, 220, 205), (90, 60, 35))
JPEG_QUALITY = 90


@dataclass(frozen=True)
class Species:
    """The attributes shared by all birds of one class (body, belly and wing colours are HSV in [0, 1])."""

    body: tuple[float, float, float]
    belly: tuple[float, float, float]
    wing: tuple[float, float, float]
    cap: tuple[int, int, int] | None
    tail: str
    tail_len: float
    wing_bars: int
    wing_spot: bool
    breast: str
    eye_stripe: bool
    crest: int
    beak_len: float
    body_aspect: float


def make_species(seed: int, index: int) -> Species:
    """Draw the attributes of class `index` from an RNG seeded by `(seed, index)` only."""
    rng = np.random.default_rng([seed, 0, index])
    hue = rng.uniform(0.02, 0.16)
    return Species(
        body=(hue, rng.uniform(0.35, 0.7), rng.uniform(0.35, 0.65)),
        belly=(hue + rng.uniform(-0.04, 0.04), rng.uniform(0.1, 0.45), rng.uniform(0.7, 0.92)),
        wing=(hue + rng.uniform(-0.05, 0.05), rng.uniform(0.3, 0.7), rng.uniform(0.2, 0.5)),
        cap=CAPS[rng.integers(len(CAPS))] if rng.random() < 0.6 else None,
        tail=TAILS[rng.integers(len(TAILS))],
        tail_len=rng.uniform(0.7, 1.2),
        wing_bars=int(rng.integers(0, 4)),
        wing_spot=bool(rng.random() < 0.5),
        breast=BREASTS[rng.integers(len(BREASTS))],
        eye_stripe=bool(rng.random() < 0.5),
        crest=int(rng.integers(0, 3)),
        beak_len=rng.uniform(0.7, 1.4),
        body_aspect=rng.uniform(0.85, 1.15),
    )


def _rgb(hsv: tuple[float, float, float], rng: np.random.Generator) -> tuple[int, int, int]:
    """An HSV colour as 8-bit RGB, with a small per-individual jitter."""
    h, s, v = hsv + rng.normal(0, 0.015, 3)
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


@dataclass(frozen=True)
class _Pen:
    """Draws on a square canvas in drawing units: the canvas is 100 x 100 units of `u` pixels."""

    draw: ImageDraw.ImageDraw
    u: float

    def pt(self, x: float, y: float) -> tuple[float, float]:
        """The pixel coordinates of point (x, y)."""
        return x * self.u, y * self.u

    def box(self, cx: float, cy: float, rx: float, ry: float) -> list[float]:
        """The pixel bounding box of an ellipse centred on (cx, cy) with radii rx, ry."""
        return [(cx - rx) * self.u, (cy - ry) * self.u, (cx + rx) * self.u, (cy + ry) * self.u]

    def width(self, w: float) -> int:
        """A line width of `w` units in pixels, at least 1."""
        return max(1, int(w * self.u))


@dataclass(frozen=True)
class _Trunk:
    """The body ellipse: centre (x, y) and radii (rx, ry), in drawing units."""

    x: float
    y: float
    rx: float
    ry: float


def draw_bird(sp: Species, rng: np.random.Generator, canvas: int) -> Image.Image:
    """Render one bird of species `sp`, facing right, centred on a transparent square RGBA canvas.

    The bird fits in the inscribed circle, so it can be rotated without clipping.
    """
    im = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
    pen = _Pen(ImageDraw.Draw(im), canvas / 100.0)
    body, belly, wing = _rgb(sp.body, rng), _rgb(sp.belly, rng), _rgb(sp.wing, rng)
    trunk = _Trunk(54.0, 54.0, 22.0 * sp.body_aspect, 14.0 / sp.body_aspect)
    _draw_legs(pen, trunk)  # legs and tail first: both are behind the body
    _draw_tail(pen, sp, trunk, wing)
    _draw_body(pen, sp, rng, trunk, body, belly)
    _draw_wing(pen, sp, trunk, wing)
    _draw_head(pen, sp, body)
    return im


def _draw_legs(pen: _Pen, t: _Trunk) -> None:
    """Two legs hanging from the underside of the body."""
    for lx in (t.x - 4, t.x + 4):
        pen.draw.line(
            [pen.pt(lx, t.y + t.ry - 2), pen.pt(lx - 2, t.y + t.ry + 10)], fill=(70, 55, 40), width=pen.width(1.5)
        )


def _draw_tail(pen: _Pen, sp: Species, t: _Trunk, colour: tuple[int, int, int]) -> None:
    """The tail, of the species' shape and length, from the back of the body."""
    tl, tx, ty = 24.0 * sp.tail_len, t.x - t.rx + 6, t.y - 2
    if sp.tail == "fork":
        outline = [(tx, ty - 5), (tx - tl, ty - 10), (tx - 0.6 * tl, ty + 1), (tx - tl, ty + 10), (tx, ty + 5)]
    elif sp.tail == "round":
        outline = [
            (tx, ty - 5),
            (tx - 0.8 * tl, ty - 8),
            (tx - tl, ty - 3),
            (tx - tl, ty + 3),
            (tx - 0.8 * tl, ty + 8),
            (tx, ty + 5),
        ]
    elif sp.tail == "wedge":
        outline = [(tx, ty - 5), (tx - 1.1 * tl, ty), (tx, ty + 5)]
    else:  # square
        outline = [(tx, ty - 5), (tx - tl, ty - 6), (tx - tl, ty + 6), (tx, ty + 5)]
    pen.draw.polygon([pen.pt(x, y) for x, y in outline], fill=colour)


def _draw_body(
    pen: _Pen, sp: Species, rng: np.random.Generator, t: _Trunk, body: tuple[int, int, int], belly: tuple[int, int, int]
) -> None:
    """The body with a pale belly (lower half) and the species' breast pattern in a darker body colour."""
    pen.draw.ellipse(pen.box(t.x, t.y, t.rx, t.ry), fill=body)
    pen.draw.chord(pen.box(t.x, t.y, t.rx, t.ry), 0, 180, fill=belly)
    mark = tuple(int(c * 0.55) for c in body)
    if sp.breast == "spots":
        for _ in range(9):
            x, y = t.x + rng.uniform(-0.3, 0.75) * t.rx, t.y + rng.uniform(0.15, 0.75) * t.ry
            pen.draw.ellipse(pen.box(x, y, 1.8, 1.8), fill=mark)
    elif sp.breast == "streaks":
        for k in range(5):
            x = t.x + (k / 4 * 0.9 - 0.2) * t.rx
            pen.draw.line(
                [pen.pt(x, t.y + 0.2 * t.ry), pen.pt(x - 2, t.y + 0.75 * t.ry)], fill=mark, width=pen.width(1.6)
            )
    elif sp.breast == "bars":
        for k in range(3):
            y = t.y + (0.25 + 0.22 * k) * t.ry
            pen.draw.line([pen.pt(t.x - 0.1 * t.rx, y), pen.pt(t.x + 0.75 * t.rx, y)], fill=mark, width=pen.width(1.6))


def _draw_wing(pen: _Pen, sp: Species, t: _Trunk, colour: tuple[int, int, int]) -> None:
    """The wing: an ellipse on the back, with the species' bars and optional pale spot."""
    wx, wy, wrx, wry = t.x - 4, t.y - 3, 0.75 * t.rx, 0.5 * t.ry
    pen.draw.ellipse(pen.box(wx, wy, wrx, wry), fill=colour)
    for k in range(sp.wing_bars):
        x = wx + (0.35 - 0.3 * k) * wrx
        pen.draw.line(
            [pen.pt(x, wy - 0.8 * wry), pen.pt(x - 2, wy + 0.8 * wry)], fill=(235, 230, 215), width=pen.width(1.6)
        )
    if sp.wing_spot:
        pen.draw.ellipse(pen.box(wx - 0.6 * wrx, wy + 0.1 * wry, 3.0, 3.0), fill=(240, 235, 220))


def _draw_head(pen: _Pen, sp: Species, body: tuple[int, int, int]) -> None:
    """The head: crest, cap, eye (with an optional stripe) and beak."""
    hx, hy, hr = 74.0, 38.0, 10.0
    dark = (30, 25, 20)
    if sp.crest:
        h = 7.0 * sp.crest
        pen.draw.polygon(
            [pen.pt(hx - 7, hy - 5), pen.pt(hx - 6 - 0.6 * h, hy - 8 - h), pen.pt(hx + 2, hy - 8)], fill=sp.cap or body
        )
    pen.draw.ellipse(pen.box(hx, hy, hr, hr), fill=body)
    if sp.cap:
        pen.draw.chord(pen.box(hx, hy, hr, hr), 180, 360, fill=sp.cap)
    if sp.eye_stripe:
        pen.draw.line([pen.pt(hx - hr + 1, hy + 1), pen.pt(hx + hr - 1, hy + 1)], fill=dark, width=pen.width(2))
    pen.draw.ellipse(pen.box(hx + 3, hy, 2.2, 2.2), fill=(245, 245, 240))
    pen.draw.ellipse(pen.box(hx + 3.4, hy, 1.3, 1.3), fill=dark)
    bl = 9.0 * sp.beak_len
    pen.draw.polygon(
        [pen.pt(hx + hr - 1.5, hy - 2.5), pen.pt(hx + hr - 1.5 + bl, hy + 1.5), pen.pt(hx + hr - 1.5, hy + 3.5)],
        fill=(60, 50, 40),
    )


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A smooth random colour gradient covered with random clutter shapes and a little texture."""
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    a = rng.uniform(0, 2 * np.pi)
    t = (np.cos(a) * ramp[None, :] + np.sin(a) * ramp[:, None] + 1.0) / 2.0
    t += (rng.random((size, size), dtype=np.float32) - 0.5) * 0.1  # grain
    c0, c1 = rng.uniform(40, 220, 3).astype(np.float32), rng.uniform(40, 220, 3).astype(np.float32)
    arr = c0 + (c1 - c0) * t[..., None]
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    lo, hi = -0.1 * size, 1.1 * size
    _clutter(ImageDraw.Draw(im), rng, size, int(rng.integers(2, 7)), (lo, lo, hi, hi), 0.25)
    return im.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2))) if rng.random() < 0.5 else im


def _clutter(d: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, n: int, area: tuple, rmax: float) -> None:
    """Draw `n` random ellipses, polygons and branch-like lines of random colours.

    Shapes are centred in `area` (a box) and reach at most `rmax * size` from their centre (lines: longer).
    """
    for _ in range(n):
        col = tuple(int(c) for c in rng.uniform(20, 235, 3))
        x, y = rng.uniform(area[:2], area[2:])
        r = rng.uniform(0.04, rmax) * size
        kind = rng.integers(3)
        if kind == 0:
            d.ellipse([x - r, y - r * rng.uniform(0.3, 1), x + r, y + r * rng.uniform(0.3, 1)], fill=col)
        elif kind == 1:
            pts = [(x + r * np.cos(t), y + r * np.sin(t)) for t in np.sort(rng.uniform(0, 2 * np.pi, 5))]
            d.polygon(pts, fill=col)
        else:
            x2, y2 = x + rng.normal(0, 2 * rmax) * size, y + rng.normal(0, 2 * rmax) * size
            d.line([(x, y), (x2, y2)], fill=col, width=int(rng.integers(1, max(2, size // 16))))


def _lighting(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Random brightness, contrast, colour cast and sensor noise."""
    arr = np.asarray(im, dtype=np.float32)
    contrast, brightness, cast = rng.uniform(0.6, 1.3), rng.uniform(0.65, 1.3), rng.uniform(0.82, 1.18, 3)
    gain = (contrast * cast).astype(np.float32)  # (x - mean) * contrast + mean * brightness, per channel cast
    offset = (arr.mean() * (brightness - contrast) * cast).astype(np.float32)
    arr = arr * gain + offset + (rng.random(arr.shape, dtype=np.float32) - 0.5) * rng.uniform(4, 20)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def render_image(sp: Species, rng: np.random.Generator, size: int) -> Image.Image:
    """One photo of a bird of species `sp`: random pose, scale and position on clutter, then lighting."""
    im = _background(rng, size)
    bird = draw_bird(sp, rng, 2 * size).reduce(2)  # drawn at 2x, then halved: smooth edges
    if rng.random() < 0.5:
        bird = bird.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    bird = bird.rotate(rng.uniform(-25, 25), resample=Image.Resampling.BILINEAR)
    side = int(size * rng.uniform(0.85, 1.2))
    bird = bird.resize((side, side), Image.Resampling.BICUBIC)
    slack = size - side
    x, y = (int(v) for v in rng.integers(min(0, slack) - side // 8, max(0, slack) + side // 8 + 1, 2))
    im.paste(bird, (x, y), bird)
    if rng.random() < 0.35:  # foreground clutter partly occluding the bird
        a, b = side // 4, 3 * side // 4
        _clutter(ImageDraw.Draw(im), rng, size, int(rng.integers(1, 3)), (x + a, y + a, x + b, y + b), 0.12)
    return _lighting(im, rng)


def generate_synthetic(
    out: str | Path,
    classes: int = 40,
    per_class: int = 30,
    size: int = 128,
    seed: int = 0,
    progress: bool = True,
    val_classes: float | int = 0.2,
    overwrite: bool = False,
) -> Path:
    """Write the synthetic bird dataset to `out` (images + manifest.csv) and return `out`.

    Classes `0 .. classes//2 - 1` form the train split, the rest the test split; `val_classes` (a count or a
    fraction) of the train classes, picked with `seed`, become the validation split.
    """
    if classes < 2:
        raise UserError(f"classes must be at least 2, got {classes}")
    if per_class < 2:
        raise UserError(f"per_class must be at least 2, got {per_class}")
    if size < 32:
        raise UserError(f"size must be at least 32 pixels, got {size}")
    if seed < 0:
        raise UserError(f"seed must be non-negative, got {seed}")
    out = Path(out)
    val_class_count(val_classes, classes // 2)  # refuse a bad split before drawing anything
    claim_output(out, overwrite)
    width = max(2, len(str(classes - 1)))
    rows = []
    with tqdm(total=classes * per_class, desc="synthetic birds", unit="img", disable=not progress) as bar:
        for c in range(classes):
            sp, name = make_species(seed, c), f"species_{c:0{width}d}"
            folder = out / "images" / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                im = render_image(sp, np.random.default_rng([seed, 1, c, i]), size)
                im.save(folder / f"{i:04d}.jpg", quality=JPEG_QUALITY)
                rows.append(
                    {
                        "path": f"images/{name}/{i:04d}.jpg",
                        "label": c,
                        "class_name": name,
                        "split": "train" if c < classes // 2 else "test",
                    }
                )
                bar.update()
    write_manifest(out, df := carve_val(pd.DataFrame(rows), val_classes, seed))
    warn_small_data(df)
    return out
