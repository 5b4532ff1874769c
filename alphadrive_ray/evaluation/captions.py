"""Reasoning metrics: BLEU-4, CIDEr and METEOR with pycocoevalcap, as the COCO caption evaluation does.

Both sides are tokenised with the Stanford PTB tokenizer (lower-cased, punctuation removed),
then scored with `Bleu(4)` (BLEU-4 is its fourth value), `Cider()` and `Meteor()` on the same
tokenised pairs: the scores equal pycocoevalcap run directly on the same sanitised pairs.
CIDEr's IDF comes from the references of the same call, so it is a corpus-level score; the
paper's tables show all three x 100.

Two gotchas of pycocoevalcap, handled here:
- Line breaks (``\\n``, ``\\r``, form feed, U+2028, U+0085, ...) inside a caption shift the
  PTB tokenizer's output lines (captions are silently scored against the wrong reference),
  and a newline reaching METEOR desynchronises its line protocol and the next read hangs
  forever. `sanitize_caption` turns every control or line/paragraph separator character into
  a space (checked over all code points in the tests); METEOR also runs under a watchdog.
- `Meteor()` holds a JVM subprocess (seconds to start): one is started per call, inside the
  calling process, before tokenisation so that its start overlaps the tokenizer's (or earlier,
  by `prestarted_meteor`, around the loading of the data); it scores in a thread while BLEU,
  CIDEr and nltk's BLEU run, and is always shut down.

How the two cores are used: METEOR's JVM scores on one core while Python computes BLEU,
CIDEr and nltk's BLEU on the other. The library's `Meteor.compute_score` sends one line and
waits for its answer, 10k times; a thread doing that while the main thread computes CIDEr
waits for the GIL at every line (up to the 5 ms switch interval each), so METEOR stalled
behind CIDEr. Here the same lines are written in one go by a writer thread and the answers
read in large chunks: the same protocol and the same bytes, so the same scores, a few GIL
hand-overs instead of 20k. Both sides are tokenised by one PTB tokenizer JVM (it works line
by line, so the tokens are those of two separate calls).
- METEOR's alignment grows faster than linearly with a text's length: a 800-token hypothesis
  took 2.3 s, and 3 hypotheses of 10,000 words (what a degenerate model writes at a large
  `max_new_tokens`) killed or stalled the JVM. So METEOR scores the first
  `METEOR_MAX_TOKENS` (256) tokens of each hypothesis and reference (after tokenisation; a
  distilled reasoning is at most 60 words, so no plausible output is cut); BLEU and CIDEr see
  whole texts.

Any output a model can produce gives a result: if a scorer still fails (or METEOR does not
answer in time), its score is None and `failures` says which one and why in one line; the
other scores are kept.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from typing import Any, Callable, Iterator, Sequence

from alphadrive_ray.errors import UserError
from alphadrive_ray.evaluation.nltk_bleu import bleu_agreement

# Characters replaced by a space: the controls (Unicode category Cc: U+0000-U+001F and
# U+007F-U+009F) and the line and paragraph separators (Zl: U+2028, Zp: U+2029). Lone
# surrogates cannot be encoded for the Java subprocesses and are dropped. The tests check
# these classes against `unicodedata` over every code point.
_LINE_BREAKING = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SURROGATES = re.compile("[\ud800-\udfff]")
METEOR_MAX_TOKENS = 256  # tokens of each text METEOR scores (see the module docstring)


def sanitize_caption(text: str) -> str:
    """`text` safe for the PTB tokenizer and METEOR: one line, no `|||`, no lone surrogates.

    Controls and line/paragraph separators become spaces; runs of `|` lose every `|||` (the
    METEOR field separator; what is left of a run is shorter than three).
    """
    return _SURROGATES.sub("", _LINE_BREAKING.sub(" ", text)).replace("|||", "")


def compute_caption_metrics(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    on_stage: Callable[[str], None] | None = None,
    meteor_timeout_s: float | None = None,
    while_tokenizing: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Corpus BLEU-4, CIDEr and METEOR of `hypotheses[i]` against the references `references[i]`.

    Returns `{"n", "bleu4", "cider", "meteor", "bleu4_nltk", "bleu4_check", "per_sample": {"bleu4":
    [...], "cider": [...], "meteor": [...], "sentence_bleu": [...]}, "failures": {name: why}}`; the
    scores are None when there is no pair, and a scorer's are None when it failed (METEOR also
    when it does not answer within `meteor_timeout_s`, by default 120 s + 20 ms per pair).
    `sentence_bleu` is nltk's smoothed sentence BLEU-4 and `bleu4_nltk` nltk's corpus BLEU-4,
    both on the PTB tokens the other scores use; `bleu4_check` compares nltk's and
    pycocoevalcap's corpus BLEU-4 where they are defined alike (`nltk_bleu`). Texts are sanitised with
    `sanitize_caption` first. `on_stage(name)` is called as each stage ends (progress bars).
    `while_tokenizing()` runs in the calling thread while the PTB tokenizer's JVM works (which
    leaves Python idle for a second or more per 10k pairs); an exception from it propagates once
    the tokenizer is done. Raises UserError when Java is missing.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    n = len(hypotheses)
    if n == 0:
        return {
            "n": 0,
            "bleu4": None,
            "cider": None,
            "meteor": None,
            "bleu4_nltk": None,
            "bleu4_check": bleu_agreement(None, None, 0),
            "per_sample": {"bleu4": [], "cider": [], "meteor": [], "sentence_bleu": []},
            "failures": {},
        }
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every hypothesis needs at least one reference")
    stage = on_stage or (lambda name: None)

    from pycocoevalcap.cider.cider import Cider

    from alphadrive_ray.evaluation.nltk_bleu import compute_nltk_bleu

    gts = {i: [{"caption": sanitize_caption(ref)} for ref in refs] for i, refs in enumerate(references)}
    res = {i: [{"caption": sanitize_caption(hyp)}] for i, hyp in enumerate(hypotheses)}

    meteor = _take_prestarted() or _start_meteor()  # the JVM loads its tables while the tokenizer runs
    try:
        gts_tok, res_tok = _tokenize_beside(gts, res, while_tokenizing)
        stage("tokenize")

        meteor_result: dict[str, Any] = {}
        capped_gts, capped_res = _cap_tokens(gts_tok), _cap_tokens(res_tok)

        def score_meteor() -> None:
            try:
                meteor_result["value"] = meteor.compute_score(capped_gts, capped_res)
            except BaseException as exc:  # noqa: BLE001 - reported by the calling thread
                meteor_result["error"] = exc

        meteor_thread = threading.Thread(target=score_meteor, name="meteor", daemon=True)
        meteor_thread.start()
        failures: dict[str, str] = {}
        scores: dict[str, tuple] = {}  # name -> (corpus score, per sample[, nltk's cross-check])

        kept: dict[str, Any] = {}  # pycocoevalcap's BLEU scorer, for the nltk cross-check

        def bleu4() -> tuple:
            kept["scorer"], bleu, bleu_per_sample = coco_bleu(gts_tok, res_tok)
            return bleu[3], bleu_per_sample[3]

        def nltk_bleu() -> tuple:
            # nltk's sentence and corpus BLEU, cross-checked against pycocoevalcap's
            nltk = compute_nltk_bleu([[ref.split() for ref in gts_tok[i]] for i in range(n)], [res_tok[i][0].split() for i in range(n)])
            coco_comparable = None
            if nltk.comparable_corpus is not None and "bleu4" in scores:
                everything = len(nltk.comparable) == n
                coco_comparable = scores["bleu4"][0] if everything else coco_bleu4_of(kept["scorer"], nltk.comparable)
            return nltk.corpus, nltk.sentence, bleu_agreement(nltk.comparable_corpus, coco_comparable, len(nltk.comparable))

        for name, stage_name, score in (
            ("bleu4", "bleu", bleu4),
            ("cider", "cider", lambda: Cider().compute_score(gts_tok, res_tok)),
            ("bleu4_nltk", "nltk_bleu", nltk_bleu),
        ):
            try:
                scores[name] = score()
            except Exception as exc:  # noqa: BLE001 - one failed scorer keeps the others
                failures[name] = _one_line(f"{type(exc).__name__}: {exc}")
            stage(stage_name)
        timeout = 120.0 + 0.02 * n if meteor_timeout_s is None else meteor_timeout_s
        meteor_thread.join(timeout)
        if meteor_thread.is_alive():
            meteor.close()  # unblocks the reader thread with EOF
            failures["meteor"] = f"did not answer within {timeout:.0f} s; its JVM was stopped"
        elif "error" in meteor_result:
            failures["meteor"] = _one_line(meteor.describe_failure(meteor_result["error"]))
        else:
            scores["meteor"] = meteor_result["value"]
        stage("meteor")
    finally:
        meteor.close()

    out: dict[str, Any] = {"n": n, "per_sample": {}, "failures": failures}
    for name in ("bleu4", "cider", "meteor"):
        corpus, per_sample = scores.get(name, (None, [None] * n))
        out[name] = None if corpus is None else float(corpus)
        out["per_sample"][name] = [None if x is None else float(x) for x in per_sample]
    out["bleu4_nltk"], out["per_sample"]["sentence_bleu"], out["bleu4_check"] = scores.get(
        "bleu4_nltk", (None, [None] * n, bleu_agreement(None, None, 0))
    )
    return out


def _cap_tokens(tokenized: dict[int, list[str]]) -> dict[int, list[str]]:
    """Each tokenised text cut to its first METEOR_MAX_TOKENS tokens."""
    return {k: [" ".join(text.split()[:METEOR_MAX_TOKENS]) for text in texts] for k, texts in tokenized.items()}


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def coco_bleu(gts: dict, res: dict) -> tuple[Any, list[float], list[list[float]]]:
    """pycocoevalcap's `Bleu(4).compute_score(gts, res)`, step by step, keeping its scorer.

    Returns (scorer, [BLEU-1..4], per-sample lists); the scorer's counts give `coco_bleu4_of`.
    """
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    scorer = BleuScorer(n=4)
    for key in gts:
        hypo, refs = res[key], gts[key]
        assert isinstance(hypo, list) and len(hypo) == 1 and isinstance(refs, list) and len(refs) >= 1
        scorer += (hypo[0], refs)
    score, per_sample = scorer.compute_score(option="closest", verbose=0)
    return scorer, score, per_sample


def coco_bleu4_of(scorer: Any, indices: Sequence[int]) -> float:
    """pycocoevalcap's corpus BLEU-4 of some of a scorer's samples (their counts are reused)."""
    subset = scorer.copy()
    subset.crefs = [scorer.crefs[i] for i in indices]
    subset.ctest = [scorer.ctest[i] for i in indices]
    score, _ = subset.compute_score(option="closest", verbose=0)
    return float(score[3])


def _tokenize_beside(gts: dict, res: dict, work: Callable[[], None] | None) -> tuple[dict, dict]:
    """`tokenize(gts, res)`, in a thread while `work()` runs in this one (without work: here)."""
    if work is None:
        return tokenize(gts, res)
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["tokens"] = tokenize(gts, res)
        except BaseException as exc:  # noqa: BLE001 - raised by the calling thread
            result["error"] = exc

    tokenizer = threading.Thread(target=run, name="ptb-tokenizer", daemon=True)
    tokenizer.start()
    try:
        work()
    finally:
        tokenizer.join()
    if "error" in result:
        raise result["error"]
    return result["tokens"]


def tokenize(gts: dict, res: dict) -> tuple[dict, dict]:
    """pycocoevalcap's PTB tokenisation of both sides, in one JVM.

    The tokenizer runs with `-preserveLines`, one caption per line, so the tokens of a caption
    do not depend on the other lines: one call on both sides gives what two calls give.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    both = {("gts", key): value for key, value in gts.items()}
    both.update({("res", key): value for key, value in res.items()})
    tokens = _java(PTBTokenizer().tokenize, both)
    if len(tokens) != len(both) or any(len(tokens[key]) != len(value) for key, value in both.items()):
        raise RuntimeError("the PTB tokenizer returned a different number of lines than it was given")
    return {key: tokens[("gts", key)] for key in gts}, {key: tokens[("res", key)] for key in res}


