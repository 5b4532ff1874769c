"""nltk's BLEU on the tokens pycocoevalcap scores: a per-sample score and a cross-check.

Two uses, both offline (nltk's BLEU needs no nltk_data resource):

- `sentence_bleu` of every sample, so that scenes can be sorted by how close their reasoning
  is to the reference. Smoothing: nltk's `SmoothingFunction().method1` (Chen & Cherry 2014,
  method 1): an n-gram order without any match counts `epsilon = 0.1` matches instead of 0,
  so a sentence that shares no 4-gram with its reference gets a small score that still ranks
  it by its unigram to trigram matches, instead of 0. (pycocoevalcap's per-sample BLEU-4 is
  unsmoothed: such a sentence gets about 1e-5 to 1e-9, whatever else it matches.)
- `corpus_bleu` (unsmoothed, nltk's defaults) next to pycocoevalcap's corpus BLEU-4 on the same
  PTB tokens: two independent implementations that must agree (`bleu_agreement`). They agree
  to about 1e-12 where both define the same thing; they differ (1) for a hypothesis shorter
  than 4 tokens, where nltk counts one n-gram of each missing order (its guard against dividing
  by zero) and pycocoevalcap none, and (2) for an order without any match in the corpus, where
  nltk gives 0 and pycocoevalcap a value near 1e-4 from its 1e-15 guard. The check therefore
  compares the two over the samples whose hypothesis has at least 4 tokens, when every order
  has a match there (`NltkBleu.comparable_corpus`).

Both come from one pass of nltk's `modified_precision` per sample (the costly part), combined
exactly as nltk's `sentence_bleu` and `corpus_bleu` combine them; the tests check equality
with those two functions.

    from alphadrive_ray.evaluation.nltk_bleu import compute_nltk_bleu
    result = compute_nltk_bleu([[["a", "red", "light"]]], [["a", "red", "light"]])
    result.sentence, result.corpus
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

from alphadrive_ray.errors import UserError

WEIGHTS = (0.25, 0.25, 0.25, 0.25)  # BLEU-4
EPSILON = 0.1  # method1's count for an n-gram order without a match (nltk's default)
BLEU_AGREEMENT_TOL = 1e-6  # |nltk corpus BLEU-4 - pycocoevalcap BLEU-4| allowed on the same tokens

# Imported by nltk's package __init__ when installed, for parts BLEU does not use (collocation
# tests, classifier wrappers); they take seconds to import, more than BLEU of 10k samples.
_HEAVY_OPTIONAL = ("scipy", "sklearn")


def bleu_score_module() -> Any:
    """`nltk.translate.bleu_score`, imported without scipy / scikit-learn where they are not loaded yet.

    nltk imports both only when they are importable (`try: ... except ImportError`), so they
    are hidden during its first import; should a later nltk require them, it is imported as usual.
    """
    module = sys.modules.get("nltk.translate.bleu_score")
    if module is not None:
        return module
    hidden = [name for name in _HEAVY_OPTIONAL if name not in sys.modules]
    try:
        with _hidden(hidden):
            from nltk.translate import bleu_score
        return bleu_score
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == "nltk":
            raise UserError("nltk is not installed; reinstall alphadrive-ray (`pip install -e .`) to get it") from None
    except ImportError:
        pass
    for name in [n for n in sys.modules if n == "nltk" or n.startswith("nltk.")]:
        del sys.modules[name]
    from nltk.translate import bleu_score

    return bleu_score


@contextlib.contextmanager
def _hidden(names: Sequence[str]):
    """`import name` raises ImportError inside the block (a None entry in sys.modules)."""
    for name in names:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in names:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


@dataclass
class NltkBleu:
    sentence: list[float] = field(default_factory=list)  # smoothed sentence BLEU-4 of each sample
    corpus: float | None = None  # nltk's corpus BLEU-4 of all samples (None: no sample)
    comparable: list[int] = field(default_factory=list)  # samples whose hypothesis has >= 4 tokens
    # nltk's corpus BLEU-4 of those; None when there are none or an order has no match there
    comparable_corpus: float | None = None


def compute_nltk_bleu(references: Sequence[Sequence[Sequence[str]]], hypotheses: Sequence[Sequence[str]]) -> NltkBleu:
    """nltk's BLEU-4 of tokenised pairs: `references[i]` are the references of `hypotheses[i]`.

    `sentence` equals `[sentence_bleu(r, h, smoothing_function=SmoothingFunction(epsilon=EPSILON).method1)
    ...]` and `corpus` equals `corpus_bleu(references, hypotheses)` of nltk.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        return NltkBleu()
    bleu = bleu_score_module()
    smooth = bleu.SmoothingFunction(epsilon=EPSILON).method1
    orders = range(1, len(WEIGHTS) + 1)
    out = NltkBleu()
    totals = _Totals()
    comparable = _Totals()
    for i, (sample_refs, sample_hyp) in enumerate(zip(references, hypotheses)):
        refs, hyp = [list(r) for r in sample_refs], list(sample_hyp)
        precisions = [bleu.modified_precision(refs, hyp, n) for n in orders]
        hyp_len = len(hyp)
        ref_len = bleu.closest_ref_length(refs, hyp_len)
        out.sentence.append(_combine(bleu, precisions, ref_len, hyp_len, smooth, refs, hyp))
        totals.add(precisions, ref_len, hyp_len)
        if hyp_len >= len(WEIGHTS):
            out.comparable.append(i)
            comparable.add(precisions, ref_len, hyp_len)
    out.corpus = totals.bleu(bleu, refs, hyp)
    if out.comparable and all(comparable.numerators):
        out.comparable_corpus = comparable.bleu(bleu, refs, hyp)
    return out


