import math
import random

import pytest

from tasks.evaluate import metrics
from tasks.pipeline.config import load_config
from tasks.evaluate.evaluation import gate

pytestmark = pytest.mark.unit


def test_words_and_distinct_by_hand():
    toks = metrics.words("The cat saw the cat.")
    assert toks == ["the", "cat", "saw", "the", "cat"]
    assert metrics.distinct_n(toks, 1) == pytest.approx(3 / 5)
    # bigrams: the-cat, cat-saw, saw-the, the-cat -> 3 unique of 4
    assert metrics.distinct_n(toks, 2) == pytest.approx(3 / 4)
    assert metrics.distinct_n([], 2) == 1.0


def test_repeated_ngram_rate_by_hand():
    toks = "a b c a b c a b c".split()
    # trigrams: abc bca cab abc bca cab abc -> the last 4 repeat earlier ones
    assert metrics.repeated_ngram_rate(toks, 3) == pytest.approx(4 / 7)
    assert metrics.repeated_ngram_rate("one two three four".split(), 3) == 0.0
    assert metrics.repeated_ngram_rate(["x"], 3) == 0.0


def test_template_leak():
    assert metrics.template_leak("Paris.\n\nInstruction:\nWhat else?")
    assert metrics.template_leak("Sure.\nResponse: again")
    assert not metrics.template_leak("The response to the instruction is Paris.")


def test_rouge_l_by_hand():
    # LCS("the cat sat on the mat", "the cat on the mat") = 5 tokens; P = 5/5, R = 5/6, F = 10/11
    assert metrics.rouge_l("the cat on the mat", "the cat sat on the mat") == pytest.approx(10 / 11)
    assert metrics.rouge_l("completely different", "the cat sat") == 0.0
    assert metrics.rouge_l_many(["a b", "x"], ["a b", "y"]) == [1.0, 0.0]


def test_bootstrap_ci_brackets_a_constant_shift_and_is_seeded():
    base = [0.1, 0.2, 0.3, 0.4] * 25
    ci = metrics.bootstrap_delta_ci(base, [b + 0.05 for b in base])
    assert ci["mean"] == pytest.approx(0.05) and ci["low"] == pytest.approx(0.05) and ci["high"] == pytest.approx(0.05)
    noisy = metrics.bootstrap_delta_ci(base, base[::-1], seed=1)
    assert noisy["low"] < 0 < noisy["high"] and noisy == metrics.bootstrap_delta_ci(base, base[::-1], seed=1)
    with pytest.raises(ValueError):
        metrics.bootstrap_delta_ci([], [])


def test_aggregate_counts_each_batch_once():
    answers = [
        {"text": "a b", "tokens": 4, "stopped_at_eos": True, "hit_max_length": False, "batch": 0, "batch_seconds": 2.0},
        {"text": "Instruction: x", "tokens": 6, "stopped_at_eos": False, "hit_max_length": True, "batch": 0, "batch_seconds": 2.0},
        {"text": "c", "tokens": 2, "stopped_at_eos": True, "hit_max_length": False, "batch": 1, "batch_seconds": 1.0},
    ]
    agg = metrics.aggregate([metrics.answer_metrics(a) for a in answers], answers)
    assert agg["generation_seconds"] == 3.0 and agg["tokens_per_second"] == 4.0
    assert agg["eos_stop_rate"] == pytest.approx(2 / 3, abs=1e-4) and agg["template_leak_rate"] == pytest.approx(1 / 3, abs=1e-4)
    assert agg["mean_tokens"] == 4.0


def _m(rouge, eos, ppl):
    return {"heldout": {"rouge_l": {"base": rouge[0], "tuned": rouge[1]}},
            "eos_stop_rate": {"base": eos[0], "tuned": eos[1]},
            "perplexity": {"base": ppl[0], "tuned": ppl[1]}}


