"""The NuminaMath-CoT recipe of docs/data.md, run as documented on small Parquet shards.

The commands are read from the doc's ``recipe:numina`` block, so the doc cannot drift from what
works. Only what CI cannot afford is swapped: the tokenizer (a tiny one instead of SmolLM2's)
and, for the training run, the model (configs/tiny_test.yaml instead of SmolLM2) and its
length (2 steps); every data key of the documented command is used as written.
"""
import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest
from data_helpers import numina_rows, write_parquet

REPO = pathlib.Path(__file__).resolve().parents[2]


def recipe_commands() -> list[list[str]]:
    text = (REPO / "docs" / "data.md").read_text()
    block = text.split("<!-- recipe:numina")[1].split("<!-- /recipe -->")[0]
    code = block.split("```bash\n")[1].split("```")[0].replace("\\\n", " ")
    return [shlex.split(line) for line in code.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def run(argv, cwd):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, f"{shlex.join(argv)}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """The shards where the recipe expects them, and the documented `prepare` run there."""
    root = tmp_path_factory.mktemp("recipe")
    data = root / "numina" / "data"
    write_parquet(data / "train-00000-of-00002.parquet", numina_rows(30))
    write_parquet(data / "train-00001-of-00002.parquet", numina_rows(30, start=30))
    write_parquet(data / "test-00000-of-00001.parquet", numina_rows(8, start=500))
    cmds = recipe_commands()
    assert [c[:3] for c in cmds] == [["python", "-m", "qtarget_jax.data"]] * 2 + [
        ["python", "train.py", "--config"]]
    prepare, stats, train = cmds
    assert prepare[3] == "prepare" and stats[3] == "stats"
    out = run([sys.executable] + prepare[1:], root)
    return {"root": root, "stats": stats, "train": train, "prepare_out": out}


def test_recipe_prepare_and_stats(recipe, tiny_tokenizer_dir):
    from qtarget_jax.data import sources

    root = recipe["root"]
    assert "rows: train=60 test=8 (68 in" in recipe["prepare_out"]
    assert "skipped 0 rows" in recipe["prepare_out"]
    folder = root / "data" / "tfds" / "jsonl_sft" / "numina" / "1.0.0"
    train, test = (sources.open_split(str(folder), s) for s in ("train", "test"))
    assert (len(train), len(test)) == (60, 8)
    assert {json.loads(train[i]["metadata"])["source"] for i in range(len(train))} == {
        "olympiads", "cn_k12"}
    out = run([sys.executable] + recipe["stats"][1:] + ["--tokenizer", tiny_tokenizer_dir,
                                                        "--json"], root)
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["split"] == "train" and stats["records"] == stats["examples"] == 60
    assert stats["truncated"] == 0 and stats["supervised"] > 0


@pytest.mark.slow
def test_recipe_training_run(recipe, tiny_tokenizer_dir):
    """The documented train.py command with the tiny model, 2 steps (about a minute)."""
    root = recipe["root"]
    argv = [sys.executable, str(REPO / "train.py")] + recipe["train"][2:]
    i = argv.index("--config")
    assert argv[i + 1] == "configs/smollm2_target_sft.yaml"
    argv[i + 1] = str(REPO / "configs" / "tiny_test.yaml")
    argv += [f"model.tokenizer={tiny_tokenizer_dir}", "model.config.vocab_size=512",
             "run.steps=2", "data.seq_len=128", "eval.problems_limit=2",
             "eval.max_new_tokens=8", "logging.tensorboard=false", "logging.plot=false",
             "checkpoint.export_hf=true"]  # as configs/smollm2_target_sft.yaml does
    out = run(argv, root)
    run_dir = root / "runs" / "numina"
    # The printed summary: before -> after, and a chat command for the exported model.
    assert "held-out (numina/data/test-00000-of-00001.parquet), before -> after:" in out
    assert any(line.split()[:3] == ["exact", "match", "(first"] and line.split()[-2] == "->"
               for line in out.splitlines()), out
    assert 'chat: python -m qtarget_jax.generate --model runs/numina "What is 7 + 5?"' in out
    assert (run_dir / "hf" / "config.json").is_file()  # what --model <run folder> loads
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in steps if "loss" in r} == {1, 2}
    problems = [json.loads(line)
                for line in (run_dir / "problems_step2.jsonl").read_text().splitlines()]
    assert [p["gold"] for p in problems] == ["501", "502"]   # from the test rows' \boxed{}
