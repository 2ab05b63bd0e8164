"""Config: layering, overrides, errors that name the key and suggest the closest valid one."""
import pathlib

import pytest
import yaml

from qtarget_jax.config import ConfigError, load_config, parse_override, save_resolved

REPO_CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1e-3", "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("optimm.lr=1e-3", "unknown key 'optimm'; did you mean 'optim'?"),
    ("optim.lr=fast", "optim.lr='fast': expected float, got str"),
    ("schedule.kind=cosin", "must be one of ['cosine', 'linear', 'constant']; did you mean "
                            "'cosine'?"),
    ("data.batch_size=2.5", "data.batch_size=2.5: expected int"),
    ("model.name=smol", "model.name='smol'"),
    ("data.microbatches=3", "data.batch_size (8) must be a positive multiple of "
                            "data.microbatches (3)"),
    ("optim.lr", "expected key=value"),
    ("loss.normalization=constant", "loss.normalization=constant needs loss.normalizer > 0"),
])
def test_errors_name_key_and_suggest(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, (override,))
    assert message in str(err.value)


@pytest.mark.parametrize("key, message", [
    ("model.dtype", "key 'model.dtype' was renamed model.compute_dtype"),
    ("model.config.dtype", "key 'model.config.dtype' is not set here: ModelConfig.dtype was "
                           "renamed compute_dtype; write model.compute_dtype"),
    ("model.config.compute_dtype", "write model.compute_dtype"),
    ("model.teacher_config.dtype", "write model.compute_dtype"),
    ("model.config.param_dtype", "float32 master weights for the student, "
                                 "model.teacher_dtype for the teacher"),
])
def test_old_dtype_keys_name_their_replacement(tmp_path, key, message):
    """One dtype vocabulary: a job file or override with an old dtype key fails at load."""
    section, *rest = key.split(".")[1:]
    job = tmp_path / "job.yaml"
    body = {section: {rest[0]: "bfloat16"}} if rest else {section: "bfloat16"}
    job.write_text(yaml.safe_dump({"model": body}))
    for job_file, overrides in ((job, ()), (None, (f"{key}=bfloat16",))):
        with pytest.raises(ConfigError) as err:
            load_config(job_file, overrides)
        assert message in str(err.value), str(err.value)


def test_layering_order_and_overridden_report():
    loaded = load_config(REPO_CONFIGS / "tiny_test.yaml", ("optim.lr=3e-4", "run.steps=5"))
    cfg = loaded.config
    assert cfg.model.source == "init"  # from models/tiny.yaml
    assert cfg.model.config["hidden_size"] == 32
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)  # "3e-4": YAML 1.1 str
    assert cfg.run.steps == 5
    assert cfg.optim.b2 == 0.95  # untouched base value
    assert loaded.sources[0].endswith("base.yaml") and loaded.sources[1].endswith("tiny.yaml")
    assert any(o.startswith("run.steps: 12 (") and o.endswith("-> 5 (cli 'run.steps=5')")
               for o in loaded.overridden), loaded.overridden


def test_free_form_dicts_merge_and_preset_replaces():
    cfg = load_config(None, ("loss.target.z_loss=0.001",)).config
    assert cfg.loss.target == {"preset": "sft", "z_loss": 0.001}
    cfg = load_config(REPO_CONFIGS / "smollm2_target_sft.yaml", ("loss.target.eta=0.3",)).config
    assert cfg.loss.target == {"preset": "target_sft", "eta": 0.3, "gamma_floor": 0.5}


def test_resolved_config_round_trips(tmp_path):
    loaded = load_config(REPO_CONFIGS / "tiny_test.yaml", ("optim.lr=0.002",))
    save_resolved(loaded, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "overridden: optim.lr" in text
    assert load_config(tmp_path / "config.yaml").config == loaded.config


def test_parse_override_types():
    assert parse_override("a.b=true") == {"a": {"b": True}}
    assert parse_override("a=null") == {"a": None}
    assert parse_override("a=1e-5") == {"a": 1e-5}
    assert parse_override("a=x=y") == {"a": "x=y"}


def _leaves(tree: dict, prefix: str = "") -> dict:
    """{"optim.lr": 0.01, "loss.target": {...}, ...}: free-form dicts stay whole."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and prefix + key not in ("model.config", "loss.target"):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _expected(*files: pathlib.Path) -> dict:
    """Reference layering read straight from the YAML: later files win leaf by leaf; free-form
    dicts merge key by key unless the later one names a preset (then it replaces)."""
    out: dict = {}
    for path in files:
        for key, value in _leaves(yaml.safe_load(path.read_text()) or {}).items():
            if isinstance(value, dict) and key in out and "preset" not in value:
                value = {**out[key], **value}
            out[key] = value
    return out


def _resolved(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


JOBS = sorted(p.name for p in REPO_CONFIGS.glob("*.yaml"))
MODELS = sorted(p.stem for p in (REPO_CONFIGS / "models").glob("*.yaml"))


@pytest.mark.parametrize("job", JOBS)
def test_every_shipped_job_resolves_to_its_files_values(job):
    """Each configs/*.yaml (base.yaml too) loads, and every key that base.yaml, its model file
    or the job sets has the value the layered YAML gives."""
    path = REPO_CONFIGS / job
    name = (yaml.safe_load(path.read_text()).get("model") or {}).get("name", "smollm2")
    loaded = load_config(path)
    model_file = REPO_CONFIGS / "models" / f"{name}.yaml"
    assert loaded.sources == (str(REPO_CONFIGS / "base.yaml"), str(model_file), str(path))
    want = _expected(REPO_CONFIGS / "base.yaml", model_file, path)
    assert len(want) > 30  # base.yaml alone sets 40-odd keys
    for key, value in want.items():
        got = _resolved(loaded.config, key)
        if isinstance(got, float) and isinstance(value, (str, int)):  # YAML 1.1: "9.89e+14"
            value = float(value)
        assert got == value and type(got) is type(value), (key, got, value)


def test_base_yaml_as_a_job_changes_nothing():
    assert load_config(REPO_CONFIGS / "base.yaml").config == load_config(None).config


@pytest.mark.parametrize("name", MODELS)
def test_every_model_file_is_selectable_by_name(name):
    loaded = load_config(None, (f"model.name={name}",))
    model_file = REPO_CONFIGS / "models" / f"{name}.yaml"
    assert loaded.sources[1] == str(model_file)
    for key, value in _expected(model_file).items():
        assert _resolved(loaded.config, key) == value, key
