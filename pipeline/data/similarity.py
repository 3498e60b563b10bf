"""Human similarity judgements bundled with gensim: Lee-50 documents, WordSim353, SimLex-999."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from krunch.data.bundled import gensim_test_file


@dataclass(frozen=True)
class WordPairs:
    name: str
    first: list[str]
    second: list[str]
    scores: np.ndarray


def lee_documents() -> list[str]:
    """The 50 news documents of Lee et al. (2005), one per line."""
    lines = gensim_test_file("lee.cor").read_text(encoding="utf-8", errors="replace").splitlines()
    documents = [line.strip() for line in lines if line.strip()]
    if len(documents) != 50:
        raise ValueError(f"lee.cor should hold 50 documents, found {len(documents)}")
    return documents


def lee_human_similarity() -> np.ndarray:
    """50x50 mean human similarity in [0, 1]; the file holds the upper triangle, so symmetrise it."""
    matrix = np.loadtxt(gensim_test_file("similarities0-1.txt"))
    if matrix.shape != (50, 50):
        raise ValueError(f"similarities0-1.txt should be 50x50, found {matrix.shape}")
    upper = np.triu(matrix, 1)
    return upper + upper.T + np.eye(50)


def wordsim353() -> WordPairs:
    return _read_pairs("wordsim353.tsv", "wordsim353")


def simlex999() -> WordPairs:
    return _read_pairs("simlex999.txt", "simlex999")


def _read_pairs(filename: str, name: str) -> WordPairs:
    first, second, scores = [], [], []
    for line in gensim_test_file(filename).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        try:
            score = float(fields[2])
        except (IndexError, ValueError):
            continue  # header line
        first.append(fields[0].strip())
        second.append(fields[1].strip())
        scores.append(score)
    return WordPairs(name, first, second, np.asarray(scores))


def polarity_sentences() -> list[str]:
    """200 short review sentences (Pang & Lee), used as a fidelity probe set."""
    lines = gensim_test_file("pang_lee_polarity.cor").read_text(encoding="utf-8", errors="replace").splitlines()
    return [line.split(" ", 1)[1].strip() for line in lines if line.startswith("__label__") and " " in line]
