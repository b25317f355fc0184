"""SYNTHETIC stand-in for WikiArt: procedurally painted images in the `huggan/wikiart` schema.

Nothing here is a real painting. The images are gradients covered with short, semi-transparent
brush strokes whose palette depends on the (made-up) artist and whose composition depends on the
genre, so that the offline demo and the tests have data that looks roughly like paintings and
that FID can tell apart from noise. The file is written through `datasets`, so its parquet schema
carries the same Hugging Face features metadata (ClassLabel names) as the Hub dataset and is read
by exactly the same code.

With ``broken=True`` a few deliberately defective rows are mixed in, so that the filter stage has
work to do: truncated JPEG bytes, a tiny image, a grayscale image, an image too wide for
``filter.max_aspect``, a near-duplicate (a resized, re-encoded copy of another row), and two odd
but valid encodings (CMYK JPEG, RGBA PNG) that the filter must convert rather than drop.
"""

from __future__ import annotations

import colorsys
import contextlib
import io
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .wikiart import ARTISTS, GENRES, STYLES

IMPRESSIONIST_ARTISTS = [
    "claude-monet", "pierre-auguste-renoir", "camille-pissarro", "alfred-sisley", "edgar-degas",
    "berthe-morisot", "mary-cassatt", "childe-hassam", "eugene-boudin", "gustave-caillebotte",
]
# Monet and Renoir dominate WikiArt's Impressionism; weight the synthetic data similarly.
IMPRESSIONIST_WEIGHTS = np.array([5, 5, 3, 2, 2, 1, 1, 2, 2, 1], dtype=float)

# Rows in other styles, so that download.style has something to filter out.
OTHER_STYLE_ARTISTS = [
    ("rembrandt", "Baroque"), ("pablo-picasso", "Cubism"), ("vincent-van-gogh", "Post_Impressionism"),
    ("ivan-aivazovsky", "Romanticism"), ("katsushika-hokusai", "Ukiyo_e"), ("andy-warhol", "Pop_Art"),
]
# Every fifth well-formed row is in another style: regular rather than random, so that even a
# download of a handful of images meets rows that download.style must skip.
OTHER_STYLE_EVERY = 5

SYNTHETIC_GENRES = ["landscape", "cityscape", "portrait", "still_life", "genre_painting", "Unknown Genre"]
GENRE_WEIGHTS = np.array([5, 3, 2, 2, 2, 1], dtype=float)

# Defective rows and the row index (in the written file) at which each is inserted. They sit early
# in the file so that a small `download.max_images` (the demo uses 40) still includes all of them.
BROKEN_KINDS = ["truncated", "tiny", "grayscale", "cmyk", "near_duplicate", "panorama", "rgba_png"]
BROKEN_POSITIONS = [2, 5, 8, 11, 14, 17, 20]
# The near-duplicate copies the first row of the file, which is always a valid Impressionism row.
NEAR_DUPLICATE_SOURCE_ROW = 0


def wikiart_features():
    """The `datasets.Features` of `huggan/wikiart`."""
    from datasets import ClassLabel, Features
    from datasets import Image as ImageFeature

    return Features({
        "image": ImageFeature(),
        "artist": ClassLabel(names=ARTISTS),
        "genre": ClassLabel(names=GENRES),
        "style": ClassLabel(names=STYLES),
    })


def _artist_palette(artist: str, style: str, rng: np.random.Generator) -> np.ndarray:
    """Five RGB colours (0-255) around a hue fixed by the artist's name; darker for non-Impressionism."""
    base_hue = (zlib.crc32(artist.encode()) % 360) / 360.0
    if style == "Impressionism":
        saturation, value = (0.35, 0.7), (0.7, 1.0)
    else:
        saturation, value = (0.5, 0.95), (0.2, 0.75)
    colours = []
    for offset in (0.0, 0.08, -0.08, 0.5, 0.15):
        hue = (base_hue + offset + rng.normal(0, 0.02)) % 1.0
        rgb = colorsys.hsv_to_rgb(hue, rng.uniform(*saturation), rng.uniform(*value))
        colours.append([round(c * 255) for c in rgb])
    return np.array(colours, dtype=float)


