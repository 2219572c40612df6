"""Scores of generated answers against references, and of multiple-choice picks.

Contract: every function takes parallel lists (one prediction per reference) and returns a dict of named numbers.

* ``exact_match``: :func:`normalize_answer` on both sides (lower case, punctuation and the articles a / an / the
  removed, whitespace collapsed, the SQuAD convention); ``exact_match`` is the share of predictions equal to a
  reference, ``contains`` the share that contain a reference (a looser reading for models that answer in
  sentences). A reference may be a list of acceptable answers: any one of them counts.
* ``bleu`` and ``chrf``: corpus-level sacrebleu scores (0..100), with the first reference of each row.
* ``rouge``: mean F-measure of rouge1, rouge2 and rougeL (rouge-score, Porter stemming; 0..1), the best over a
  row's references.
* ``accuracy``: :func:`choice_accuracy` turns per-choice log-likelihoods into ``accuracy`` (highest total
  log-likelihood) and ``accuracy_norm`` (highest log-likelihood per character of the choice).

sacrebleu and rouge-score are imported when first used; without them the error says which extra to install
(``pip install 'llmos[eval]'``).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence
from typing import Any

from llmos.errors import BackendUnavailableError, InvalidInputError

Reference = str | Sequence[str]
GENERATION_METRICS = ("bleu", "chrf", "rouge", "exact_match")
METRICS = (*GENERATION_METRICS, "accuracy")
METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "bleu": ("bleu",),
    "chrf": ("chrf",),
    "rouge": ("rouge1", "rouge2", "rougeL"),
    "exact_match": ("exact_match", "contains"),
    "accuracy": ("accuracy", "accuracy_norm"),
}
"""The numbers each metric reports (besides ``samples``)."""

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation + "‘’“”…–—")


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and the articles a / an / the, collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _references(reference: Reference) -> list[str]:
    return [reference] if isinstance(reference, str) else [str(r) for r in reference]


def _check_lengths(predictions: Sequence[str], references: Sequence[Reference]) -> None:
    if len(predictions) != len(references):
        raise InvalidInputError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise InvalidInputError("there is nothing to score (no rows)")


def is_exact_match(prediction: str, reference: Reference) -> bool:
    answer = normalize_answer(prediction)
    return any(answer == normalize_answer(r) for r in _references(reference))


def contains_answer(prediction: str, reference: Reference) -> bool:
    """Whether a (normalized, non-empty) reference occurs in the normalized prediction, on word boundaries."""
    answer = f" {normalize_answer(prediction)} "
    return any(
        bool(normalized) and f" {normalized} " in answer
        for normalized in (normalize_answer(r) for r in _references(reference))
    )


def exact_match(predictions: Sequence[str], references: Sequence[Reference]) -> dict[str, float]:
    _check_lengths(predictions, references)
    n = len(predictions)
    return {
        "exact_match": sum(is_exact_match(p, r) for p, r in zip(predictions, references, strict=True)) / n,
        "contains": sum(contains_answer(p, r) for p, r in zip(predictions, references, strict=True)) / n,
    }


def _sacrebleu() -> Any:
    try:
        import sacrebleu
    except ImportError as exc:
        raise BackendUnavailableError("BLEU and chrF need sacrebleu: pip install 'llmos[eval]'") from exc
    return sacrebleu


def bleu(predictions: Sequence[str], references: Sequence[Reference]) -> dict[str, float]:
    _check_lengths(predictions, references)
    firsts = [_references(r)[0] if _references(r) else "" for r in references]
    return {"bleu": float(_sacrebleu().corpus_bleu(list(predictions), [firsts]).score)}


def chrf(predictions: Sequence[str], references: Sequence[Reference]) -> dict[str, float]:
    _check_lengths(predictions, references)
    firsts = [_references(r)[0] if _references(r) else "" for r in references]
    return {"chrf": float(_sacrebleu().corpus_chrf(list(predictions), [firsts]).score)}


def rouge(predictions: Sequence[str], references: Sequence[Reference]) -> dict[str, float]:
    _check_lengths(predictions, references)
    try:
        from rouge_score import rouge_scorer
    except ImportError as exc:
        raise BackendUnavailableError("ROUGE needs rouge-score: pip install 'llmos[eval]'") from exc
    keys = METRIC_KEYS["rouge"]
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    totals = dict.fromkeys(keys, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        refs = _references(reference) or [""]
        scores = scorer.score_multi(refs, prediction) if len(refs) > 1 else scorer.score(refs[0], prediction)
        for key in keys:
            totals[key] += float(scores[key].fmeasure)
    return {key: value / len(predictions) for key, value in totals.items()}


def choice_accuracy(
    scores: Sequence[Sequence[float]], choices: Sequence[Sequence[str]], answers: Sequence[int]
) -> dict[str, float]:
    """``scores[i][j]``: total log-likelihood of choice j of question i; ``answers[i]``: the right choice's index."""
    if not (len(scores) == len(choices) == len(answers)):
        raise InvalidInputError("scores, choices and answers must have one entry per question")
    if not scores:
        raise InvalidInputError("there is nothing to score (no rows)")
    right = right_norm = 0
    for row, texts, answer in zip(scores, choices, answers, strict=True):
        best = max(range(len(row)), key=lambda j: row[j])
        best_norm = max(range(len(row)), key=lambda j: row[j] / max(1, len(texts[j])))
        right += best == answer
        right_norm += best_norm == answer
    return {"accuracy": right / len(scores), "accuracy_norm": right_norm / len(scores)}


SCORERS: dict[str, Callable[[Sequence[str], Sequence[Reference]], dict[str, float]]] = {
    "bleu": bleu,
    "chrf": chrf,
    "rouge": rouge,
    "exact_match": exact_match,
}


def score_generations(metric: str, predictions: Sequence[str], references: Sequence[Reference]) -> dict[str, float]:
    scorer = SCORERS.get(metric)
    if scorer is None:
        raise InvalidInputError(
            f"unknown generation metric {metric!r}; metrics: {', '.join(GENERATION_METRICS)}", param="metric"
        )
    return scorer(predictions, references)


def require(metric: str) -> None:
    """Fail early (before a model loads) when the library a metric needs is not installed."""
    if metric in ("bleu", "chrf"):
        _sacrebleu()
    elif metric == "rouge":
        try:
            import rouge_score  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailableError("ROUGE needs rouge-score: pip install 'llmos[eval]'") from exc