_prestarted: list = []  # METEOR scorers started ahead by `prestarted_meteor`, not yet taken
_prestarted_lock = threading.Lock()


@contextlib.contextmanager
def prestarted_meteor(enabled: bool = True) -> Iterator[None]:
    """Start METEOR's JVM now, for the next `compute_caption_metrics` of this process.

    Its paraphrase tables take seconds to load; `alphadrive-ray eval` starts it before reading
    the files so that the loading overlaps everything before the scoring. A scorer left unused
    is shut down when the block ends. Without Java nothing is started (the metrics then fail
    with the usual message, if they are computed at all).
    """
    meteor = None
    if enabled:
        try:
            meteor = _start_meteor()
        except UserError:
            meteor = None
    if meteor is not None:
        with _prestarted_lock:
            _prestarted.append(meteor)
    try:
        yield
    finally:
        if meteor is not None:
            with _prestarted_lock:
                if meteor in _prestarted:
                    _prestarted.remove(meteor)
            meteor.close()


def _take_prestarted() -> Any:
    with _prestarted_lock:
        return _prestarted.pop() if _prestarted else None


_JAVA_HINT = (
    "reasoning metrics need Java (the PTB tokenizer and METEOR run on the JVM): install it "
    "(e.g. `apt-get install -y default-jre-headless`) or pass --no-reasoning-metrics"
)


