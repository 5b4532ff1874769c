"""nltk's BLEU from one counting pass equals nltk's own `sentence_bleu` / `corpus_bleu`, offline."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alphadrive_ray.evaluation.nltk_bleu import EPSILON, NltkBleu, bleu_agreement, compute_nltk_bleu

# (references, hypothesis, expected smoothed sentence BLEU-4); each case says why
CASES = [
    # identical sentences: every precision 1, no brevity penalty
    ([["the", "light", "is", "red"]], ["the", "light", "is", "red"], 1.0),
    # nothing in common: 0 (no unigram match), smoothing does not apply
    ([["a", "b", "c", "d"]], ["w", "x", "y", "z"], 0.0),
    # empty hypothesis (no <think>): 0
    ([["a", "b", "c", "d"]], [], 0.0),
    # 3 of 4 unigrams, 2/3 bigrams, 1/2 trigrams, no 4-gram (0 of 1 -> EPSILON / 1)
    ([["a", "b", "c", "d"]], ["a", "b", "c", "x"], (3 / 4 * 2 / 3 * 1 / 2 * EPSILON / 1) ** 0.25),
]


@pytest.mark.parametrize("refs, hyp, expected", CASES)
def test_sentence_bleu_cases(refs, hyp, expected):
    assert compute_nltk_bleu([refs], [hyp]).sentence == [pytest.approx(expected, rel=1e-12, abs=1e-15)]


tokens = st.lists(st.sampled_from("a b c d e f".split()), max_size=10)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(tokens, min_size=1, max_size=3), tokens), min_size=1, max_size=20))
def test_equals_nltk_sentence_and_corpus_bleu(pairs):
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu, sentence_bleu

    references = [refs for refs, _ in pairs]
    hypotheses = [hyp for _, hyp in pairs]
    result = compute_nltk_bleu(references, hypotheses)
    smooth = SmoothingFunction(epsilon=EPSILON).method1
    assert result.sentence == [sentence_bleu(r, h, smoothing_function=smooth) for r, h in pairs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert result.corpus == corpus_bleu(references, hypotheses)
        # the comparable part: hypotheses of at least 4 tokens, and a match at every order
        keep = [i for i, h in enumerate(hypotheses) if len(h) >= 4]
        assert result.comparable == keep
        if result.comparable_corpus is not None:
            assert result.comparable_corpus == corpus_bleu([references[i] for i in keep], [hypotheses[i] for i in keep])


def test_no_samples():
    assert compute_nltk_bleu([], []) == NltkBleu()
    with pytest.raises(ValueError):
        compute_nltk_bleu([[["a"]]], [])


def test_agreement_check():
    assert bleu_agreement(0.25, 0.25 + 1e-9, 10)["agree"] is True
    assert bleu_agreement(0.25, 0.26, 10) == {"n": 10, "nltk": 0.25, "pycocoevalcap": 0.26, "abs_diff": pytest.approx(0.01), "agree": False}
    assert bleu_agreement(None, 0.3, 0)["agree"] is None  # nothing to compare: neither agrees nor not


def test_works_offline_without_nltk_data_and_without_scipy(tmp_path):
    # No nltk_data anywhere (downloads fail offline), no network: BLEU needs neither. nltk is
    # imported without pulling scipy / scikit-learn, which stay importable afterwards.
    code = (
        "import sys\n"
        "from alphadrive_ray.evaluation.nltk_bleu import compute_nltk_bleu\n"
        "r = compute_nltk_bleu([[['a', 'red', 'light', 'ahead']]], [['a', 'red', 'light', 'ahead']])\n"
        "assert r.sentence == [1.0] and r.corpus == 1.0, r\n"
        "assert 'scipy' not in sys.modules and 'sklearn' not in sys.modules\n"
        "import scipy.stats, sklearn\n"
        "print('ok')\n"
    )
    env = {**os.environ, "NLTK_DATA": str(tmp_path / "none"), "HOME": str(tmp_path), "no_proxy": "*", "https_proxy": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_missing_nltk_is_a_clear_error(tmp_path):
    # an interpreter where nltk cannot be imported: a UserError naming it, not an ImportError
    code = (
        "import sys; sys.modules['nltk'] = None\n"
        "from alphadrive_ray.errors import UserError\n"
        "from alphadrive_ray.evaluation.nltk_bleu import compute_nltk_bleu\n"
        "try:\n"
        "    compute_nltk_bleu([[['a']]], [['a']])\n"
        "except UserError as exc:\n"
        "    print(exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "nltk is not installed" in proc.stdout, proc.stdout + proc.stderr
