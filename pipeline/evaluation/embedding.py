"""Sentence-embedding quality: agreement with human similarity judgements, and fidelity to a reference."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr

from krunch.data.similarity import lee_documents, lee_human_similarity, polarity_sentences, simlex999, wordsim353
from krunch.errors import KrunchError
from krunch.evaluation.tasks import EvalOptions, Metrics, Task, evaluator
from krunch.evaluation.timing import timed_batches
from krunch.model import LoadedModel, ModelKind

MAX_SEQUENCE_LENGTH = 256  # what sentence-transformers uses for all-MiniLM-L6-v2


def encode(model: LoadedModel, texts: list[str], batch_size: int = 16) -> tuple[torch.Tensor, dict]:
    """Attention-masked mean of the last hidden state, L2-normalised (sentence-transformers pooling)."""
    if model.tokenizer is None:
        raise KrunchError(model.reference, "the embedding task needs a tokenizer; load the model from a HF directory")
    batches = [
        model.tokenizer(
            texts[i : i + batch_size], padding=True, truncation=True, max_length=MAX_SEQUENCE_LENGTH, return_tensors="pt"
        )
        for i in range(0, len(texts), batch_size)
    ]

    def embed(batch) -> torch.Tensor:
        hidden = model.module(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)

    outputs, timing = timed_batches(embed, batches, [len(b["input_ids"]) for b in batches])
    return torch.cat(outputs), timing


def upper_triangle(matrix: np.ndarray) -> np.ndarray:
    return matrix[np.triu_indices(matrix.shape[0], k=1)]


def lee50_pearson(lee_embeddings: torch.Tensor) -> float:
    """Pearson correlation of the 50 documents' pairwise cosines with the mean human judgements."""
    cosine = (lee_embeddings @ lee_embeddings.T).numpy()
    return round(float(pearsonr(upper_triangle(cosine), upper_triangle(lee_human_similarity()))[0]), 4)


@evaluator(Task.EMBEDDING, ModelKind.SENTENCE_EMBEDDING, needs_reference=True)
def embedding_quality(model: LoadedModel, options: EvalOptions, reference: LoadedModel | None) -> Metrics:
    """Lee-50 always uses all 50 documents; `items` caps the word pairs and the fidelity probe sentences."""
    documents = lee_documents()
    lee, timing = encode(model, documents, options.batch_size)
    metrics: Metrics = {"lee50_pearson": lee50_pearson(lee)}
    for pairs in (wordsim353(), simlex999()):
        count = options.items or len(pairs.scores)
        first, _ = encode(model, pairs.first[:count], 64)
        second, _ = encode(model, pairs.second[:count], 64)
        similarity = (first * second).sum(-1).numpy()
        metrics[f"{pairs.name}_spearman"] = round(float(spearmanr(similarity, pairs.scores[:count])[0]), 4)

    if reference is not None:
        probe = documents + polarity_sentences()[: options.items]
        mine = torch.cat([lee, encode(model, probe[len(documents) :], options.batch_size)[0]])
        theirs, _ = encode(reference, probe, options.batch_size)
        fidelity = (mine * theirs).sum(-1)
        metrics["fidelity_mean_cosine"] = round(float(fidelity.mean()), 6)
        metrics["fidelity_min_cosine"] = round(float(fidelity.min()), 6)
        metrics["reference"] = "self" if reference is model else reference.reference
    metrics.update(documents_per_s=timing["items_per_s"], threads=timing["threads"])
    return metrics
