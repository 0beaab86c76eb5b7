from tasks.batching import encode
from tasks.models import load_tokenizer
from tasks.preprocess import format_example, format_prompt


def example(instruction, response):
    return {"prompt": format_prompt(instruction), "text": format_example(instruction, response)}


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