def test_gate_rules_and_margins():
    cfg = load_config("tiny_test")
    assert gate(cfg, _m((0.20, 0.25), (0.1, 0.8), (10.0, 10.4)))["passed"]  # ppl within 5%
    failed = gate(cfg, _m((0.20, 0.25), (0.1, 0.8), (10.0, 10.6)))
    assert not failed["passed"] and [c["passed"] for c in failed["checks"]] == [True, True, False]
    assert not gate(cfg, _m((0.20, 0.19), (0.1, 0.8), (10.0, 9.0)))["passed"]
    assert gate(load_config("tiny_test", {"gate_rouge_l_margin": "0.02"}), _m((0.20, 0.19), (0.1, 0.8), (10.0, 9.0)))["passed"]
    assert not gate(cfg, _m((0.20, 0.25), (0.5, 0.4), (10.0, 9.0)))["passed"]
    missing = gate(cfg, _m((None, None), (0.1, 0.8), (10.0, 9.0)))
    assert not missing["passed"] and "not measured" in missing["checks"][0]["note"]


def per_example(losses, tokens):
    return [{"response_loss_sum": l * t, "response_tokens": t} for l, t in zip(losses, tokens)]


def test_perplexity_ci_is_paired_token_weighted_and_seeded():
    import math

    rng = random.Random(3)
    tokens = [rng.randint(5, 40) for _ in range(60)]
    base = [rng.uniform(2.0, 3.0) for _ in tokens]
    lower = metrics.bootstrap_perplexity_ci(per_example(base, tokens), per_example([b - 0.3 for b in base], tokens))
    # The point estimates are exp(summed loss / summed tokens), as the finetune stage computes them.
    mean_loss = sum(b * t for b, t in zip(base, tokens)) / sum(tokens)
    assert lower["base"] == pytest.approx(math.exp(mean_loss), rel=1e-4)
    assert lower["tuned"] == pytest.approx(math.exp(mean_loss - 0.3), rel=1e-4)
    # Every example 0.3 nats better: paired, so the interval is narrow and far below zero.
    assert lower["low"] <= lower["mean"] <= lower["high"] < 0 and lower["n"] == 60
    assert metrics.significance(lower, higher_is_better=False) == "better, significant at 95%"
    # Shuffled losses: same distribution, no paired effect; the interval straddles zero.
    shuffled = base[:]
    rng.shuffle(shuffled)
    noisy = metrics.bootstrap_perplexity_ci(per_example(base, tokens), per_example(shuffled, tokens), seed=1)
    assert noisy["low"] < 0 < noisy["high"]
    assert metrics.significance(noisy, higher_is_better=False) == (
        f"no significant change; this test could only detect changes above {noisy['mde_80']:g} (80% power, n = 60)")
    assert noisy == metrics.bootstrap_perplexity_ci(per_example(base, tokens), per_example(shuffled, tokens), seed=1)
    with pytest.raises(ValueError, match="same examples"):
        metrics.bootstrap_perplexity_ci(per_example(base, tokens), per_example(base, [t + 1 for t in tokens]))
    with pytest.raises(ValueError):
        metrics.bootstrap_perplexity_ci([], [])


def test_significance_words_follow_the_interval_and_the_direction():
    up = {"low": 0.01, "high": 0.05, "level": 0.95}
    down = {"low": -0.05, "high": -0.01, "level": 0.95}
    across = {"low": -0.01, "high": 0.02, "level": 0.95}
    assert metrics.significance(up, higher_is_better=True) == "better, significant at 95%"
    assert metrics.significance(up, higher_is_better=False) == "worse, significant at 95%"
    assert metrics.significance(down, higher_is_better=True) == "worse, significant at 95%"
    assert metrics.significance(down, higher_is_better=False) == "better, significant at 95%"
    assert metrics.significance(across, higher_is_better=True) == "no significant change"
    assert metrics.significance(None, higher_is_better=True) == "not measured"


@pytest.mark.parametrize("n", [32, 1000])
def test_no_significant_change_says_what_the_test_could_have_found(n):
    """The same noise, no true change: at n = 32 the test could only have found a large change, at
    n = 1,000 a small one, and the words say which (the minimum detectable effect at 80% power is
    (z(0.975) + z(0.8)) = 2.80 times the paired difference's standard error, here 0.1 / sqrt(n))."""
    rng = random.Random(7)
    noise = [rng.gauss(0.0, 0.1) for _ in range(n)]
    noise = [x - sum(noise) / n for x in noise]  # mean exactly 0: no effect
    spread = (sum(x * x for x in noise) / n) ** 0.5
    ci = metrics.bootstrap_delta_ci([0.0] * n, noise)
    assert ci["low"] < 0 < ci["high"]
    assert ci["mde_80"] == pytest.approx(2.8016 * spread / math.sqrt(n), rel=0.1)
    words = metrics.significance(ci, higher_is_better=True)
    assert words == f"no significant change; this test could only detect changes above {ci['mde_80']:g} (80% power, n = {n})"