def _background(width: int, height: int, genre: str, palette: np.ndarray,
                rng: np.random.Generator) -> tuple[Image.Image, float]:
    """A vertical sky-to-ground gradient; returns the image and the horizon height (0..1)."""
    horizon = rng.uniform(0.3, 0.7) if genre in ("landscape", "cityscape") else rng.uniform(0.6, 0.95)
    # Pull the sky towards pale blue and the ground towards earth tones, tinted by the palette.
    sky_top = palette[0] * 0.4 + np.array([175, 205, 240]) * 0.6
    sky_bottom = palette[1] * 0.5 + np.array([235, 225, 210]) * 0.5
    ground_top = palette[2] * 0.5 + np.array([110, 140, 80]) * 0.5
    ground_bottom = palette[3] * 0.3 + np.array([80, 70, 50]) * 0.7
    ys = np.linspace(0.0, 1.0, height)[:, None]
    sky_t = np.clip(ys / horizon, 0, 1)
    ground_t = np.clip((ys - horizon) / max(1e-6, 1 - horizon), 0, 1)
    sky = sky_top * (1 - sky_t) + sky_bottom * sky_t
    ground = ground_top * (1 - ground_t) + ground_bottom * ground_t
    column = np.where(ys < horizon, sky, ground)  # (height, 3)
    pixels = np.repeat(column[:, None, :], width, axis=1)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB"), horizon


def _blobs(draw: ImageDraw.ImageDraw, width: int, height: int, genre: str, horizon: float,
           palette: np.ndarray, rng: np.random.Generator) -> None:
    """Large soft shapes that give each genre its composition (and each image distinct low frequencies)."""
    def colour(alpha: int) -> tuple[int, ...]:
        c = palette[rng.integers(len(palette))] + rng.normal(0, 25, 3)
        return (*c.clip(0, 255).astype(int).tolist(), alpha)

    horizon_y = horizon * height
    if genre == "cityscape":
        for _ in range(rng.integers(3, 8)):
            x0 = rng.uniform(0, width)
            w = rng.uniform(0.08, 0.25) * width
            top = horizon_y - rng.uniform(0.1, 0.5) * height
            draw.rectangle([x0, top, x0 + w, horizon_y + 0.05 * height], fill=colour(200))
    elif genre in ("portrait", "genre_painting"):
        figures = 1 if genre == "portrait" else rng.integers(2, 5)
        for _ in range(figures):
            cx = rng.uniform(0.2, 0.8) * width
            scale = (0.35 if genre == "portrait" else 0.15) * min(width, height)
            cy = rng.uniform(0.35, 0.6) * height
            draw.ellipse([cx - scale * 0.6, cy, cx + scale * 0.6, cy + scale * 2.2], fill=colour(220))
            draw.ellipse([cx - scale * 0.35, cy - scale * 0.7, cx + scale * 0.35, cy], fill=colour(230))
    elif genre == "still_life":
        table_y = rng.uniform(0.55, 0.75) * height
        draw.rectangle([0, table_y, width, height], fill=colour(200))
        for _ in range(rng.integers(2, 6)):
            cx, r = rng.uniform(0.2, 0.8) * width, rng.uniform(0.05, 0.15) * min(width, height)
            draw.ellipse([cx - r, table_y - 2 * r, cx + r, table_y], fill=colour(230))
    # Clouds, trees or bushes everywhere; their random placement decorrelates perceptual hashes.
    for _ in range(rng.integers(3, 7)):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(0.05, 0.25) * width, rng.uniform(0.04, 0.18) * height
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour(int(rng.integers(90, 180))))


def _strokes(draw: ImageDraw.ImageDraw, base: np.ndarray, palette: np.ndarray, impressionist: bool,
             rng: np.random.Generator) -> None:
    """Many short, semi-transparent strokes tinted by the colour underneath (broken-colour technique)."""
    height, width, _ = base.shape
    count = int(width * height / (35 if impressionist else 120))
    xs = rng.uniform(0, width, count)
    ys = rng.uniform(0, height, count)
    lengths = rng.uniform(4, 14 if impressionist else 30, count)
    angles = rng.normal(rng.uniform(0, np.pi), 0.6, count)
    widths = rng.integers(2, 5 if impressionist else 9, count)
    picks = rng.integers(0, len(palette), count)
    mix = rng.uniform(0.1, 0.4, count)[:, None]
    alphas = rng.integers(90, 200 if impressionist else 255, count)
    under = base[ys.astype(int) % height, xs.astype(int) % width].astype(float)
    colours = (under * (1 - mix) + palette[picks] * mix + rng.normal(0, 14, (count, 3))).clip(0, 255)
    ends_x, ends_y = xs + np.cos(angles) * lengths, ys + np.sin(angles) * lengths
    for i in range(count):
        draw.line([xs[i], ys[i], ends_x[i], ends_y[i]],
                  fill=(*colours[i].astype(int).tolist(), int(alphas[i])), width=int(widths[i]))


