"""Text corpora: the cleaned Wikipedia sample, the held-out news articles and user files, split into disjoint halves."""

from __future__ import annotations

import pytest

from krunch.data.text import Split, corpus_documents, split_documents, token_slice, wikipedia_articles
from krunch.errors import DataError


class CharacterTokenizer:
    """One id per character: enough to test slicing without a model."""

    def __call__(self, text: str, add_special_tokens: bool = False, verbose: bool = True) -> dict:
        return {"input_ids": [ord(c) for c in text]}


def test_wikipedia_is_cleaned_articles_without_redirects_or_markup():
    articles = wikipedia_articles()
    assert 90 <= len(articles) <= 110
    assert all(len(a) >= 2000 for a in articles)
    assert not any(a.lower().startswith("#redirect") for a in articles)
    assert sum("[[" in a or "{{" in a for a in articles) < len(articles) // 10
    assert articles[0].startswith("Anarchism is a political philosophy")
    assert wikipedia_articles() == articles  # second call reads the cache


def test_news_is_a_second_domain_with_its_own_halves():
    articles = corpus_documents("news")
    assert len(articles) == 300
    assert articles[0].startswith("Hundreds of people have been forced to vacate their homes")
    evaluation, calibration = split_documents(articles, Split.EVALUATION), split_documents(articles, Split.CALIBRATION)
    assert evaluation + calibration == articles and 100 < len(evaluation) < 200
    wikipedia = "\n".join(wikipedia_articles())
    assert not any(article[:200] in wikipedia for article in articles)
    ids = token_slice(CharacterTokenizer(), "news", Split.EVALUATION, 5000)
    assert "".join(map(chr, ids)).startswith("Hundreds of people")


def test_evaluation_and_calibration_halves_are_disjoint_and_cover_the_corpus():
    documents = wikipedia_articles()
    evaluation = split_documents(documents, Split.EVALUATION)
    calibration = split_documents(documents, Split.CALIBRATION)
    assert evaluation + calibration == documents
    assert evaluation and calibration
    eval_chars, calib_chars = sum(map(len, evaluation)), sum(map(len, calibration))
    assert 0.8 < eval_chars / calib_chars < 1.25


def test_text_file_corpus(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("alpha beta gamma\n\nsecond paragraph here\n\n  \n\nthird one")
    assert corpus_documents(f"file:{path}") == ["alpha beta gamma", "second paragraph here", "third one"]
    ids = token_slice(CharacterTokenizer(), f"file:{path}", Split.EVALUATION, 10)
    assert "".join(map(chr, ids)) == "alpha beta"
    with pytest.raises(DataError, match="only .* tokens, 1000 were asked for"):
        token_slice(CharacterTokenizer(), f"file:{path}", Split.EVALUATION, 1000)


def test_bad_text_data_is_named(tmp_path):
    with pytest.raises(DataError, match="unknown text data"):
        corpus_documents("imdb")
    with pytest.raises(DataError, match="text file not found"):
        corpus_documents(f"file:{tmp_path / 'absent.txt'}")
    (tmp_path / "one.txt").write_text("just one paragraph")
    with pytest.raises(DataError, match="at least two paragraphs"):
        corpus_documents(f"file:{tmp_path / 'one.txt'}")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="not a UTF-8 text file"):
        corpus_documents(f"file:{tmp_path / 'binary.txt'}")
