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
  calling process, before tokenisation so that its start overlaps the tokenizer's; it scores
  in a thread while BLEU and CIDEr run, and is always shut down.
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

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from alphadrive_ray.errors import UserError

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
) -> dict[str, Any]:
    """Corpus BLEU-4, CIDEr and METEOR of `hypotheses[i]` against the references `references[i]`.

    Returns `{"n", "bleu4", "cider", "meteor", "per_sample": {"bleu4": [...], "cider": [...],
    "meteor": [...]}, "failures": {name: why}}`; the scores are None when there is no pair,
    and a scorer's are None when it failed (METEOR also when it does not answer within
    `meteor_timeout_s`, by default 120 s + 20 ms per pair). Texts are sanitised with
    `sanitize_caption` first. `on_stage(name)` is called as each stage ends (progress bars).
    Raises UserError when Java is missing.
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
            "per_sample": {"bleu4": [], "cider": [], "meteor": []},
            "failures": {},
        }
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every hypothesis needs at least one reference")
    stage = on_stage or (lambda name: None)

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {i: [{"caption": sanitize_caption(ref)} for ref in refs] for i, refs in enumerate(references)}
    res = {i: [{"caption": sanitize_caption(hyp)}] for i, hyp in enumerate(hypotheses)}

    meteor = _start_meteor()  # the JVM loads its tables while the tokenizer runs
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            gts_job = pool.submit(_java, PTBTokenizer().tokenize, gts)
            res_job = pool.submit(_java, PTBTokenizer().tokenize, res)
            gts_tok, res_tok = gts_job.result(), res_job.result()
        if len(gts_tok) != n or len(res_tok) != n or any(len(gts_tok[i]) != len(gts[i]) for i in range(n)):
            raise RuntimeError("the PTB tokenizer returned a different number of lines than it was given")
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
        scores: dict[str, tuple[float | None, list]] = {}  # name -> (corpus score, per sample)

        def bleu4() -> tuple:
            corpus, per_sample = Bleu(4).compute_score(gts_tok, res_tok, verbose=0)
            return corpus[3], per_sample[3]

        for name, stage_name, score in (
            ("bleu4", "bleu", bleu4),
            ("cider", "cider", lambda: Cider().compute_score(gts_tok, res_tok)),
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
    return out


def _cap_tokens(tokenized: dict[int, list[str]]) -> dict[int, list[str]]:
    """Each tokenised text cut to its first METEOR_MAX_TOKENS tokens."""
    return {k: [" ".join(text.split()[:METEOR_MAX_TOKENS]) for text in texts] for k, texts in tokenized.items()}


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


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

        def __del__(self) -> None:
            try:
                self.close()
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass

    try:
        return _Meteor()
    except FileNotFoundError as exc:
        raise UserError(f"{_JAVA_HINT} ({exc})") from exc
