"""Config-time checks: the target spec and the files a run reads fail as one `config error:`
line naming the key, before JAX loads a model."""
import subprocess
import sys
import pathlib

import pytest

from qtarget_jax.config import ConfigError, check_sources, load_config

REPO = pathlib.Path(__file__).resolve().parents[2]
JOB = REPO / "configs" / "tiny_test.yaml"


@pytest.mark.parametrize("override, message", [
    ("loss.target.preset=target_stf", "loss.target="),
    ("loss.target.eta=2.0", "loss.target="),
])
def test_bad_target_is_a_config_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(JOB, (override,))


@pytest.mark.parametrize("override, key", [
    ("model.source=/no/such/model", "model.source='/no/such/model': no such folder"),
    ("model.teacher=/no/such/teacher", "model.teacher='/no/such/teacher': no such folder"),
    ("model.teacher=/no/such/teacher.gguf", "model.teacher='/no/such/teacher.gguf': no such"),
    ("model.teacher=init", "model.teacher='init': a teacher must be a trained model"),
    ("model.tokenizer=/no/such/tok", "model.tokenizer='/no/such/tok'"),
    ("data.path=/no/such/data", "data.path='/no/such/data': no such folder"),
    ("eval.problems=/no/such.jsonl", "eval.problems='/no/such.jsonl': no such file"),
])
def test_missing_sources_name_the_key(tmp_path, override, key):
    (tmp_path / "data").mkdir()
    cfg = load_config(JOB, (f"data.path={tmp_path / 'data'}", override)).config
    with pytest.raises(ConfigError, match=key.replace("(", r"\(").replace(".", r"\.")):
        check_sources(cfg)


def test_folder_without_config_json_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    cfg = load_config(JOB, (f"data.path={tmp_path}", f"model.teacher={tmp_path / 'm'}")).config
    with pytest.raises(ConfigError, match="model.teacher=.*no config.json"):
        check_sources(cfg)
    (tmp_path / "m" / "hf").mkdir()
    (tmp_path / "m" / "hf" / "config.json").write_text("{}")  # an exported run
    check_sources(cfg)


def _cli_error_lines(*overrides: str) -> list[str]:
    """stderr lines of `train.py --config JOB <overrides>`, which must exit with status 2."""
    out = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(JOB),
                          *overrides],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                              "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 2, out.stderr[-2000:]
    return out.stderr.strip().splitlines()


def test_cli_prints_one_config_error_line_before_jax(tmp_path):
    lines = _cli_error_lines("model.teacher=/no/such/teacher", f"data.path={tmp_path}",
                             f"run.dir={tmp_path / 'run'}")
    assert len(lines) == 1 and lines[0].startswith("config error: model.teacher="), lines
    assert not (tmp_path / "run").exists()


def test_cli_old_model_dtype_key_is_one_config_error_line(tmp_path):
    lines = _cli_error_lines("model.dtype=bfloat16", f"run.dir={tmp_path / 'run'}")
    assert len(lines) == 1 and lines[0].startswith("config error: "), lines
    assert "'model.dtype' was renamed model.compute_dtype" in lines[0], lines
