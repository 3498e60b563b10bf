"""Similarity judgements, OCR words and photo crops: sizes, determinism, integrity."""

from __future__ import annotations

import numpy as np

from krunch.architectures.crnn import EASYOCR_EN_CHARACTERS
from krunch.data.images import photo_crops, photo_paths
from krunch.data.ocr_words import news_words, word_images
from krunch.data.similarity import lee_documents, lee_human_similarity, polarity_sentences, simlex999, wordsim353
from krunch.data.text import Split


def test_similarity_sets():
    assert len(lee_documents()) == 50
    human = lee_human_similarity()
    assert np.allclose(human, human.T) and np.allclose(np.diag(human), 1.0)
    assert ((0 <= human) & (human <= 1)).all()
    assert len(wordsim353().scores) == 353 and len(simlex999().scores) == 999
    sentences = polarity_sentences()
    assert len(sentences) == 200 and not any(s.startswith("__label__") for s in sentences)


def test_ocr_words_are_distinct_in_charset_and_fixed():
    words = news_words(EASYOCR_EN_CHARACTERS)
    assert len(words) == len(set(words)) == 1000
    assert all(set(w) <= set(EASYOCR_EN_CHARACTERS) and len(w) >= 2 for w in words)
    assert words == news_words(EASYOCR_EN_CHARACTERS)
    calibration = news_words(EASYOCR_EN_CHARACTERS, 1000, Split.CALIBRATION)
    assert len(set(calibration)) == 1000 and not set(calibration) & set(words)  # healing never sees a test word
    assert news_words(EASYOCR_EN_CHARACTERS, 10) == words[:10]  # a smaller evaluation reads a prefix
    sample = word_images(EASYOCR_EN_CHARACTERS, count=5)
    for item in sample:
        pixels = np.asarray(item.image)
        assert item.image.mode == "L" and pixels.min() < 64 and pixels.max() == 255


def test_photo_crops_are_fixed_by_seed():
    assert len(photo_paths()) == 10
    crops = photo_crops()
    assert len(crops) == 100
    again = photo_crops()
    assert all(a.size == b.size and a.tobytes() == b.tobytes() for a, b in zip(crops[:12], again[:12]))
    assert [c.size for c in photo_crops(seed=1)] != [c.size for c in crops]
