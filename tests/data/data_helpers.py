"""Helpers for tests/data: a tiny byte-level BPE tokenizer with a ChatML template, JSONL rows,
NuminaMath-CoT-style Parquet files.

The template mirrors the SmolLM2 shape (a default system turn when none is given,
``<|im_start|>role\\ncontent<|im_end|>\\n``), so masking is tested on the same layout.
"""
import json
import os

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "You are a tiny test model.", "system user assistant", "What is 2 + 3?",
    "2 + 3 = 5\n#### 5", "Tom has 4 apples. He gets 3 more. How many apples now?",
    "4 + 3 = 7 apples.\n#### 7", "hello world, how are you today?", "I am fine, thanks!",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 20 30 40 50 * - = ####",
]


def build_tiny_tokenizer():
    """A PreTrainedTokenizerFast trained in memory (no files, no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 5, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", bos_token="<|im_start|>",
                                   chat_template=CHATML)


def write_jsonl(path, rows):
    """Rows are dicts (JSON-encoded) or raw strings (written as they are)."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def chat_row(user, assistant, system=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": msgs}


def numina_rows(n, start=0):
    """Rows with NuminaMath-CoT's columns: source, problem, solution, messages."""
    out = []
    for i in range(start, start + n):
        problem, solution = f"What is {i} + 1?", f"{i} + 1 = {i + 1}, so $\\boxed{{{i + 1}}}$."
        out.append({"source": "olympiads" if i % 2 else "cn_k12", "problem": problem,
                    "solution": solution,
                    "messages": [{"content": problem, "role": "user"},
                                 {"content": solution, "role": "assistant"}]})
    return out


def write_parquet(path, rows, row_group_size=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), str(path), row_group_size=row_group_size)
    return str(path)
