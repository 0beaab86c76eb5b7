import pytest

from tasks.text.batching import encode
from tasks.modeling.presets import load_tokenizer
from tasks.text import prompt_template as pt

pytestmark = pytest.mark.model


def example(instruction, response):
    return {"prompt": pt.instruction_prompt(instruction, "tutorial"), "text": pt.example(instruction, response, "tutorial")}


def test_pack_shift_and_masks():
    tok = load_tokenizer("tiny:gemma")
    rows = [example("Name a colour.", "Blue."), example("Say a long thing " * 20, "Okay " * 40)]
    enc = encode(tok, rows, sequence_length=64)
    ids0 = [int(i) for i in tok(rows[0]["text"])]
    full = [tok.start_token_id] + ids0 + [tok.end_token_id]
    n = len(full)
    assert enc["token_ids"][0, : n - 1].tolist() == full[:-1]
    assert enc["labels"][0, : n - 1].tolist() == full[1:]  # labels are the next token
    assert enc["label_mask"][0].sum() == n - 1 and enc["padding_mask"][0].sum() == n
    prompt_tokens = len(tok(rows[0]["prompt"]))
    resp = enc["response_mask"][0]
    assert not resp[:prompt_tokens].any() and resp[prompt_tokens : n - 1].all() and not resp[n - 1 :].any()
    # The last label of the response row is <eos>.
    assert enc["labels"][0, n - 2] == tok.end_token_id
    # A row longer than the sequence is truncated: every position real, no <eos>.
    assert enc["label_mask"][1].all() and tok.end_token_id not in enc["labels"][1].tolist()
    assert (enc["weights"] == enc["label_mask"]).all()
    only = encode(tok, rows, sequence_length=64, loss_tokens="response")
    assert (only["weights"] == only["response_mask"]).all() and only["weights"][0].sum() < enc["weights"][0].sum()


# -- the step plan of both training modes -------------------------------------------------------

import itertools  # noqa: E402
import random  # noqa: E402

import numpy as np  # noqa: E402

from tasks.text.batching import Step, choose_widths, epoch_orders, plan_batches, plan_orders, step_arrays  # noqa: E402


def lengths_like_dolly(n, seed=0, sequence_length=256):
    rng = random.Random(seed)
    return [min(sequence_length, max(8, int(rng.lognormvariate(4.2, 0.7)))) for _ in range(n)]


def plan(lengths, mode, **kw):
    args = dict(batch_size=4, epochs=2, seed=3, sequence_length=256, mode=mode, bucket_multiple=16, bucket_shapes=4)
    return plan_batches(lengths, **{**args, **kw})


def test_tutorial_plan_is_the_seeded_order_at_full_width():
    lengths = lengths_like_dolly(30)
    steps = plan(lengths, "tutorial")
    orders = epoch_orders(30, 2, 3)
    # What finetune did before train modes existed: each epoch's permutation cut into batches.
    assert [s.rows for s in steps] == [o[i : i + 4] for o in orders for i in range(0, 30, 4)]
    assert {s.width for s in steps} == {256}
    assert plan_orders(steps, 30) == orders


@pytest.mark.parametrize("n, batch_size, epochs", [(30, 4, 2), (64, 4, 1), (257, 8, 3), (5, 4, 1)])
def test_fast_plan_trains_every_example_once_per_epoch_in_bounded_widths(n, batch_size, epochs):
    lengths = lengths_like_dolly(n, seed=n)
    steps = plan(lengths, "fast", batch_size=batch_size, epochs=epochs)
    orders = plan_orders(steps, n)
    assert len(orders) == epochs and all(sorted(o) == list(range(n)) for o in orders)
    assert len(steps) == epochs * -(-n // batch_size)
    assert sum(len(s.rows) < batch_size for s in steps) == (epochs if n % batch_size else 0)
    widths = {s.width for s in steps}
    assert len(widths) <= 4 and all(w % 16 == 0 or w == 256 for w in widths) and max(widths) <= 256
    for s in steps:
        assert max(lengths[i] for i in s.rows) <= s.width  # nothing truncated beyond the tutorial's
    # Far less padding than the tutorial's.
    padded = sum(batch_size * s.width for s in steps)
    if n >= 30:
        assert padded < 0.6 * len(steps) * batch_size * 256


def test_fast_plan_is_a_pure_function_of_lengths_and_config():
    lengths = lengths_like_dolly(100)
    assert plan(lengths, "fast") == plan(list(lengths), "fast")
    assert plan(lengths, "fast") != plan(lengths, "fast", seed=4)
    # In a fresh interpreter (other hash seed) too: a resumed run rebuilds the same plan.
    import json
    import subprocess
    import sys

    code = ("import json,sys; from tasks.text.batching import plan_batches; print(json.dumps(plan_batches(json.loads(sys.argv[1]), "
            "batch_size=4, epochs=2, seed=3, sequence_length=256, mode='fast')))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(lengths)], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONHASHSEED": "123"})
    assert [Step(*s) for s in json.loads(out.stdout)] == [Step(s.rows, s.width) for s in plan(lengths, "fast")]


def test_choose_widths_pads_least():
    rng = random.Random(1)
    for _ in range(20):
        needed = [rng.randint(1, 100) for _ in range(rng.randint(1, 25))]
        k = rng.randint(1, 4)
        got = choose_widths(needed, 100, 8, k)
        cands = sorted({min(-(-n // 8) * 8, 100) for n in needed})

        def cost(ws):
            return sum(min(w for w in ws if w >= min(-(-n // 8) * 8, 100)) for n in needed)

        best = min(cost(c + (cands[-1],)) for r in range(0, k) for c in itertools.combinations(cands[:-1], r))
        assert len(got) <= k and got[-1] == cands[-1] and cost(got) == best


def test_unlimited_widths_give_every_batch_the_next_multiple():
    needed = [3, 17, 40, 41, 100, 256, 300]
    assert choose_widths(needed, 256, 16, 0) == [16, 32, 48, 112, 256]
    lengths = [5, 9, 30, 31, 64, 65, 200, 256] * 4
    plan = plan_batches(lengths, batch_size=2, epochs=1, seed=0, sequence_length=256, mode="fast",
                        bucket_multiple=8, bucket_shapes=0)
    for step in plan:
        assert step.width == min(-(-max(lengths[i] for i in step.rows) // 8) * 8, 256)


def test_short_fast_batch_is_filled_with_zero_weight_rows_and_rescaled():
    tok = load_tokenizer("tiny:gemma")
    rows = [example("Name a colour.", "Blue."), example("Name a fruit.", "A pear, often green.")]
    enc = encode(tok, rows, sequence_length=64)
    width = int(enc["padding_mask"].sum(axis=1).max())
    x, y, w = step_arrays(enc, Step([1, 0], width), batch_size=4)
    assert x["token_ids"].shape == y.shape == w.shape == (4, width)
    np.testing.assert_array_equal(x["token_ids"][:2], enc["token_ids"][[1, 0], :width])
    assert (w[2:] == 0).all()
    np.testing.assert_allclose(w[:2], enc["weights"][[1, 0], :width] * 2)
    # Nothing of the loss lies beyond the width.
    assert enc["weights"][:, width:].sum() == 0
    x, y, w = step_arrays(enc, Step([0, 1], 64))
    assert x["token_ids"].shape == (2, 64) and (w == enc["weights"]).all()
