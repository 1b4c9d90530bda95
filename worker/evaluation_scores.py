"""How close an answer is to the reference answer: the evaluation report's reference scores.

    exact_match  1.0 when the answers are equal after `normalize` (lower case, no punctuation, no
                 articles, single spaces: SQuAD's normalisation), else 0.0
    token_f1     F1 of the normalised answers' words (SQuAD's token F1)
    rouge_l      ROUGE-L F-measure (longest common subsequence of words), from `rouge-score`

Plain functions of two strings; `worker/evaluation.py` scores every answered held-out prompt with
them and averages them into the report's figures.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache
from typing import Any

SCORES = ("exact_match", "token_f1", "rouge_l")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def exact_match(answer: str, reference: str) -> float:
    return float(normalize(answer) == normalize(reference))


def token_f1(answer: str, reference: str) -> float:
    said, wanted = normalize(answer).split(), normalize(reference).split()
    if not said or not wanted:
        return float(said == wanted)
    common = sum((Counter(said) & Counter(wanted)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(said), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1)
def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(answer: str, reference: str) -> float:
    return float(_rouge().score(reference, answer)["rougeL"].fmeasure)


def score(answer: str, reference: str) -> dict[str, float]:
    """Every reference score of one answer."""
    return {
        "exact_match": exact_match(answer, reference),
        "token_f1": token_f1(answer, reference),
        "rouge_l": rouge_l(answer, reference),
    }