def _java(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except FileNotFoundError as exc:
        raise UserError(f"{_JAVA_HINT} ({exc})") from exc


def _start_meteor() -> Any:
    from pycocoevalcap.meteor.meteor import Meteor

    class _Meteor(Meteor):
        """pycocoevalcap's Meteor with a shutdown that cannot deadlock.

        The library's `__del__` takes the scorer's lock, which `compute_score` never releases
        when the JVM dies mid-call; `close` kills the JVM without it and is idempotent.
        """

        def close(self) -> None:
            proc = self.meteor_p
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                try:
                    stream.close()
                except (OSError, ValueError):
                    pass

        def describe_failure(self, exc: BaseException) -> str:
            stderr = ""
            if self.meteor_p.poll() is not None:
                try:
                    stderr = self.meteor_p.stderr.read().decode(errors="replace").strip()[-500:]
                except (OSError, ValueError):
                    pass
            return f"{type(exc).__name__}: {exc}" + (f"; JVM stderr: {stderr}" if stderr else "")

        def compute_score(self, gts: dict, res: dict) -> tuple[float, list[float]]:
            """The library's `compute_score`, pipelined: the same lines, written in one go."""
            ids = list(gts)
            lines = []
            for i in ids:
                assert len(res[i]) == 1
                hypothesis = res[i][0].replace("|||", "").replace("  ", " ")
                lines.append(" ||| ".join(("SCORE", " ||| ".join(gts[i]), hypothesis)))
            stats = [line.strip() for line in self._exchange(lines)]
            answers = self._exchange(["EVAL" + "".join(f" ||| {stat}" for stat in stats)], len(ids) + 1)
            return float(answers[-1].strip()), [float(a.strip()) for a in answers[:-1]]

        def _exchange(self, lines: list[str], expect: int | None = None) -> list[str]:
            """Send `lines` and read `expect` (default: as many) answer lines.

            A writer thread sends while this one reads, so neither the JVM nor Python blocks on
            a full pipe; reads take whatever the pipe holds (up to 1 MiB), not a line at a time.
            """
            expect = len(lines) if expect is None else expect
            payload = ("\n".join(lines) + "\n").encode()
            failure: list[BaseException] = []

            def write() -> None:
                try:
                    self.meteor_p.stdin.write(payload)
                    self.meteor_p.stdin.flush()
                except (OSError, ValueError) as exc:  # the JVM died or was closed: the reader sees EOF
                    failure.append(exc)

            writer = threading.Thread(target=write, name="meteor-writer", daemon=True)
            writer.start()
            fd = self.meteor_p.stdout.fileno()
            chunks, seen = [], 0
            while seen < expect:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise EOFError(
                        f"METEOR closed its output after {seen} of {expect} lines" + (f" (writing failed: {failure[0]})" if failure else "")
                    )
                chunks.append(chunk)
                seen += chunk.count(b"\n")
            writer.join()
            text = b"".join(chunks).decode()
            answers = text.split("\n")
            if len(answers) != expect + 1 or answers[-1]:
                raise RuntimeError(f"METEOR answered {len(answers) - 1} lines to {expect}")
            return answers[:-1]

        def __del__(self) -> None:
            try:
                self.close()
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass

    try:
        return _Meteor()
    except FileNotFoundError as exc:
        raise UserError(f"{_JAVA_HINT} ({exc})") from exc
