"""Assistant-only masking and the label shift, at exact positions, against independent references.

References used here: (1) the inference view: the prompt rendered with the generation prompt,
tokenised alone, ends exactly where supervision starts; (2) a character-offset mask: tokenise the
whole rendered text with offsets and mark tokens that start inside
``<|im_start|>assistant\\n(...<|im_end|>)`` found by a regex.
"""
import re

import numpy as np
import pytest
from data_helpers import CHATML

from qtarget_jax.data import chat, records

M = records.Message
SIMPLE = (M("user", "What is 2 + 3?"), M("assistant", "2 + 3 = 5\n#### 5"))
MULTI = (M("system", "You are a tiny test model."), M("user", "hello world"),
         M("assistant", "I am fine, thanks!"), M("user", "What is 2 + 3?"),
         M("assistant", "2 + 3 = 5\n#### 5"))
CONVS = [SIMPLE, MULTI, (M("user", "Tom has 4 apples."), M("assistant", " 4 + 3 = 7 apples.  "))]


def _dicts(conv):
    return records.conversation_to_dicts(conv)


def _offset_reference(tok, conv):
    text = tok.apply_chat_template(_dicts(conv), tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [m.span(1) for m in re.finditer(
        r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", text, flags=re.DOTALL)]
    mask = [any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]]
    return np.array(enc["input_ids"]), np.array(mask)


@pytest.mark.parametrize("conv", CONVS, ids=["simple", "multi_turn", "spaces"])
def test_mask_matches_offset_reference(tiny_tokenizer, conv):
    ids, mask = chat.tokenize_conversation(tiny_tokenizer, conv, "t:1")
    ref_ids, ref_mask = _offset_reference(tiny_tokenizer, conv)
    assert ids.dtype == np.int32 and mask.dtype == bool
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)


def test_first_supervised_label_exact(tiny_tokenizer):
    tok = tiny_tokenizer
    ids, mask = chat.tokenize_conversation(tok, SIMPLE, "t:1")
    ex = chat.to_training_example(ids, mask, 64, truncate=False, where="t:1")
    prompt = tok.apply_chat_template(_dicts(SIMPLE[:1]), tokenize=False,
                                     add_generation_prompt=True)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    sup = np.flatnonzero(ex.labels != chat.IGNORE)
    # Golden for this tokenizer: 29 prompt tokens (system + user + "<|im_start|>assistant\n").
    # A change here means the shift or the header masking moved: check before updating.
    assert n_prompt == 29
    assert sup[0] == n_prompt - 1 == 28
    assert tok.decode([ex.tokens[28]]) == "\n"            # input: the header's newline
    assert tok.decode([ex.labels[28]]) == "2"             # label: the first answer token
    assert ex.labels[27] == chat.IGNORE                   # "t" of "assistant" -> "\n": no
    # Last supervised label is <|im_end|> (the model learns to stop); the "\n" after is not.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert ex.labels[sup[-1]] == im_end and sup[-1] == len(ex) - 2
    assert ex.labels[-1] == chat.IGNORE and tok.decode([ids[-1]]) == "\n"
    # Supervised positions are contiguous and labels are exactly the next tokens there.
    np.testing.assert_array_equal(sup, np.arange(28, len(ex) - 1))
    np.testing.assert_array_equal(ex.labels[sup], ids[sup + 1])
    np.testing.assert_array_equal(ex.tokens, ids[:-1])


def test_multi_turn_supervises_only_assistant_turns(tiny_tokenizer):
    tok = tiny_tokenizer
    ids, mask = chat.tokenize_conversation(tok, MULTI, "t:1")
    text = tok.decode(ids[mask])
    assert text == "I am fine, thanks!<|im_end|>2 + 3 = 5\n#### 5<|im_end|>"
    assert "hello" not in text and "assistant" not in text and "system" not in text


def test_too_long_and_truncation(tiny_tokenizer):
    ids, mask = chat.tokenize_conversation(tiny_tokenizer, SIMPLE, "f.jsonl:9")
    n = len(ids) - 1
    full = chat.to_training_example(ids, mask, n, truncate=False, where="f.jsonl:9")
    assert len(full) == n and not full.truncated
    with pytest.raises(records.BadRow, match=r"f\.jsonl:9: too_long: 38 positions > seq_len=37"):
        chat.to_training_example(ids, mask, n - 1, truncate=False, where="f.jsonl:9")
    cut = chat.to_training_example(ids, mask, 31, truncate=True, where="f.jsonl:9")
    assert cut.truncated and len(cut) == 31
    np.testing.assert_array_equal(cut.labels, full.labels[:31])
    # 28 positions hold only the prompt: no supervised label would be left.
    with pytest.raises(records.BadRow, match="prompt_too_long"):
        chat.to_training_example(ids, mask, 28, truncate=True, where="f.jsonl:9")
    chat.to_training_example(ids, mask, 29, truncate=True, where="f.jsonl:9")


def test_prefix_unstable_template_is_an_error(tiny_tokenizer):
    tok = tiny_tokenizer
    old = tok.chat_template
    tok.chat_template = "{{ messages|length }}" + CHATML  # the count changes every prefix
    try:
        with pytest.raises(ValueError, match="t:5: chat template is not prefix-stable"):
            chat.tokenize_conversation(tok, SIMPLE, "t:5")
    finally:
        tok.chat_template = old