def test_the_gate_can_require_a_significant_improvement():
    """gate_require_significant (off by default): within the margins is not enough, the ROUGE-L and
    perplexity intervals must lie wholly on the better side of zero."""
    m = _m((0.20, 0.25), (0.1, 0.8), (10.0, 9.0))
    m["heldout"]["rouge_l_delta_ci"] = {"low": -0.01, "high": 0.11, "mean": 0.05, "n": 32, "level": 0.95}
    m["perplexity"]["delta_ci"] = {"low": -1.9, "high": -0.2, "mean": -1.0, "n": 32, "level": 0.95}
    assert gate(load_config("tiny_test"), m)["passed"]  # the default: margins only
    strict = gate(load_config("tiny_test", {"gate_require_significant": "true"}), m)
    assert [c["passed"] for c in strict["checks"]] == [False, True, True] and not strict["passed"]
    assert "not significantly better" in strict["checks"][0]["note"] and "significantly better" in strict["checks"][0]["rule"]
    m["heldout"]["rouge_l_delta_ci"]["low"] = 0.01
    assert gate(load_config("tiny_test", {"gate_require_significant": "true"}), m)["passed"]
    m["perplexity"]["delta_ci"] = None  # not measured: no evidence
    assert not gate(load_config("tiny_test", {"gate_require_significant": "true"}), m)["passed"]


def test_holm_adjusts_each_p_value_by_its_rank_and_keeps_the_order():
    # By hand: 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04, raised to the 0.06 before it.
    assert metrics.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert metrics.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert metrics.holm([0.02]) == [0.02]  # one variant: nothing to correct
    assert metrics.holm_levels([0.01, 0.04, 0.03]) == pytest.approx([1 - 0.05 / 3, 0.95, 1 - 0.05 / 2])


def test_the_bootstrap_p_value_agrees_with_the_interval():
    rng = random.Random(3)
    tuned = [0.05 + rng.gauss(0, 0.1) for _ in range(200)]
    shifted = metrics.bootstrap_delta_ci([0.0] * 200, tuned)
    assert shifted["low"] > 0 and shifted["p"] < 0.05
    rng = random.Random(4)
    noise = metrics.bootstrap_delta_ci([0.0] * 200, [rng.gauss(0, 0.1) for _ in range(200)])
    assert noise["low"] < 0 < noise["high"] and noise["p"] > 0.05
    wider = metrics.bootstrap_delta_ci([0.0] * 200, tuned, level=0.99)
    assert wider["low"] < shifted["low"] and wider["mde_80"] > shifted["mde_80"]  # a stricter test detects less


def test_corrected_verdicts_need_holms_adjusted_p_value():
    ci = {"low": 0.004, "high": 0.05, "mean": 0.02, "n": 80, "level": 1 - 0.05 / 3, "mde_80": 0.03, "p": 0.02}
    strict = metrics.corrected(ci, 0.06, 3)
    assert metrics.direction(strict) == 0
    assert metrics.significance(strict, higher_is_better=True) == (
        "no significant change after Holm's correction for 3 variants compared (adjusted p = 0.06); "
        "this test could only detect changes above 0.03 (80% power, n = 80)")
    passed = metrics.corrected(ci, 0.02, 3)
    assert metrics.significance(passed, higher_is_better=True) == (
        "better, significant at 95% after Holm's correction for 3 variants compared (adjusted p = 0.02)")
    m = _m((0.20, 0.25), (0.1, 0.8), (10.0, 9.0))
    m["perplexity"]["delta_ci"] = {"low": -1.9, "high": -0.2, "mean": -1.0, "n": 32, "level": 0.95}
    m["heldout"]["rouge_l_delta_ci"] = strict
    require = load_config("tiny_test", {"gate_require_significant": "true"})
    assert not gate(require, m)["checks"][0]["passed"] and "Holm" in gate(require, m)["checks"][0]["rule"]
    m["heldout"]["rouge_l_delta_ci"] = passed
    assert gate(require, m)["passed"]
