"""`python -m qtarget_jax.generate` (generate/__main__.py) and `generate.stream` on the tiny
decoder exported as an HF folder with the tiny chat tokenizer: the answer streams, greedy output
equals `problems.solve`'s, sampling equals `generate`'s at the same seed, bad input is one line
with exit code 2."""
import io
import os
import subprocess
import sys

import pytest

from qtarget_jax.generate import SamplingConfig, generate
from qtarget_jax.generate.__main__ import main
from qtarget_jax.generate.stream import stream
from qtarget_jax.models.export import export_hf
from qtarget_jax.problems import EvalExample, solve

PROMPT = "What is 7 + 5?"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def folder(tiny_model, tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_hf")
    export_hf(tiny_model, tiny_model.cfg, str(path), tokenizer=tokenizer)
    return str(path)


def _cli(capsys, *argv, stdin=None):
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        code = main(list(argv))
    finally:
        sys.stdin = sys.__stdin__
    out = capsys.readouterr()
    return code, out.out, out.err


def test_greedy_answer_equals_solve(folder, capsys):
    from qtarget_jax.evaluate import load_source
    model, tok = load_source(folder)
    code, out, err = _cli(capsys, "--model", folder, "--max-new-tokens", "12", PROMPT)
    assert (code, err) == (0, "")
    ex = EvalExample("q", [{"role": "user", "content": PROMPT}], None, "12")
    solve(model, tok, [ex], max_new_tokens=12, out_path=os.path.join(folder, "solve.jsonl"))
    with open(os.path.join(folder, "solve.jsonl")) as f:
        import json
        want = json.loads(f.readline())["output"]
    assert out == want + "\n" and want


def test_stream_yields_token_by_token_and_sampling_matches_generate(tiny_model, tokenizer):
    for config in (SamplingConfig(max_new_tokens=10),
                   SamplingConfig(max_new_tokens=10, temperature=1.0)):
        pieces = list(stream(tiny_model, tokenizer, PROMPT, config, seed=3, eos_ids=[2]))
        want = generate(tiny_model, tokenizer, [PROMPT], config, seed=3, eos_ids=[2])[0]
        # one piece per new token (one more if the text ends in an undecodable byte)
        assert len(want.token_ids) <= len(pieces) <= len(want.token_ids) + 1
        assert len(want.token_ids) > 1
        assert "".join(pieces) == want.text


def test_interactive_loop_reads_lines_until_an_empty_one(folder, capsys):
    code, out, err = _cli(capsys, "--model", folder, "--max-new-tokens", "6",
                          stdin=f"{PROMPT}\nab\n\nnot read\n")
    _, one, _ = _cli(capsys, "--model", folder, "--max-new-tokens", "6", PROMPT)
    assert (code, err) == (0, "")
    assert out.count("\n") == 2 and out.startswith(one)


@pytest.mark.parametrize("argv, message", [
    (["--model", "/no/such/model"], "--model /no/such/model: no such file or folder"),
    (["--model", "{folder}", "   "], "empty prompt"),
    (["--model", "{folder}", "--max-new-tokens", "250", "x" * 20],
     r"prompt: prompt has \d+ tokens \+ max_new_tokens 250 > context length 256"),
])
def test_bad_input_is_one_line_and_exit_2(folder, capsys, argv, message):
    import re
    code, out, err = _cli(capsys, *[a.format(folder=folder) for a in argv])
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(message, err), err


def test_module_runs_as_a_program(folder):
    proc = subprocess.run([sys.executable, "-m", "qtarget_jax.generate", "--model", folder,
                           "--max-new-tokens", "4", PROMPT], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert proc.returncode == 0 and proc.stdout.endswith("\n"), proc.stderr[-2000:]
