"""What the learned router sees of a prompt: cheap surface features and a small text vector.

Everything is computed locally from the prompt's characters: no network, no GPU and no
model call per request. The text vector is a hashed bag of words and word pairs,
tf-idf weighted and projected to a few dimensions learned from the training data; a
static embedding model (wordllama) reached the same grouped cross-validation figures on
the development data but spends more CPU tokenizing than the whole budget of a
classification, so it is not used.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer

HASH_FEATURES = 2**14  # the projection matrix (TEXT_DIMENSIONS x this) is the model's bulk
TEXT_DIMENSIONS = 16
# Long prompts are cut before featurising: the opening states the task, and a cap keeps
# a 100k-character request from costing more to route than to answer.
MAX_CHARS = 8_000

_CODE = re.compile(r"```|\bdef \w|\bclass \w|\bfunction\b|\breturn\b|#include|=>|;\s*$|\{\s*$", re.M)
_MATHS_SYMBOLS = re.compile(r"\d\s*[-+*/^=<>]\s*\d|\\frac|\\sqrt|\$[^$\n]+\$|[∑∫√π≤≥]")
_MATHS_WORDS = ("calculate", "compute", "solve", "probability", "integral", "derivative", "equation", "how many")
_NEGATIONS = ("not", "except", "false", "incorrect", "least")
# What each pattern needs to match at all: a substring test (in C) skips the regular
# expression, the slowest part of featurising, for most prompts.
_CODE_NEEDS = ("```", "def ", "class ", "function", "return", "#include", "=>", ";", "{")
_MATHS_NEEDS = (*"0123456789", "\\", "$", *"∑∫√π≤≥")
_DIGITS = "0123456789"
_SYMBOLS = "=+-*/^<>%$\\{}()[]"


def _words_pattern(words: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b")


_MATHS_WORDS_RE = _words_pattern(_MATHS_WORDS)
_NEGATIONS_RE = _words_pattern(_NEGATIONS)

CHEAP_FEATURES = (
    "log_chars", "log_words", "log_lines", "digit_share", "symbol_share",
    "maths", "code", "questions", "negations", "distinct_word_share",
)


def _count(pattern: re.Pattern[str], text: str, needs: tuple[str, ...]) -> int:
    return len(pattern.findall(text)) if any(n in text for n in needs) else 0


def cheap_features(text: str) -> list[float]:
    chars = len(text) or 1
    lowered = text.lower()
    words = lowered.split()
    digits = sum(map(text.count, _DIGITS))  # str.count per character: a pass in C each
    symbols = sum(map(text.count, _SYMBOLS))
    maths = _count(_MATHS_SYMBOLS, text, _MATHS_NEEDS) + _count(_MATHS_WORDS_RE, lowered, _MATHS_WORDS)
    return [
        math.log1p(len(text)),
        math.log1p(len(words)),
        math.log1p(text.count("\n")),
        digits / chars,
        symbols / chars,
        float(maths),
        float(_count(_CODE, text, _CODE_NEEDS)),
        float(text.count("?")),
        float(_count(_NEGATIONS_RE, lowered, _NEGATIONS)),
        len(set(words)) / len(words) if words else 0.0,
    ]


def _hasher() -> HashingVectorizer:
    return HashingVectorizer(
        n_features=HASH_FEATURES, ngram_range=(1, 2), alternate_sign=False, norm=None, dtype=np.float32
    )


@dataclass
class Featurizer:
    """Fitted on training prompts; turns prompts (and agent types) into one matrix."""

    tfidf: TfidfTransformer
    projection: TruncatedSVD
    agent_types: tuple[str, ...]  # one indicator column each, in this order

    @classmethod
    def fit(cls, texts: Sequence[str], agent_types: Sequence[str | None], seed: int = 0) -> Featurizer:
        counts = _hasher().transform([t[:MAX_CHARS] for t in texts])
        tfidf = TfidfTransformer(sublinear_tf=True).fit(counts)
        dims = max(1, min(TEXT_DIMENSIONS, counts.shape[0] - 1, counts.shape[1] - 1))
        projection = TruncatedSVD(dims, random_state=seed).fit(tfidf.transform(counts))
        known = tuple(sorted({a for a in agent_types if a is not None}))
        return cls(tfidf, projection, known)

    @property
    def names(self) -> list[str]:
        text = [f"text_{i}" for i in range(self.projection.n_components)]
        return [*CHEAP_FEATURES, *text, *(f"agent_type={a}" for a in self.agent_types)]

    def transform(self, texts: Sequence[str], agent_types: Sequence[str | None]) -> np.ndarray:
        cut = [t[:MAX_CHARS] for t in texts]
        text = self.projection.transform(self.tfidf.transform(_hasher().transform(cut)))
        cheap = np.array([cheap_features(t) for t in cut], dtype=np.float64).reshape(len(cut), -1)
        columns = [cheap, text]
        if self.agent_types:
            index = {a: i for i, a in enumerate(self.agent_types)}
            onehot = np.zeros((len(cut), len(self.agent_types)))
            for row, agent_type in enumerate(agent_types):
                if agent_type in index:
                    onehot[row, index[agent_type]] = 1.0
            columns.append(onehot)
        return np.hstack(columns)
