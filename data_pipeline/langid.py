"""Language identification with py3langid (langid.py's model, shipped inside the wheel; nothing downloads).

    from data_pipeline.langid import LanguageFilter
    lf = LanguageFilter(keep=("en",), min_prob=0.5)
    lang, prob, keep = lf.classify(text)

CCNet/Llama use fastText ``lid.176``; that model is a separate 126 MB download, which this project does not
allow at run time, so we use langid.py's naive-Bayes model (97 languages) with normalised probabilities.
Only the first ``max_chars`` characters are classified (the cost is linear in length; a web page's
language is settled long before 2,000 characters). Deterministic: no sampling anywhere.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


class LanguageFilter:
    """Keep documents whose most likely language is in ``keep`` with probability ``>= min_prob``."""

    def __init__(self, *, keep: tuple[str, ...] = ("en",), min_prob: float = 0.5, max_chars: int = 2000) -> None:
        self.keep = tuple(keep)
        self.min_prob = min_prob
        self.max_chars = max_chars

    def classify(self, text: str) -> tuple[str, float, bool]:
        lang, prob = _identifier().classify(text[: self.max_chars])
        prob = float(prob)
        return lang, prob, (lang in self.keep and prob >= self.min_prob)
