"""Response-quality metrics: per answer, aggregated per model, and base-vs-tuned deltas.

Plain functions on text and numbers so each can be checked on hand-computed cases. Words are
lower-cased runs of letters, digits and apostrophes; ROUGE-L is `rouge-score`'s F-measure.
"""

from __future__ import annotations

import math
import random
import re
from statistics import NormalDist, fmean, pstdev

from tasks.text import prompt_template

_WORD = re.compile(r"[\w']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def template_leak(text: str, template: str = "tutorial") -> bool:
    return prompt_template.leaks(text, template)


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(tokens: list[str], n: int) -> float:
    """Unique n-grams / all n-grams (1.0 for an empty answer: nothing repeated)."""
    grams = ngrams(tokens, n)
    return len(set(grams)) / len(grams) if grams else 1.0


def repeated_ngram_rate(tokens: list[str], n: int = 3) -> float:
    """Share of n-grams that already occurred earlier in the same answer (looping text)."""
    grams = ngrams(tokens, n)
    if not grams:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


REPETITION_FLAG = 0.2  # an answer with over 20% repeated trigrams is flagged as looping


def answer_metrics(answer: dict, template: str = "tutorial") -> dict:
    """Metrics of one generated answer (a dict from generate's answers.json), its template leak
    judged in the run's prompt template."""
    toks = words(answer["text"])
    rep = repeated_ngram_rate(toks, 3)
    return {
        "stopped_at_eos": answer["stopped_at_eos"],
        "hit_max_length": answer["hit_max_length"],
        "template_leak": template_leak(answer["text"], template),
        "tokens": answer["tokens"],
        "words": len(toks),
        "distinct_1": round(distinct_n(toks, 1), 4),
        "distinct_2": round(distinct_n(toks, 2), 4),
        "repeated_3gram_rate": round(rep, 4),
        "repetitive": rep > REPETITION_FLAG,
    }


def rouge_l(prediction: str, reference: str) -> float:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(reference, prediction)["rougeL"].fmeasure


def rouge_l_many(predictions: list[str], references: list[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]


ALPHA = 0.05
POWER = 0.80


def minimum_detectable_effect(stats: list[float], level: float = 1 - ALPHA) -> float:
    """The smallest true change a two-sided test at 1 - `level` would find with 80% power, from the
    bootstrap distribution of the paired statistic: (z((1 + level) / 2) + z(0.8)) times its standard
    deviation, the bootstrap's standard error of the change (2.80 x at 95%)."""
    z = NormalDist().inv_cdf
    return (z((1 + level) / 2) + z(POWER)) * pstdev(stats)


def bootstrap_p(stats: list[float]) -> float:
    """Two-sided p-value of "no change" from the bootstrap distribution of the change: twice the
    smaller share of resamples on either side of zero (the smallest level whose percentile interval
    still reaches zero)."""
    n = len(stats)
    return min(1.0, 2 * min(sum(s <= 0 for s in stats), sum(s >= 0 for s in stats)) / n)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the i-th smallest p times (m - i + 1),
    never below an earlier one's, at most 1. Controls the chance of any false "significant" among m."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def holm_levels(p_values: list[float]) -> list[float]:
    """The interval level Holm's procedure tests each p-value at: 1 - alpha / (m - rank) for the
    rank-th smallest (0-based), in the order given."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    levels = [0.0] * m
    for rank, i in enumerate(order):
        levels[i] = 1 - ALPHA / (m - rank)
    return levels


def bootstrap_delta_ci(base: list[float], tuned: list[float], resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Paired bootstrap of mean(tuned - base): the same examples are resampled for both models; with
    the minimum detectable effect at 80% power (`mde_80`) from the same resamples."""
    if len(base) != len(tuned) or not base:
        raise ValueError("bootstrap needs two equally long, non-empty score lists")
    diffs = [t - b for b, t in zip(base, tuned)]
    rng = random.Random(seed)
    n = len(diffs)
    stats = [fmean(diffs[rng.randrange(n)] for _ in range(n)) for _ in range(resamples)]
    low, high = percentile_interval(stats, level)
    return {"mean": round(fmean(diffs), 5), "low": round(low, 5), "high": round(high, 5), "n": n, "level": level,
            "mde_80": round(minimum_detectable_effect(stats, level), 5), "p": round(bootstrap_p(stats), 5)}


def percentile_interval(stats: list[float], level: float) -> tuple[float, float]:
    """The central `level` interval of bootstrap statistics (percentile method)."""
    stats = sorted(stats)
    lo_i = int((1 - level) / 2 * len(stats))
    hi_i = min(len(stats) - 1, int((1 + level) / 2 * len(stats)) - 1)
    return stats[lo_i], stats[hi_i]


def bootstrap_perplexity_ci(base: list[dict], tuned: list[dict], resamples: int = 2000, seed: int = 0,
                            level: float = 0.95) -> dict:
    """Paired bootstrap of the response perplexity change (tuned - base) over held-out examples.

    Each item is one example's `response_loss_sum` and `response_tokens` (tasks.evaluate.heldout_eval); a
    resample draws examples with replacement, the same ones for both models, and recomputes each
    model's perplexity as exp(summed loss / summed tokens), as the point estimate is computed."""
    if len(base) != len(tuned) or not base:
        raise ValueError("bootstrap needs two equally long, non-empty lists of per-example scores")
    if any(b["response_tokens"] != t["response_tokens"] for b, t in zip(base, tuned)):
        raise ValueError("base and tuned scores are not of the same examples (response token counts differ)")

    def ppl(loss: float, tokens: int) -> float:
        return math.exp(min(loss / max(tokens, 1), 50.0))

    lb = [b["response_loss_sum"] for b in base]
    lt = [t["response_loss_sum"] for t in tuned]
    tok = [b["response_tokens"] for b in base]
    rng = random.Random(seed)
    n = len(tok)
    deltas = []
    for _ in range(resamples):
        pick = [rng.randrange(n) for _ in range(n)]
        k = sum(tok[i] for i in pick)
        deltas.append(ppl(sum(lt[i] for i in pick), k) - ppl(sum(lb[i] for i in pick), k))
    low, high = percentile_interval(deltas, level)
    pb, pt = ppl(sum(lb), sum(tok)), ppl(sum(lt), sum(tok))
    return {"base": round(pb, 4), "tuned": round(pt, 4), "mean": round(pt - pb, 4), "low": round(low, 4),
            "high": round(high, 4), "n": n, "level": level, "mde_80": round(minimum_detectable_effect(deltas, level), 4),
            "p": round(bootstrap_p(deltas), 5)}


def corrected(ci: dict | None, adjusted_p: float, compared: int) -> dict | None:
    """An interval of one of `compared` variants with its Holm-adjusted p-value attached."""
    return {**ci, "adjusted_p": round(adjusted_p, 5), "compared": compared, "correction": "holm"} if ci else None


def direction(ci: dict | None) -> int:
    """+1 or -1 for a significant increase or decrease, 0 for none: the interval excludes zero, and
    for a Holm-corrected interval (one of several variants) the adjusted p-value is below 5% too."""
    if not ci or ("adjusted_p" in ci and ci["adjusted_p"] >= ALPHA):
        return 0
    return 1 if ci["low"] > 0 else -1 if ci["high"] < 0 else 0


def significance(ci: dict | None, higher_is_better: bool) -> str:
    """A change in words from its confidence interval: better or worse only when the interval
    excludes zero (and, for one of several variants compared, Holm's adjusted p-value is below 5%).
    "No significant change" says what the test could have found (its minimum detectable effect at
    80% power): an underpowered test and evidence of no effect read apart."""
    if not ci:
        return "not measured"
    pct = f"{ci['level']:.0%}" if "adjusted_p" not in ci else "95%"
    after = (f" after Holm's correction for {ci['compared']} variants compared (adjusted p = {ci['adjusted_p']:g})"
             if "adjusted_p" in ci else "")
    d = direction(ci)
    if d:
        return f"{'better' if (d > 0) == higher_is_better else 'worse'}, significant at {pct}{after}"
    if "mde_80" in ci:
        return (f"no significant change{after}; this test could only detect changes above {ci['mde_80']:g} "
                f"(80% power, n = {ci['n']})")
    return f"no significant change{after}"


def aggregate(per_answer: list[dict], answers: list[dict]) -> dict:
    n = max(len(per_answer), 1)
    gen_tokens = sum(a["tokens"] for a in answers)
    # Answers of one batch share its time: count each batch once.
    seconds = sum({a["batch"]: a["batch_seconds"] for a in answers}.values())
    return {
        "answers": len(per_answer),
        "eos_stop_rate": round(sum(m["stopped_at_eos"] for m in per_answer) / n, 4),
        "hit_max_length_rate": round(sum(m["hit_max_length"] for m in per_answer) / n, 4),
        "template_leak_rate": round(sum(m["template_leak"] for m in per_answer) / n, 4),
        "repetitive_rate": round(sum(m["repetitive"] for m in per_answer) / n, 4),
        "mean_tokens": round(sum(m["tokens"] for m in per_answer) / n, 2),
        "mean_words": round(sum(m["words"] for m in per_answer) / n, 2),
        "distinct_1": round(sum(m["distinct_1"] for m in per_answer) / n, 4),
        "distinct_2": round(sum(m["distinct_2"] for m in per_answer) / n, 4),
        "repeated_3gram_rate": round(sum(m["repeated_3gram_rate"] for m in per_answer) / n, 4),
        "generation_seconds": round(seconds, 2),
        "tokens_per_second": round(gen_tokens / seconds, 2) if seconds else None,
    }
