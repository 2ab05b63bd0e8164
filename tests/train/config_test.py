"""Config: layering, overrides, errors that name the key and suggest the closest valid one."""
import pathlib

import pytest

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
    assert cfg.loss.target == {"preset": "target_sft", "eta": 0.3}


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


def test_all_shipped_configs_load():
    for path in REPO_CONFIGS.glob("*.yaml"):
        if path.name != "base.yaml":
            load_config(path)
