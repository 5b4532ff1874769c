"""Reasoning metrics equal pycocoevalcap run directly; sanitising keeps the JVM tools in step."""

from __future__ import annotations

import re
import unicodedata

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from alphadrive_ray.errors import UserError
from alphadrive_ray.evaluation.captions import compute_caption_metrics, sanitize_caption

# A hang (a line break reaching METEOR) fails the module instead of blocking the test run.
pytestmark = pytest.mark.timeout(180)

# A fixed set of (hypothesis, reference) pairs, including the awkward ones: punctuation and
# case (the tokenizer removes / lowers them), an empty hypothesis (no <think>), unicode, and
# line breaks of every kind, which must not shift the tokenizer's lines or hang METEOR.
PAIRS = [
    ("The light ahead is red, so I stop.", "The traffic light is red, so the ego vehicle stops."),
    ("A pedestrian is crossing; I slow down and keep the lane.", "Pedestrians are crossing ahead, so I decelerate."),
    ("Road is clear -- accelerate!", "The road ahead is clear and the navigation says go straight, so I speed up."),
    ("", "The lead car brakes, so I slow down."),  # no reasoning produced
    ("turn left at the intersection", "Turn left at the intersection as navigation requires."),
    ("The lane merges\nfrom the right,\r\nso I keep my speed.", "A car merges from the right; I keep my speed."),  # newlines
    ("Cyclist\u2028ahead\u0085slow\x0cdown\x0bnow", "A cyclist is ahead, so I slow down."),  # exotic line breaks
    ("Café crossing, piétons: ralentir", "Pedestrians at the café crossing, slow down."),  # non-ASCII
    ("I ||| keep ||||| going", "Keep going straight ||| at constant speed."),  # METEOR's field separator
    ("Stop. Stop. Stop.", "Stop because the light is red."),
] + [(f"The vehicle ahead is slowing down number {i}, so I decelerate.", f"Vehicle {i} ahead slows, so I decelerate.") for i in range(20)]


def _direct_pycocoevalcap(hypotheses, references):
    """The COCO caption evaluation recipe, straight from pycocoevalcap."""
    gts = {i: [{"caption": ref}] for i, ref in enumerate(references)}
    res = {i: [{"caption": hyp}] for i, hyp in enumerate(hypotheses)}
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    bleu, bleu_scores = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_scores = Cider().compute_score(gts, res)
    meteor_scorer = Meteor()
    try:
        meteor, meteor_scores = meteor_scorer.compute_score(gts, res)
    finally:
        meteor_scorer.meteor_p.kill()
    return {"bleu4": bleu[3], "cider": cider, "meteor": meteor}, {
        "bleu4": list(bleu_scores[3]),
        "cider": list(cider_scores),
        "meteor": list(meteor_scores),
    }


@pytest.fixture(scope="module")
def ours():
    return compute_caption_metrics([h for h, _ in PAIRS], [[r] for _, r in PAIRS])


@pytest.fixture(scope="module")
def direct():
    # The same pairs, sanitised as the caller does; pycocoevalcap itself does the rest.
    # (Sequential on purpose: two METEOR JVMs loading side by side on 2 cores are slower.)
    return _direct_pycocoevalcap([sanitize_caption(h) for h, _ in PAIRS], [sanitize_caption(r) for _, r in PAIRS])


def test_scores_are_sane(ours):
    assert 0.0 < ours["bleu4"] < 1.0 and 0.0 < ours["meteor"] < 1.0 and ours["cider"] > 0.0
    meteor = ours["per_sample"]["meteor"]
    assert meteor[3] == 0.0  # the empty hypothesis scores 0
    assert meteor[5] > 0.4 and meteor[6] > 0.3  # captions with line breaks are scored whole
    # Unsanitised, the line breaks of pairs 5 and 6 would shift every later hypothesis onto
    # the next reference: the 20 templated pairs at the end only score well when aligned.
    assert min(meteor[10:]) > 0.3


@pytest.mark.parametrize("name", ["bleu4", "cider", "meteor"])
def test_scores_equal_pycocoevalcap(ours, direct, name):
    corpus, per_sample = direct
    assert ours["n"] == len(PAIRS)
    assert ours[name] == pytest.approx(corpus[name], rel=1e-12, abs=1e-15)
    assert ours["per_sample"][name] == pytest.approx(per_sample[name], rel=1e-12, abs=1e-15)


def test_unsanitised_line_breaks_shift_the_tokenizer():
    # Why sanitising matters: a carriage return splits one caption into two output lines and
    # every later caption is silently paired with the wrong text.
    out = PTBTokenizer().tokenize({0: [{"caption": "one\rtwo"}], 1: [{"caption": "three"}]})
    assert out[1] == ["two"]
    assert sanitize_caption("one\rtwo") == "one two"


