"""Text corpora for perplexity and calibration, split into disjoint halves.

A corpus is a list of documents: the cleaned Wikipedia sample that ships with
gensim (`wikipedia`), the 300 Australian news articles of gensim's Lee corpus
(`news`: another domain, which no recipe calibrates on by default, so a gain
that only fits Wikipedia shows), or a user's plain-text file (`file:PATH`,
documents separated by blank lines). The first half of the documents (by characters) is
the evaluation split, the second half the calibration split, so calibrating a
compression never sees the text it is judged on.
"""

from __future__ import annotations

import bz2
import enum
import json
import re
from pathlib import Path

from krunch.cache import cache_path, write_text_atomic
from krunch.data.bundled import WIKIPEDIA_DUMP, gensim_test_file
from krunch.errors import DataError

BUILTIN_CORPORA = ("wikipedia", "news")
NEWS_ARTICLES = "lee_background.cor"  # one article per line
MIN_ARTICLE_CHARS = 2000
_CLEANING_VERSION = "1"


class Split(enum.Enum):
    EVALUATION = "evaluation"
    CALIBRATION = "calibration"


def wikipedia_articles() -> list[str]:
    """~100 cleaned articles (3.1M characters); cleaned once, then read from the cache."""
    cached = cache_path("data", f"wikipedia-v{_CLEANING_VERSION}.json")
    if cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    articles = _clean_wikipedia(gensim_test_file(WIKIPEDIA_DUMP))
    write_text_atomic(cached, json.dumps(articles))
    return articles


def _clean_wikipedia(dump: Path) -> list[str]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.open(dump) as stream:
        for _title, markup, _page_id in extract_pages(stream, filter_namespaces=("0",)):
            if markup.lstrip().lower().startswith("#redirect"):
                continue
            text = filter_wiki(markup).replace("'''", "").replace("''", '"')
            text = re.sub(r"\n{3,}", "\n\n", text).strip()
            if len(text) >= MIN_ARTICLE_CHARS:
                articles.append(text)
    return articles


def news_articles() -> list[str]:
    """The 300 news articles of gensim's Lee background corpus (360k characters)."""
    lines = gensim_test_file(NEWS_ARTICLES).read_text(encoding="utf-8", errors="replace").splitlines()
    return [line.strip() for line in lines if line.strip()]


def text_file_documents(path: Path, reference: str) -> list[str]:
    if not path.is_file():
        raise DataError(reference, "text file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(reference, "not a UTF-8 text file") from None
    documents = [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]
    if len(documents) < 2:
        raise DataError(reference, "needs at least two paragraphs (separated by a blank line) to split evaluation from calibration")
    return documents


def corpus_documents(data: str) -> list[str]:
    """Documents of a built-in corpus name or a `file:PATH` reference."""
    if data == "wikipedia":
        return wikipedia_articles()
    if data == "news":
        return news_articles()
    if data.startswith("file:"):
        return text_file_documents(Path(data.removeprefix("file:")).expanduser(), data)
    raise DataError(data, f"unknown text data; use one of {', '.join(BUILTIN_CORPORA)} or file:PATH")


def split_documents(documents: list[str], split: Split) -> list[str]:
    """First half of the characters for evaluation, the rest for calibration, cut at a document boundary."""
    total = sum(len(d) for d in documents)
    running, cut = 0, len(documents) - 1
    for index, document in enumerate(documents[:-1]):
        running += len(document)
        if running >= total / 2:
            cut = index + 1
            break
    return documents[:cut] if split is Split.EVALUATION else documents[cut:]


def split_text(data: str, split: Split) -> str:
    return "\n\n".join(split_documents(corpus_documents(data), split))


def token_slice(tokenizer, data: str, split: Split, tokens: int) -> list[int]:
    """The first `tokens` token ids of a split; tokenizes only as much text as it needs."""
    if tokens <= 0:
        raise DataError("tokens", f"must be positive, got {tokens}")
    text = split_text(data, split)
    chars = tokens * 6
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False, verbose=False)["input_ids"]
        # Drop the last few ids: a cut through a word may tokenize differently.
        if chars < len(text):
            ids = ids[:-8]
        if len(ids) >= tokens:
            return ids[:tokens]
        if chars >= len(text):
            raise DataError(data, f"the {split.value} split has only {len(ids)} tokens, {tokens} were asked for")
        chars *= 2


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after every text when it adds special tokens (a BOS; [CLS] and
    [SEP]): a model reads them in use, so windows cut from raw token slices must carry them too (a BOS
    model scored without its BOS reads perplexities several times too high)."""
    probe = "krunch"
    bare = tokenizer(probe, add_special_tokens=False, verbose=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True, verbose=False)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return list(full[:start]), list(full[start + len(bare) :])
    return [], []
