"""Fixtures for train tests: a character tokenizer and the synthetic set, built locally."""
import pytest


def write_char_tokenizer(folder) -> str:
    """A 98-token character tokenizer with a prefix-stable chat template (no downloads)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                                   pad_token="<eos>")
    fast.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
                          "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    fast.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def char_tokenizer(tmp_path_factory) -> str:
    return write_char_tokenizer(tmp_path_factory.mktemp("chartok"))


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> str:
    """The synthetic set (48 train problems x 2 phrasings, 8 test) prepared as a tfds folder."""
    from qtarget_jax.data import prepare_dataset
    from qtarget_jax.data import synthetic

    root = tmp_path_factory.mktemp("synth")
    files = {}
    for split, rows in synthetic.generate(48, 8, seed=0).items():
        files[split] = [str(root / f"{split}.jsonl")]
        synthetic.write_jsonl(rows, files[split][0])
    path, _ = prepare_dataset(files, str(root / "tfds"), "synth")
    return str(path)
