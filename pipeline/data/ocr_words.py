"""Word images for OCR: real words from the Lee news corpus, rendered with Pillow's bundled font.

No labelled OCR set ships offline, so the labels are exact by construction:
the rendered text is the label. The word sample is fixed (seeded), so every
run and every compressed version is judged on the same images; calibration and
healing draw from the other half of the vocabulary.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from krunch.data.bundled import gensim_test_file
from krunch.data.text import Split
from krunch.errors import DataError

DEFAULT_WORD_COUNT = 1000
FONT_SIZE = 36
MARGIN = 8
_WORD_PATTERN = re.compile(r"[A-Za-z0-9]+(?:['.-][A-Za-z0-9]+)*")


@dataclass(frozen=True)
class WordImage:
    text: str
    image: Image.Image


def news_words(charset: str, count: int = DEFAULT_WORD_COUNT, split: Split = Split.EVALUATION) -> list[str]:
    """`count` distinct words (2+ characters, all in `charset`) in a fixed order, from one half of the vocabulary:
    the words healing and calibration see are never the words evaluation reads."""
    text = gensim_test_file("lee_background.cor").read_text(encoding="utf-8", errors="replace")
    allowed = set(charset)
    vocabulary = sorted({w for w in _WORD_PATTERN.findall(text) if len(w) >= 2 and set(w) <= allowed})
    shuffled = random.Random(0).sample(vocabulary, len(vocabulary))
    half = len(shuffled) // 2
    pool = shuffled[:half] if split is Split.EVALUATION else shuffled[half:]
    if len(pool) < count:
        raise DataError("ocr words", f"the {split.value} half has only {len(pool)} distinct words, {count} were asked for")
    return pool[:count]


def render_word(text: str, font: ImageFont.FreeTypeFont) -> Image.Image:
    """Black text on white, tight box plus a margin, as a scanned word crop looks."""
    left, top, right, bottom = font.getbbox(text)
    image = Image.new("L", (right - left + 2 * MARGIN, bottom - top + 2 * MARGIN), 255)
    ImageDraw.Draw(image).text((MARGIN - left, MARGIN - top), text, font=font, fill=0)
    return image


def word_images(charset: str, count: int = DEFAULT_WORD_COUNT, split: Split = Split.EVALUATION) -> list[WordImage]:
    font = ImageFont.load_default(size=FONT_SIZE)
    return [WordImage(word, render_word(word, font)) for word in news_words(charset, count, split)]