class _Totals:
    """The sums nltk's `corpus_bleu` keeps: clipped matches and n-gram counts per order, lengths."""

    def __init__(self) -> None:
        self.numerators = [0] * len(WEIGHTS)
        self.denominators = [0] * len(WEIGHTS)
        self.hyp_len = self.ref_len = 0

    def add(self, precisions: list, ref_len: int, hyp_len: int) -> None:
        for k, p in enumerate(precisions):
            self.numerators[k] += p.numerator
            self.denominators[k] += p.denominator
        self.hyp_len += hyp_len
        self.ref_len += ref_len

    def bleu(self, bleu: Any, refs: list, hyp: list) -> float:
        # unreduced, as nltk's corpus_bleu keeps them, through nltk's own Fraction (the standard
        # library's dropped `_normalize` in Python 3.12; nltk's subclass keeps it on every version)
        precisions = [bleu.Fraction(n, d, _normalize=False) for n, d in zip(self.numerators, self.denominators)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # method0 warns about an order without a match
            return _combine(bleu, precisions, self.ref_len, self.hyp_len, bleu.SmoothingFunction().method0, refs, hyp)


def _combine(bleu: Any, precisions: list, ref_len: int, hyp_len: int, smooth, refs, hyp) -> float:
    """nltk's `corpus_bleu` after its counting loop (BLEU-4 weights, no re-weighting)."""
    bp = bleu.brevity_penalty(ref_len, hyp_len)
    if precisions[0].numerator == 0:
        return 0.0
    p_n = smooth(precisions, references=refs, hypothesis=hyp, hyp_len=hyp_len)
    return bp * math.exp(math.fsum(w * math.log(p) for w, p in zip(WEIGHTS, p_n) if p > 0))


def bleu_agreement(nltk_bleu4: float | None, coco_bleu4: float | None, n: int) -> dict[str, Any]:
    """The cross-check of two corpus BLEU-4 values over the same `n` samples.

    {"n", "nltk", "pycocoevalcap", "abs_diff", "agree"}; `agree` is None when there is nothing to compare.
    """
    if nltk_bleu4 is None or coco_bleu4 is None:
        return {"n": n, "nltk": nltk_bleu4, "pycocoevalcap": coco_bleu4, "abs_diff": None, "agree": None}
    diff = abs(nltk_bleu4 - coco_bleu4)
    return {"n": n, "nltk": nltk_bleu4, "pycocoevalcap": coco_bleu4, "abs_diff": diff, "agree": diff <= BLEU_AGREEMENT_TOL}
