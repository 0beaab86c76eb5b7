"""Token batches for training and scoring, built the same way for every Gemma generation.

keras-hub's preprocessors disagree on training input: Gemma 1/2 take plain strings and put every
token in the loss, Gemma 3 wants {"prompts", "responses"} and masks the prompt out. The pipeline
tokenizes itself instead, so one code path serves all of them and the loss mask is a setting:
`all` (the Keras tutorial: prompt and response tokens) or `response` (the response and <eos> only).
"""

from __future__ import annotations


def encode(tokenizer, examples: list[dict], sequence_length: int, loss_tokens: str = "all") -> dict:
    """Pack `<bos> text <eos>` per example, truncated/padded to sequence_length + 1, then shift.

    Each example needs `prompt` and `text` (the prompt followed by the response). Returns numpy
    arrays: token_ids, padding_mask (inputs), labels, label_mask (real labels), weights (the loss
    mask for `loss_tokens`),
    response_mask (labels that belong to the response) and real_tokens (label count per row).
    """
    import numpy as np

    texts = [e["text"] for e in examples]
    full = _ids(tokenizer, texts)
    prompts = _ids(tokenizer, [e["prompt"] for e in examples])
    bos, eos, pad = tokenizer.start_token_id, tokenizer.end_token_id, tokenizer.pad_token_id
    n, width = len(examples), sequence_length + 1
    packed = np.full((n, width), pad, dtype="int32")
    real = np.zeros((n, width), dtype=bool)
    prompt_len = np.zeros(n, dtype="int32")
    for i, (ids, p_ids) in enumerate(zip(full, prompts)):
        row = ([bos] + ids + [eos])[:width]
        packed[i, : len(row)] = row
        real[i, : len(row)] = True
        # The prompt's tokens are the common prefix: tokenizing prompt+response may merge across
        # the boundary, and then the merged token counts as response.
        k = 0
        while k < min(len(p_ids), len(ids)) and p_ids[k] == ids[k]:
            k += 1
        prompt_len[i] = k
    labels = packed[:, 1:]
    label_mask = real[:, 1:]
    # Label t predicts token t+1; tokens 1..k are the prompt (token 0 is <bos>).
    response_mask = label_mask & (np.arange(sequence_length)[None, :] >= prompt_len[:, None])
    weights = response_mask if loss_tokens == "response" else label_mask
    return {
        "token_ids": packed[:, :-1],
        "padding_mask": real[:, :-1],
        "labels": labels,
        "label_mask": label_mask,
        "weights": weights.astype("float32"),
        "response_mask": response_mask,
        "real_tokens": label_mask.sum(axis=1),
    }


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    out = tokenizer(texts)
    return out.to_list() if hasattr(out, "to_list") else [list(map(int, x)) for x in out]