SANITIZE_CASES = [
    # (text, expected)
    ("a\nb", "a b"),  # newline
    ("a\r\nb", "a  b"),  # CRLF: two spaces (the tokenizer collapses them)
    ("a\u2028b\u2029c\x85d", "a b c d"),  # unicode line / paragraph separators, NEL
    ("a\tb\x00c\x7fd", "a b c d"),  # other controls
    ("x|||y", "xy"),  # METEOR separator
    ("|||||", "||"),  # a run keeps fewer than three
    ("|\ud800||", ""),  # a lone surrogate is dropped before the separator check
    ("Café 日本 🚗 a\u00a0b", "Café 日本 🚗 a\u00a0b"),  # everything else is untouched
]


@pytest.mark.parametrize("text, expected", SANITIZE_CASES)
def test_sanitize_caption(text, expected):
    assert sanitize_caption(text) == expected


def test_sanitize_covers_exactly_the_control_and_separator_categories():
    for cp in range(0x110000):
        char = chr(cp)
        category = unicodedata.category(char)
        out = sanitize_caption(char)
        if category in ("Cc", "Zl", "Zp"):
            assert out == " ", hex(cp)
        elif category == "Cs":
            assert out == "", hex(cp)
        else:
            assert out == char, hex(cp)


def test_sanitised_captions_keep_the_tokenizer_aligned_for_every_code_point():
    # One caption per code point (all planes but surrogates): each must come back on its own line.
    code_points = [cp for cp in range(0x30000) if not 0xD800 <= cp < 0xE000] + [0xE0001, 0xF0000, 0x10FFFD]
    captions = {cp: [{"caption": sanitize_caption(f"qqq {chr(cp)} zzz")}] for cp in code_points}
    out = PTBTokenizer().tokenize(captions)
    assert len(out) == len(code_points)
    bad = [hex(cp) for cp in code_points if not re.fullmatch(r"qqq .*zzz|qqq zzz", out[cp][0])]
    assert bad == []


def test_no_pairs_start_no_jvm():
    assert compute_caption_metrics([], []) == {
        "n": 0,
        "bleu4": None,
        "cider": None,
        "meteor": None,
        "bleu4_nltk": None,
        "bleu4_check": {"n": 0, "nltk": None, "pycocoevalcap": None, "abs_diff": None, "agree": None},
        "per_sample": {"bleu4": [], "cider": [], "meteor": [], "sentence_bleu": []},
        "failures": {},
    }


def test_nltk_corpus_bleu_agrees_with_pycocoevalcap(ours):
    # two implementations of corpus BLEU-4 on the same PTB tokens, over the hypotheses of at
    # least 4 tokens (below that nltk counts a phantom n-gram: its corpus value over all pairs,
    # which include an empty and a 3-token hypothesis, is not pycocoevalcap's)
    check = ours["bleu4_check"]
    assert check["agree"] is True and check["abs_diff"] < 1e-12
    assert 0 < check["n"] < len(PAIRS) and check["nltk"] > 0.05
    assert ours["bleu4_nltk"] != pytest.approx(ours["bleu4"], abs=1e-6)
    sentence = ours["per_sample"]["sentence_bleu"]
    assert len(sentence) == len(PAIRS) and sentence[3] == 0.0  # the empty hypothesis
    assert all(0.0 <= x <= 1.0 for x in sentence)


def test_several_references_score_as_pycocoevalcap_does():
    # both sides go through one PTB tokenizer JVM: captions of different ids and several
    # references per id must come back in their places
    hypotheses = ["The light is red, so I stop.", "", "Keep going straight on the clear road."]
    references = [
        ["The traffic light is red; the car stops.", "Red light ahead: stop."],
        ["A pedestrian crosses, so I slow down.", "Slow down\nfor the pedestrian.", "Pedestrian ahead."],
        ["The road is clear, keep straight.", "Go straight."],
    ]
    ours = compute_caption_metrics(hypotheses, references)
    gts = {i: [{"caption": sanitize_caption(r)} for r in refs] for i, refs in enumerate(references)}
    res = {i: [{"caption": sanitize_caption(h)}] for i, h in enumerate(hypotheses)}
    gts, res = PTBTokenizer().tokenize(gts), PTBTokenizer().tokenize(res)
    bleu, bleu_scores = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_scores = Cider().compute_score(gts, res)
    meteor = Meteor()
    try:
        meteor_score, meteor_scores = meteor.compute_score(gts, res)
    finally:
        meteor.meteor_p.kill()
    assert (ours["bleu4"], ours["cider"], ours["meteor"]) == (bleu[3], cider, meteor_score)
    assert ours["per_sample"]["bleu4"] == list(bleu_scores[3]) and ours["per_sample"]["cider"] == list(cider_scores)
    assert ours["per_sample"]["meteor"] == list(meteor_scores)


