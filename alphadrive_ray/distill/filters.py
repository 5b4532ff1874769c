"""Automatic filters for teacher reasoning, before the human review.

Each filter takes the (normalised) reasoning and the sample's true plan and returns a short
reason when the reasoning should not be used for SFT, or None. `check_reasoning` runs all
of them and returns every flag, so the summary can count each filter separately:

- `empty`: no letters at all, or fewer than `min_words` words of English (a fragment).
- `refusal`: an apology or an "I cannot help / see the image" answer (see REFUSAL_PATTERNS);
  "I cannot accelerate because ..." is reasoning, not a refusal.
- `answer_leak`: the answer format leaks into the reasoning: `<think>`/`<answer>` tags, the
  planner's vocabulary tokens in their token spelling (`LEFT_TURN`, `DECELERATE`, ... in
  capitals or with an underscore), or `SPEED:` / `PATH:` labels. The reasoning is wrapped in
  `<think>` at training time, so any of these would teach the model a second answer.
- `wrong_language`: not English, by two heuristics: (1) fewer than 90% of the letters are
  ASCII letters (Chinese, Cyrillic, accented Latin text); (2) with at least 6 words, fewer
  than 20% of them are common English words (ENGLISH_WORDS: function words plus driving
  words). Catches French/German/Spanish, which mostly pass (1).
- `too_long`: more than `max_words` words or `max_sentences` sentences, or the teacher was
  cut off by its token limit (finish_reason "length").
- `contradiction`: the reasoning states an action that contradicts the true plan, by the
  table CONTRADICTIONS (label -> maneuvers it rules out). A mention is skipped when one of
  the 4 words before it negates it ("no need to stop", "instead of accelerating"), and a
  PATH maneuver that is the navigation command itself ("the navigation says turn left") is
  never a contradiction: the teacher is told the command and may quote it.

These are heuristics for a first pass; the flags are kept in the output record and
`distill review --include-filtered` lets a human overrule them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FILTERS: tuple[str, ...] = ("empty", "refusal", "answer_leak", "wrong_language", "too_long", "contradiction")


@dataclass(frozen=True)
class FilterLimits:
    min_words: int = 3
    max_words: int = 60
    max_sentences: int = 3


@dataclass(frozen=True)
class Flag:
    filter: str  # one of FILTERS
    detail: str

    def __str__(self) -> str:
        return f"{self.filter}: {self.detail}"


# Texts longer than this are only scanned up to here (they are too long anyway), so every
# regex below runs on bounded input.
SCAN_CHARS = 4000

_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")  # letters, with one inner apostrophe (don't, I'm)


def normalise_reasoning(text: str | None) -> str:
    """One line of text: white space collapsed, wrapping quotes removed.

    Newlines are removed because the METEOR scorer's subprocess desynchronises on them.
    """
    if not text:
        return ""
    out = " ".join(text.split())
    for left, right in (('"', '"'), ("'", "'"), ("\u201c", "\u201d")):
        if len(out) >= 2 and out.startswith(left) and out.endswith(right) and left not in out[1:-1]:
            out = out[1:-1].strip()
    return out


def words(text: str) -> list[str]:
    return _WORD.findall(text)


# --- refusal -----------------------------------------------------------------------------

REFUSAL_PATTERNS: tuple[re.Pattern, ...] = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        r"\b(?:i'?m|i am) sorry\b",
        r"^sorry\b",
        r"\bi apologi[sz]e\b",
        r"\bas an ai\b",
        r"\bas a language model\b",
        r"\bi(?: cannot| can ?not| can't|'m unable to| am unable to|'m not able to| am not able to)"
        r" (?:help|assist|provide|comply|fulfil|fulfill|determine|identify|analy[sz]e|view|see|access|process"
        r"|answer|explain|tell|describe|make out|interpret)\b",
        r"\b(?:cannot|can't|unable to) (?:view|see|access|process|interpret) (?:the |this |any )?(?:image|picture|photo)",
    )
)

# --- answer leak --------------------------------------------------------------------------

_LEAK_PATTERNS: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"</?\s*(?:answer|think)\s*>", re.IGNORECASE), "answer-format tag"),
    (
        re.compile(r"\b(?:KEEP|ACCELERATE|DECELERATE|STOP|STRAIGHT|LEFT_TURN|RIGHT_TURN|LEFT_CHANGE|RIGHT_CHANGE)\b"),
        "planner vocabulary token",
    ),
    (re.compile(r"\b(?:left|right)_(?:turn|change)\b", re.IGNORECASE), "planner vocabulary token"),
    (re.compile(r"\b(?:SPEED|PATH)\s*(?:plan)?\s*[:=]"), "SPEED/PATH label"),
)

# --- language -----------------------------------------------------------------------------

ENGLISH_WORDS: frozenset[str] = frozenset(
    """the a is are am be been being to of in on at for with and or but so because as it its this that
    these those there their they i my we our you your will would should must can could may might not no
    from by into ahead behind than then when while which who what since after before has have had do does
    if up down over only also very just all any some more less near far front next current currently
    vehicle vehicles car cars road lane lanes traffic light lights speed turn turning left right straight
    slow slowing stop stopping keep keeping safe safely clear intersection pedestrian pedestrians
    navigation command driving drive ego accelerate decelerate change changing move moving""".split()
)
MIN_ASCII_LETTER_SHARE = 0.9
MIN_ENGLISH_WORD_SHARE = 0.2
MIN_WORDS_FOR_WORD_CHECK = 6

# --- contradictions -----------------------------------------------------------------------

# How each action is said in English. Patterns are plain alternations (no nested
# quantifiers), so they run in linear time.
MENTIONS: dict[str, re.Pattern] = {
    "accelerate": re.compile(
        r"\b(?:accelerat\w*|speed(?:s|ing)? up|sped up|go(?:ing)? faster|pick(?:ing)? up speed"
        r"|increas\w* (?:my |the |our )?speed)\b",
        re.IGNORECASE,
    ),
    "slow_down": re.compile(
        r"\b(?:decelerat\w*|slow(?:s|ing|ed)? down|brak\w*|reduc\w* (?:my |the |our )?speed|slow(?:s|ing)? to)\b",
        re.IGNORECASE,
    ),
    # "stop sign", "stop line", "stop light" describe the scene, not the plan
    "stop": re.compile(r"\b(?:stop|stops|stopping|come to a (?:halt|stop)|halt)\b(?!\s+(?:sign|line|light|bar))", re.IGNORECASE),
    "keep_speed": re.compile(
        r"\b(?:keep\w*|maintain\w*|hold\w*) (?:my |the |our |a )?(?:current |present |same |steady |constant )?speed\b",
        re.IGNORECASE,
    ),
    "left_turn": re.compile(r"\b(?:turn(?:s|ing|ed)? (?:to the )?left|left[- ]turn\w*)\b", re.IGNORECASE),
    "right_turn": re.compile(r"\b(?:turn(?:s|ing|ed)? (?:to the )?right|right[- ]turn\w*)\b", re.IGNORECASE),
    "left_change": re.compile(
        r"\b(?:(?:chang|mov|merg|switch|shift)\w* (?:in)?to (?:the )?left(?: lane)?|change lanes? (?:to the )?left"
        r"|left lane change)\b",
        re.IGNORECASE,
    ),
    "right_change": re.compile(
        r"\b(?:(?:chang|mov|merg|switch|shift)\w* (?:in)?to (?:the )?right(?: lane)?|change lanes? (?:to the )?right"
        r"|right lane change)\b",
        re.IGNORECASE,
    ),
    "straight": re.compile(r"\b(?:go|goes|going|keep|keeping|continu\w*|driv\w*|proceed\w*|head\w*) straight\b", re.IGNORECASE),
}

# True label -> the mentioned actions that contradict it. Conservative on purpose: a lane
# change to the left is not said to contradict "turn left", decelerating does not
# contradict stopping, and stopping does not contradict decelerating.
CONTRADICTIONS: dict[str, tuple[str, ...]] = {
    # SPEED
    "STOP": ("accelerate", "keep_speed"),
    "DECELERATE": ("accelerate", "keep_speed"),
    "ACCELERATE": ("slow_down", "stop", "keep_speed"),
    "KEEP": ("accelerate", "slow_down", "stop"),
    # PATH
    "STRAIGHT": ("left_turn", "right_turn", "left_change", "right_change"),
    "LEFT_TURN": ("right_turn", "right_change", "straight"),
    "RIGHT_TURN": ("left_turn", "left_change", "straight"),
    "LEFT_CHANGE": ("right_turn", "right_change"),
    "RIGHT_CHANGE": ("left_turn", "left_change"),
}

# The maneuver a navigation command names; quoting it is never a contradiction.
NAVIGATION_MANEUVER: dict[str, str] = {"turn left": "left_turn", "turn right": "right_turn", "go straight": "straight"}

NEGATIONS: frozenset[str] = frozenset("not no never without nor cannot instead rather neither avoid avoiding unnecessary needn't".split())
NEGATION_WINDOW_WORDS = 4


def _negated(text: str, start: int) -> bool:
    before = text[max(0, start - 60) : start].lower().split()[-NEGATION_WINDOW_WORDS:]
    return any(w.strip(",.;:") in NEGATIONS or w.endswith("n't") for w in before)


def find_mentions(text: str, action: str) -> list[str]:
    """Non-negated phrases of `text` that state `action` (a key of MENTIONS)."""
    return [m.group(0) for m in MENTIONS[action].finditer(text) if not _negated(text, m.start())]


def contradiction_flags(text: str, speed_action: str, path_action: str, navigation: str = "") -> list[str]:
    exempt = NAVIGATION_MANEUVER.get(navigation.strip().lower())
    found = []
    for label in (speed_action, path_action):
        for action in CONTRADICTIONS.get(label, ()):
            if action == exempt:
                continue
            hits = find_mentions(text, action)
            if hits:
                found.append(f"says {hits[0]!r} but the true action is {label}")
    return found


def check_reasoning(
    text: str,
    speed_action: str,
    path_action: str,
    navigation: str = "",
    *,
    finish_reason: str | None = None,
    limits: FilterLimits = FilterLimits(),
) -> list[Flag]:
    """Every filter `text` fails, in FILTERS order; [] when it may be used."""
    text = normalise_reasoning(text)
    scan = text[:SCAN_CHARS].replace("\u2019", "'")  # typographic apostrophes, as in "I\u2019m sorry"
    found = words(scan)
    language = _language_problem(scan, found)
    # Chinese or Japanese text has no spaces, so its "words" are whole clauses: a short
    # text in another script is wrong_language, not empty
    if not found or (len(found) < limits.min_words and not language):
        return [Flag("empty", "no text" if not text else f"only {len(found)} word(s)")]
    flags: list[Flag] = []
    for pattern in REFUSAL_PATTERNS:
        m = pattern.search(scan)
        if m:
            flags.append(Flag("refusal", f"contains {m.group(0)!r}"))
            break
    leaks = [f"{what} {m.group(0)!r}" for pattern, what in _LEAK_PATTERNS for m in [pattern.search(scan)] if m]
    if leaks:
        flags.append(Flag("answer_leak", "; ".join(leaks)))
    if language:
        flags.append(Flag("wrong_language", language))
    n_words = len(words(text))
    n_sentences = len([s for s in re.split(r"[.!?]+(?:\s+|$)", scan) if s.strip()])
    if finish_reason == "length":
        flags.append(Flag("too_long", "cut off at the teacher's token limit"))
    elif n_words > limits.max_words:
        flags.append(Flag("too_long", f"{n_words} words (max {limits.max_words})"))
    elif n_sentences > limits.max_sentences:
        flags.append(Flag("too_long", f"{n_sentences} sentences (max {limits.max_sentences})"))
    contradictions = contradiction_flags(scan, speed_action, path_action, navigation)
    if contradictions:
        flags.append(Flag("contradiction", "; ".join(contradictions)))
    return flags


def _language_problem(text: str, found_words: list[str]) -> str | None:
    letters = [c for c in text if c.isalpha()]
    if letters:
        share = sum(1 for c in letters if c.isascii()) / len(letters)
        if share < MIN_ASCII_LETTER_SHARE:
            return f"{1 - share:.0%} of the letters are not ASCII"
    if len(found_words) >= MIN_WORDS_FOR_WORD_CHECK:
        share = sum(1 for w in found_words if w.lower() in ENGLISH_WORDS) / len(found_words)
        if share < MIN_ENGLISH_WORD_SHARE:
            return f"only {share:.0%} of the words are common English words"
    return None