def paint(width: int, height: int, artist: str, genre: str, style: str,
          rng: np.random.Generator) -> Image.Image:
    """Paint one SYNTHETIC picture (RGB) of the given size."""
    palette = _artist_palette(artist, style, rng)
    image, horizon = _background(width, height, genre, palette, rng)
    draw = ImageDraw.Draw(image, "RGBA")
    _blobs(draw, width, height, genre, horizon, palette, rng)
    impressionist = style == "Impressionism"
    if impressionist:
        # Soften the shapes first, so the strokes rather than hard edges carry the detail.
        image = image.filter(ImageFilter.GaussianBlur(radius=max(1.0, min(width, height) / 60)))
        draw = ImageDraw.Draw(image, "RGBA")
    _strokes(draw, np.asarray(image), palette, impressionist, rng)
    return image


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _random_size(rng: np.random.Generator) -> tuple[int, int]:
    """Long side 128-320 px, aspect 1-2 (short side never under 100 px), either orientation."""
    long_side = int(rng.integers(128, 321))
    aspect = rng.uniform(1.0, min(2.0, long_side / 100))
    short_side = round(long_side / aspect)
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def _good_row(index: int, seed: int) -> dict:
    rng = np.random.default_rng([seed, index])
    if index % OTHER_STYLE_EVERY != OTHER_STYLE_EVERY - 2:
        artist = str(rng.choice(IMPRESSIONIST_ARTISTS, p=IMPRESSIONIST_WEIGHTS / IMPRESSIONIST_WEIGHTS.sum()))
        style = "Impressionism"
    else:
        artist, style = OTHER_STYLE_ARTISTS[rng.integers(len(OTHER_STYLE_ARTISTS))]
    genre = str(rng.choice(SYNTHETIC_GENRES, p=GENRE_WEIGHTS / GENRE_WEIGHTS.sum()))
    width, height = _random_size(rng)
    image = paint(width, height, artist, genre, style, rng)
    # WikiArt is mostly JPEG; a few PNGs exercise the other file extension.
    data = _encode(image, "PNG") if index % 9 == 4 else _encode(image, "JPEG", quality=90)
    return {"image": image, "bytes": data, "artist": artist, "genre": genre, "style": style}