def test_a_prestarted_meteor_is_used_then_closed():
    from alphadrive_ray.evaluation import captions

    with captions.prestarted_meteor():
        (scorer,) = captions._prestarted
        assert scorer.meteor_p.poll() is None
        result = compute_caption_metrics(["a red light"], [["a red light"]])
        assert captions._prestarted == [] and scorer.meteor_p.poll() is not None  # taken, used, closed
    assert result["meteor"] == pytest.approx(1.0, abs=0.01)
    with captions.prestarted_meteor():
        (unused,) = captions._prestarted
    assert captions._prestarted == [] and unused.meteor_p.poll() is not None  # never taken: closed at exit
    with captions.prestarted_meteor(enabled=False):
        assert captions._prestarted == []


def test_missing_java_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no `java` anywhere
    with pytest.raises(UserError, match="need Java.*--no-reasoning-metrics"):
        compute_caption_metrics(["a b"], [["a b"]])


@pytest.mark.timeout(60)
def test_meteor_watchdog_stops_a_silent_jvm():
    # With a zero budget METEOR cannot have answered: the JVM is stopped instead of waiting
    # forever, METEOR has no score and says why, and the other scores are kept.
    out = compute_caption_metrics(["a b c d e"], [["a b c d e"]], meteor_timeout_s=0.0)
    assert out["meteor"] is None and out["per_sample"]["meteor"] == [None]
    assert out["failures"] == {"meteor": "did not answer within 0 s; its JVM was stopped"}
    assert out["bleu4"] == pytest.approx(1.0) and out["cider"] is not None


def test_a_dead_meteor_jvm_keeps_the_other_scores(monkeypatch):
    # The JVM dies before it scores (what happened on 10k-word outputs): a one-line reason
    from alphadrive_ray.evaluation import captions

    start = captions._start_meteor

    def dying():
        meteor = start()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
        return meteor

    monkeypatch.setattr(captions, "_start_meteor", dying)
    out = compute_caption_metrics(["the light is red", "go on"], [["the light is red"], ["go on now"]])
    assert out["meteor"] is None and set(out["failures"]) == {"meteor"}
    assert "Error" in out["failures"]["meteor"] and "\n" not in out["failures"]["meteor"]
    assert out["bleu4"] is not None and out["cider"] is not None and len(out["per_sample"]["cider"]) == 2


def degenerate_outputs(n=20, long=(3, 7, 11), words=10_000):
    """n (hypothesis, reference) pairs; a few hypotheses are `words` words long, as a
    degenerate model writes them at a large max_new_tokens."""
    import random

    rng = random.Random(0)
    vocab = "the light ahead is red so we slow down and stop before the line car lane left right".split()
    refs = [" ".join(rng.choices(vocab, k=30)) for _ in range(n)]
    hyps = [" ".join(rng.choices(vocab, k=words if i in long else 30)) for i in range(n)]
    return hyps, refs


@pytest.mark.timeout(300)
def test_degenerate_long_outputs_still_give_every_score():
    from alphadrive_ray.evaluation.captions import METEOR_MAX_TOKENS

    hyps, refs = degenerate_outputs()
    out = compute_caption_metrics(hyps, [[r] for r in refs])
    assert out["failures"] == {}
    assert all(out[k] is not None for k in ("bleu4", "cider", "meteor"))
    assert all(x is not None for x in out["per_sample"]["meteor"])
    # the documented rule: METEOR sees the first METEOR_MAX_TOKENS tokens of a long text
    capped, _ = degenerate_outputs(long=(3,), words=METEOR_MAX_TOKENS)
    cut = compute_caption_metrics([capped[3], hyps[3]], [[refs[3]], [refs[3]]])
    assert cut["per_sample"]["meteor"][0] == cut["per_sample"]["meteor"][1]
    assert cut["per_sample"]["bleu4"][0] != cut["per_sample"]["bleu4"][1]  # BLEU sees the whole text


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError):
        compute_caption_metrics(["a"], [])
    with pytest.raises(ValueError):
        compute_caption_metrics(["a"], [[]])


def test_work_beside_the_tokenizer_runs_in_the_calling_thread_and_changes_no_score(ours):
    import threading

    seen = []

    def work():
        # runs here while the tokenizer's thread waits on its JVM
        seen.append((threading.current_thread() is threading.main_thread(), [t.name for t in threading.enumerate()]))

    beside = compute_caption_metrics([h for h, _ in PAIRS], [[r] for _, r in PAIRS], while_tokenizing=work)
    ((in_main, threads),) = seen
    assert in_main and "ptb-tokenizer" in threads
    for name in ("bleu4", "cider", "meteor"):
        assert beside[name] == ours[name] and beside["per_sample"][name] == ours["per_sample"][name]


def test_a_failure_beside_the_tokenizer_propagates_once_the_tokenizer_is_done():
    import threading

    from alphadrive_ray.evaluation import captions

    def work():
        raise ValueError("figure failed")

    with pytest.raises(ValueError, match="figure failed"):
        compute_caption_metrics(["a red light"], [["a red light"]], while_tokenizing=work)
    assert not [t for t in threading.enumerate() if t.name in ("ptb-tokenizer", "meteor")]
    assert captions._prestarted == []
