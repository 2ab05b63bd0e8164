"""Shared by the experiment tests: the runner scripts loaded as modules, the tiny random model
exported as an HF folder, and the tiny TrainConfig job every tiny experiment trains with."""
import importlib.util
import pathlib
import sys

import yaml
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "models"))

from io_helpers import make_tokenizer  # noqa: E402

from qtarget_jax.models import Decoder, ModelConfig  # noqa: E402
from qtarget_jax.models.export import export_hf  # noqa: E402

TINY = dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64,
            num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
            max_position_embeddings=512, tie_word_embeddings=True)


def load_script(name: str, prefix: str):
    """experiments/<name>.py as the module `<prefix>_<name>`; experiments/ is on sys.path, as
    when the script runs (a script may import another: mass.py imports run)."""
    if str(ROOT / "experiments") not in sys.path:
        sys.path.insert(0, str(ROOT / "experiments"))
    spec = importlib.util.spec_from_file_location(f"{prefix}_{name}",
                                                  ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module      # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


def export_tiny(folder: str) -> str:
    """The tiny random decoder (seed 0) and the tiny tokenizer as an HF folder; returns it."""
    model = Decoder(ModelConfig(**TINY), rngs=nnx.Rngs(0))
    export_hf(model, model.cfg, folder, tokenizer=make_tokenizer())
    return folder


def write_tiny_train_job(path: pathlib.Path) -> pathlib.Path:
    """The TrainConfig job of the tiny experiments (one example per row, 8 rows for the 8 test
    devices, no checkpoints or logging extras), written to `path`."""
    path.write_text(yaml.safe_dump({
        "model": {"name": "smollm2"},
        "data": {"seq_len": 448, "pack": False, "batch_size": 8},   # 8 test devices
        "optim": {"lr": 1e-2}, "schedule": {"kind": "constant"},
        "checkpoint": {"every_steps": 0}, "eval": {"batches": 0},
        "logging": {"progress": False, "tensorboard": False, "plot": False}}))
    return path