def _broken_row(kind: str, seed: int, duplicate_of: dict) -> dict:
    rng = np.random.default_rng([seed, 1_000_003, BROKEN_KINDS.index(kind)])
    artist, genre, style = "claude-monet", "landscape", "Impressionism"
    if kind == "near_duplicate":
        original = duplicate_of["image"]
        smaller = original.resize((round(original.width * 0.85), round(original.height * 0.85)),
                                  Image.Resampling.LANCZOS)
        return {"bytes": _encode(smaller, "JPEG", quality=70), "artist": duplicate_of["artist"],
                "genre": duplicate_of["genre"], "style": style}
    size = {"tiny": (20, 16), "panorama": (390, 120)}.get(kind, (224, 160))
    image = paint(*size, artist, genre, style, rng)
    if kind == "truncated":
        full = _encode(image, "JPEG", quality=90)
        data = full[: int(len(full) * 0.6)]
    elif kind == "grayscale":
        data = _encode(image.convert("L"), "JPEG", quality=90)
    elif kind == "cmyk":
        data = _encode(image.convert("CMYK"), "JPEG", quality=90)
    elif kind == "rgba_png":
        rgba = image.convert("RGBA")
        alpha = np.full((size[1], size[0]), 255, dtype=np.uint8)
        alpha[: size[1] // 4] = 128  # a translucent band, as in some scanned PNGs
        rgba.putalpha(Image.fromarray(alpha))
        data = _encode(rgba, "PNG")
    else:  # tiny, panorama: valid JPEGs the filter must reject on size or shape
        data = _encode(image, "JPEG", quality=90)
    return {"bytes": data, "artist": artist, "genre": genre, "style": style}


def synthetic_rows(n_images: int, seed: int, broken: bool = True) -> list[dict]:
    """The rows `write_synthetic_wikiart` writes: dicts with bytes, artist, genre, style, kind.

    ``n_images`` well-formed rows; with ``broken`` the defective rows come on top of them.
    ``kind`` is "good" or one of BROKEN_KINDS (tests use it; it is not written to the parquet).
    """
    if n_images < 1:
        raise ValueError("n_images must be at least 1")
    good = [_good_row(i, seed) for i in range(n_images)]
    rows = [{**row, "kind": "good"} for row in good]
    if broken:
        for position, kind in zip(BROKEN_POSITIONS, BROKEN_KINDS):
            row = _broken_row(kind, seed, good[NEAR_DUPLICATE_SOURCE_ROW])
            rows.insert(min(position, len(rows)), {**row, "kind": kind})
    for row in rows:
        row.pop("image", None)
    return rows


def write_synthetic_wikiart(path: Path | str, n_images: int, seed: int, broken: bool = True) -> Path:
    """Write a SYNTHETIC parquet file with exactly the schema (and HF features) of `huggan/wikiart`.

    Deterministic in ``seed``. See the module docstring for what ``broken`` adds.
    """
    import datasets

    rows = synthetic_rows(n_images, seed, broken)
    features = wikiart_features()
    table = {
        "image": [{"bytes": row["bytes"], "path": None} for row in rows],
        "artist": [features["artist"].str2int(row["artist"]) for row in rows],
        "genre": [features["genre"].str2int(row["genre"]) for row in rows],
        "style": [features["style"].str2int(row["style"]) for row in rows],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_datasets():  # a progress bar for a one-batch write is noise in stage logs
        datasets.Dataset.from_dict(table, features=features).to_parquet(str(path))
    return path


@contextlib.contextmanager
def _quiet_datasets():
    """`datasets` without its progress bars, restored afterwards."""
    import datasets

    bars_were_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not bars_were_disabled:
            datasets.enable_progress_bars()


MIRROR_ORDERS = ("by_style", "shuffled")


def write_wikiart_mirror(folder: Path | str, n_rows: int, order: str, *, wanted_style: str = "Impressionism",
                         wanted_share: float = 0.16, shards: int = 2, rows_per_group: int = 8,
                         image_side: int = 128, seed: int = 0) -> list[Path]:
    """A SYNTHETIC local parquet mirror in the `huggan/wikiart` schema, for measuring reads.

    ``wanted_share`` of the rows are in ``wanted_style`` (Impressionism is about 16% of WikiArt),
    the others spread over the remaining 26 styles. ``order`` "by_style" sorts the rows by style id,
    as WikiArt's style folders would lay them out; "shuffled" mixes them. The rows are split into
    ``shards`` files of row groups of ``rows_per_group`` rows (pyarrow writes each group's min/max
    statistics, which a pushed-down filter uses). The images are distinct JPEGs of random noise
    (``image_side`` px; only their bytes matter here, and the download never decodes them).
    Returns the shard paths, in name order.
    """
    import datasets

    if order not in MIRROR_ORDERS:
        raise ValueError(f"order must be one of {MIRROR_ORDERS}")
    rng = np.random.default_rng(seed)
    features = wikiart_features()
    wanted = STYLES.index(wanted_style)
    others = [index for index in range(len(STYLES)) if index != wanted]
    n_wanted = round(n_rows * wanted_share)
    styles = [wanted] * n_wanted + [others[i % len(others)] for i in range(n_rows - n_wanted)]
    styles = sorted(styles) if order == "by_style" else [styles[i] for i in rng.permutation(n_rows)]
    images = []
    for _ in range(n_rows):
        noise = rng.integers(0, 256, (image_side, image_side, 3), dtype=np.uint8)
        images.append({"bytes": _encode(Image.fromarray(noise), "JPEG", quality=85), "path": None})
    table = datasets.Dataset.from_dict({
        "image": images,
        "artist": rng.integers(0, len(ARTISTS), n_rows).tolist(),
        "genre": rng.integers(0, len(GENRES), n_rows).tolist(),
        "style": styles,
    }, features=features)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"train-{i:05d}-of-{shards:05d}.parquet" for i in range(shards)]
    with _quiet_datasets():
        for index, path in enumerate(paths):
            # to_parquet writes one row group per batch of batch_size rows
            table.shard(shards, index, contiguous=True).to_parquet(str(path), batch_size=rows_per_group)
    return paths
