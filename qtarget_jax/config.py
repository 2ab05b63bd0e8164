"""Typed training config: dataclass schema, YAML layering and dotted `key=value` overrides.

Sources are layered, later wins:
    configs/base.yaml <- configs/models/<model.name>.yaml <- job file <- key=value overrides.
A key set by two sources to different values is allowed (that is what layering is for); every
such key is recorded in `LoadedConfig.overridden` so the run can report it, and the fully resolved
config is written next to every run (`save_resolved`).

Unknown keys and values of the wrong type raise `ConfigError`, naming the source, the dotted key,
the value and the closest valid key (difflib); a renamed key (`MOVED_KEYS`, e.g. `model.dtype`)
names its replacement. Free-form sections (`model.config`, `loss.target`)
are dicts checked by their consumers (ModelConfig, `targets.spec_from_dict`); they merge key by
key, except that a mapping naming a "preset" replaces the previous one whole.
"""
from __future__ import annotations

import dataclasses
import difflib
import pathlib
import types
import typing
from typing import Any, Literal, Optional

import yaml

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config key or value is invalid; the message names the source, key and value."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    name: str = "smollm2"  # selects configs/models/<name>.yaml (layered under the job file)
    source: str = "smollm2"  # load_model argument ("smollm2" | HF folder | .gguf) or "init"
    config: dict = dataclasses.field(default_factory=dict)  # ModelConfig fields / overrides
    tokenizer: Optional[str] = None  # folder or .gguf; null: the source's (init: SmolLM2's)
    compute_dtype: Literal["float32", "bfloat16"] = "float32"  # activations; each float32
    #                                master weight is cast to it once, where it is used
    remat: Literal["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                   "nothing_saveable"] = "none"  # per-layer rematerialisation policy
    teacher: Optional[str] = None  # teacher source when the target needs one ("smollm2" |
    #                                HF folder | .gguf | exported run dir): any architecture
    #                                with the student's tokenizer; null: the frozen initial
    #                                student (a device copy, not trained)
    teacher_dtype: Optional[Literal["float32", "bfloat16"]] = None  # teacher param dtype;
    #                                null: model.compute_dtype (no f32 master copy needed)
    teacher_config: dict = dataclasses.field(default_factory=dict)  # ModelConfig overrides
    #                                for the teacher (scan_layers defaults to model.config's)


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # projections an adapter can wrap


@dataclasses.dataclass(frozen=True)
class LoraSection:
    rank: int = 0  # adapter rank r; 0: no adapters (full fine-tuning)
    alpha: float = 16.0  # the adapter output is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter input during training, in [0, 1)
    targets: list = dataclasses.field(default_factory=lambda: list(LORA_TARGETS))  # wrapped
    #                       projections, a subset of q, k, v, o, gate, up, down
    base_dtype: Optional[Literal["float32", "bfloat16"]] = None  # the frozen base weights'
    #                       dtype; null: float32 like the adapters (the student's dtype)


def check_lora(rank: Any, alpha: Any, dropout: Any, targets: Any
               ) -> Optional[tuple[str, Any, str]]:
    """(key, value, why) for the first invalid lora setting, or None when all are valid.

    rank: int >= 0 (0 = off); alpha: > 0; dropout: in [0, 1); targets: a non-empty list of
    distinct names from LORA_TARGETS.
    """
    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        return "lora.rank", rank, "must be an integer >= 0 (0 = no adapters)"
    if not number(alpha) or not alpha > 0:
        return "lora.alpha", alpha, "must be > 0 (the adapter scale is alpha / rank)"
    if not number(dropout) or not 0 <= dropout < 1:
        return "lora.dropout", dropout, "must be in [0, 1)"
    if isinstance(targets, str) or not isinstance(targets, (list, tuple)) or not targets:
        return "lora.targets", targets, f"must be a non-empty list of {', '.join(LORA_TARGETS)}"
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        return "lora.targets", list(targets), (f"unknown projection(s) {unknown}; choose from "
                                               f"{', '.join(LORA_TARGETS)}")
    if len(set(targets)) != len(targets):
        return "lora.targets", list(targets), "names a projection twice"
    return None


@dataclasses.dataclass(frozen=True)
class DataSection:
    path: str = "data/tfds/jsonl_sft/synth/1.0.0"  # folder from `python -m qtarget_jax.data
    #                                              prepare` (or a tfds catalog name)
    train_split: str = "train"
    eval_split: str = "test"
    seq_len: int = 256  # T
    batch_size: int = 8  # global B (all processes); split over data*fsdp devices
    microbatches: int = 1  # gradient accumulation: B is split into this many microbatches
    seed: int = 0  # shuffle seed
    pack: bool = True  # pack several examples per row
    truncate: bool = False  # cut too-long responses instead of failing on them
    tokenize_workers: int = 0  # processes tokenising this host's shard at start (0: this one)


@dataclasses.dataclass(frozen=True)
class LossSection:
    target: dict = dataclasses.field(default_factory=lambda: {"preset": "sft"})  # TargetSpec
    normalization: Literal["token", "sequence", "constant"] = "token"
    fused: bool = True  # loss from hidden states + head, chunked (false: full logits, debugging)
    normalizer: float = 0.0  # normalization="constant": loss sum / (normalizer x rows)


@dataclasses.dataclass(frozen=True)
class OptimSection:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-4  # peak learning rate
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled; never applied to norms and biases
    clip_norm: Optional[float] = 1.0  # global-norm gradient clipping; null disables


@dataclasses.dataclass(frozen=True)
class ScheduleSection:
    kind: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0  # linear warmup from 0 to optim.lr
    end_lr_ratio: float = 0.1  # final lr = end_lr_ratio * optim.lr (cosine, linear)


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    dir: Optional[str] = None  # local path or gs://...; null: <run.dir>/checkpoints
    every_steps: int = 100  # save interval (also at the end, on SIGTERM, Ctrl-C); 0: never
    keep: int = 3  # keep the last K checkpoints
    best_metric: Optional[str] = None  # e.g. "eval/loss": also keep the best by this metric
    best_mode: Literal["min", "max"] = "min"
    async_save: bool = True
    resume: bool = True  # resume from the latest complete checkpoint in dir, if any
    export_hf: bool = False  # export the final model to <run.dir>/hf


@dataclasses.dataclass(frozen=True)
class EvalSection:
    every_steps: int = 0  # 0 disables periodic eval (held-out loss)
    batches: int = 4  # eval batches per evaluation
    problems: str = ""  # held-out JSONL with gold answers: greedy exact-match accuracy too
    problems_limit: int = 0  # first N problems of that file (0 = all)
    max_new_tokens: int = 128  # decoding bound for those problems


@dataclasses.dataclass(frozen=True)
class LoggingSection:
    every_steps: int = 1  # metrics to JSONL / TensorBoard every N steps
    tensorboard: bool = True
    progress: bool = True  # tqdm progress bar with ETA
    plot: bool = True  # curves.png at the end
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0: MFU not reported


@dataclasses.dataclass(frozen=True)
class RunSection:
    dir: str = "runs/default"  # config.yaml, metrics.jsonl, tb/, checkpoints/, curves.png
    steps: int = 100  # total optimizer steps
    seed: int = 0
    processes: int = 1  # >1: jax.distributed.initialize (also when the cluster is detected)
    coordinator: Optional[str] = None  # "host:port" of process 0 when processes > 1
    process_id: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    loss: LossSection = dataclasses.field(default_factory=LossSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    schedule: ScheduleSection = dataclasses.field(default_factory=ScheduleSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    logging: LoggingSection = dataclasses.field(default_factory=LoggingSection)
    run: RunSection = dataclasses.field(default_factory=RunSection)

    def __post_init__(self):
        d = self.data
        if d.batch_size < 1 or d.microbatches < 1 or d.batch_size % d.microbatches:
            raise ConfigError(
                f"data.batch_size ({d.batch_size}) must be a positive multiple of "
                f"data.microbatches ({d.microbatches})")
        if self.loss.normalization == "constant" and self.loss.normalizer <= 0:
            raise ConfigError(
                f"loss.normalization=constant needs loss.normalizer > 0 (e.g. the sequence "
                f"length), got {self.loss.normalizer}")
        lora = self.lora
        problem = check_lora(lora.rank, lora.alpha, lora.dropout, lora.targets)
        if problem:
            raise ConfigError(f"{problem[0]}={problem[1]!r}: {problem[2]}")
        if self.run.steps < 1:
            raise ConfigError(f"run.steps must be >= 1, got {self.run.steps}")


@dataclasses.dataclass(frozen=True)
class LoadedConfig:
    config: TrainConfig
    sources: tuple[str, ...]  # files and "cli" in layering order
    overridden: tuple[str, ...]  # "key: old (src) -> new (src)" for keys set twice differently


# Keys that used to exist or that another key owns: dotted key -> what to write instead. One
# dtype vocabulary: `param_dtype` (storage) and `compute_dtype` (activations), nothing else.
_DTYPE_OWNERS = {
    "dtype": "ModelConfig.dtype was renamed compute_dtype; write model.compute_dtype",
    "compute_dtype": "write model.compute_dtype",
    "param_dtype": "param dtypes are set by the trainer: float32 master weights for the "
                   "student, model.teacher_dtype for the teacher",
}
MOVED_KEYS = {
    "model.dtype": "was renamed model.compute_dtype (the activation dtype; the param dtype is "
                   "float32 for the student, model.teacher_dtype for the teacher)",
    **{f"model.{section}.{key}": f"is not set here: {why}"
       for section in ("config", "teacher_config") for key, why in _DTYPE_OWNERS.items()},
}


def _moved(src: str, dotted: str) -> ConfigError:
    return ConfigError(f"{src}: key '{dotted}' {MOVED_KEYS[dotted]}")


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def suggest(key: str, options) -> str:
    """"; did you mean 'x'?" for the closest of `options`, else the list of valid ones."""
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {sorted(options)}"


def _optional(tp: Any) -> Any:
    """`X` for `Optional[X]` / `X | None`, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return None


def _tuple_item(tp: Any) -> Any:
    """`X` for `tuple[X, ...]`, else None."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[0]
    return None


def _check_value(value: Any, tp: Any, where: str) -> Any:
    """Returns `value` converted to `tp` (int -> float, list -> tuple[X, ...]) or raises
    ConfigError."""
    inner = _optional(tp)
    if inner is not None:
        return None if value is None else _check_value(value, inner, where)
    item = _tuple_item(tp)
    if item is not None:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r}: expected a list")
        return tuple(_check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}={value!r}: must be one of {list(choices)}{hint}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is dict and value is None:
        return {}
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{where}={value!r}: expected {tp.__name__}, got {type(value).__name__}")
    return value


def _merge(base: dict, update: dict, cls, src: str, prov: dict, overridden: list, prefix=""):
    """Merges `update` (from `src`) into `base` in place, checking keys against `cls`."""
    if not isinstance(update, dict):
        raise ConfigError(f"{src}: '{prefix or '<root>'}' must be a mapping, got {update!r}")
    fields = _fields(cls)
    types = _field_types(cls)
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if dotted in MOVED_KEYS:
            raise _moved(src, dotted)
        if key not in fields:
            raise ConfigError(f"{src}: unknown key '{dotted}'" + suggest(
                dotted, [f"{prefix}{k}" for k in fields]))
        tp = types[key]
        if _optional(tp) is not None and dataclasses.is_dataclass(_optional(tp)):
            if value is None:  # an optional section switched off
                _set_leaf(base, key, None, dotted, src, prov, overridden)
                continue
            tp = _optional(tp)
            if base.get(key) is None:
                base[key] = {}
        if dataclasses.is_dataclass(tp):
            _merge(base.setdefault(key, {}), value, tp, src, prov, overridden, dotted + ".")
            continue
        if dataclasses.is_dataclass(_tuple_item(tp)):  # a list of sections, replaced whole
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{src}: {dotted}={value!r}: expected a list of mappings")
            items = []
            for i, item in enumerate(value):
                items.append({})
                _merge(items[-1], item, _tuple_item(tp), src, {}, [], f"{dotted}[{i}].")
            _set_leaf(base, key, items, dotted, src, prov, overridden)
            continue
        if tp is dict and isinstance(value, dict):
            if "preset" in value:  # a new preset starts from its own defaults
                base[key] = {}
            for sub, subval in value.items():  # free-form dicts merge key by key
                if f"{dotted}.{sub}" in MOVED_KEYS:
                    raise _moved(src, f"{dotted}.{sub}")
                _set_leaf(base.setdefault(key, {}), sub, subval, f"{dotted}.{sub}", src, prov,
                          overridden)
            continue
        _set_leaf(base, key, _check_value(value, tp, f"{src}: {dotted}"), dotted, src, prov,
                  overridden)


def _set_leaf(target: dict, key: str, value, dotted: str, src: str, prov: dict, overridden: list):
    if key in target and target[key] != value and dotted in prov:
        overridden.append(f"{dotted}: {target[key]!r} ({prov[dotted]}) -> {value!r} ({src})")
    target[key] = value
    prov[dotted] = src


def _build(cls, data: dict, where: str = ""):
    """`cls` from merged (checked) data; a missing required field is a ConfigError."""
    kwargs = {}
    for name, tp in _field_types(cls).items():
        if name not in data:
            continue
        value, section = data[name], _optional(tp) or tp
        if dataclasses.is_dataclass(section) and value is not None:
            value = _build(section, value, f"{where}{name}.")
        elif dataclasses.is_dataclass(_tuple_item(tp)):
            value = tuple(_build(_tuple_item(tp), v, f"{where}{name}[{i}].")
                          for i, v in enumerate(value))
        kwargs[name] = value
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing key(s) {', '.join(where + m for m in missing)}")
    return cls(**kwargs)


def parse_override(arg: str) -> dict:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}, value parsed as YAML (1e-4, true, null...)."""
    if "=" not in arg:
        raise ConfigError(f"override {arg!r}: expected key=value (e.g. optim.lr=3e-4)")
    key, raw = arg.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _read_yaml(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text())
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(job: Optional[str | pathlib.Path] = None, overrides: tuple[str, ...] = (),
                config_dir: pathlib.Path = CONFIG_DIR) -> LoadedConfig:
    """Layers base.yaml <- models/<name>.yaml <- job <- overrides into a checked TrainConfig."""
    layers: list[tuple[str, dict]] = [(str(config_dir / "base.yaml"),
                                       _read_yaml(config_dir / "base.yaml"))]
    job_layers = []
    if job is not None:
        job_layers.append((str(job), _read_yaml(pathlib.Path(job))))
    job_layers += [(f"cli '{o}'", parse_override(o)) for o in overrides]
    name = layers[0][1].get("model", {}).get("name", ModelSection.name)
    for _, d in job_layers:
        name = (d.get("model") or {}).get("name", name)
    model_file = config_dir / "models" / f"{name}.yaml"
    if not model_file.is_file():
        known = [p.stem for p in (config_dir / "models").glob("*.yaml")]
        raise ConfigError(f"model.name={name!r}: no {model_file}" + suggest(name, known))
    layers.append((str(model_file), _read_yaml(model_file)))
    layers += job_layers
    merged: dict = {}
    prov: dict = {}
    overridden: list = []
    for src, data in layers:
        _merge(merged, data, TrainConfig, src, prov, overridden)
    try:
        cfg = _build(TrainConfig, merged)
        check_target(cfg)
    except ConfigError as e:
        raise ConfigError(f"{' <- '.join(s for s, _ in layers)}: {e}") from None
    return LoadedConfig(cfg, tuple(s for s, _ in layers), tuple(overridden))


def load_dataclass(cls, path: str | pathlib.Path, overrides: tuple[str, ...] = ()):
    """A config of any frozen dataclass schema `cls` (e.g. experiments/run.py's `Experiment`)
    from one YAML file and dotted `key=value` overrides, with the checks of `load_config`:
    unknown keys (with a did-you-mean), value types, `X | None` sections (null switches one
    off) and `tuple[Section, ...]` lists (replaced whole by a later source)."""
    layers = [(str(path), _read_yaml(pathlib.Path(path)))]
    layers += [(f"cli '{o}'", parse_override(o)) for o in overrides]
    merged: dict = {}
    for src, data in layers:
        _merge(merged, data, cls, src, {}, [])
    try:
        return _build(cls, merged)
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"{' <- '.join(s for s, _ in layers)}: {e}") from None


def check_target(cfg: TrainConfig) -> None:
    """loss.target builds a TargetSpec (preset name, fields, ranges), else ConfigError."""
    from qtarget_jax.targets import spec_from_dict  # pure functions: no JAX backend starts
    try:
        spec_from_dict(dict(cfg.loss.target))
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"loss.target={dict(cfg.loss.target)!r}: {e}") from None


def _model_source_problem(source: str) -> Optional[str]:
    """Why `source` cannot be loaded by load_model (None when it can)."""
    if source == "smollm2":
        return None
    path = pathlib.Path(source).expanduser()
    if source.endswith(".gguf"):
        return None if path.is_file() else "no such .gguf file"
    if not path.is_dir():
        return "no such folder (expected \"smollm2\", a .gguf file, a Hugging Face folder " \
               "or an exported run)"
    if not ((path / "config.json").is_file() or (path / "hf" / "config.json").is_file()):
        return "the folder has no config.json (nor hf/config.json of an exported run)"
    return None


def check_sources(cfg: TrainConfig) -> None:
    """The files a run reads exist: model.source, model.teacher, model.tokenizer, data.path and
    eval.problems. Run before JAX starts (train.py and train.loop.run); raises one ConfigError
    naming the key and value."""
    m = cfg.model
    checks = [("model.source", m.source, None if m.source == "init"
               else _model_source_problem(m.source))]
    if m.teacher is not None:
        checks.append(("model.teacher", m.teacher, "a teacher must be a trained model, not init"
                       if m.teacher == "init" else _model_source_problem(m.teacher)))
    if m.tokenizer:
        path = pathlib.Path(m.tokenizer).expanduser()
        ok = path.is_file() if m.tokenizer.endswith(".gguf") else path.is_dir()
        checks.append(("model.tokenizer", m.tokenizer,
                       None if ok else "no such tokenizer folder or .gguf file"))
    data = cfg.data.path
    looks_like_path = data.startswith(("/", ".", "~")) or data.count("/") > 1
    if pathlib.Path(data).expanduser().is_dir():
        problem = None
    elif looks_like_path:
        problem = ("no such folder; prepare it with `python -m qtarget_jax.data prepare` "
                   "(docs/data.md)")
    else:
        problem = None  # a tfds catalog name, resolved by the data pipeline
    checks.append(("data.path", data, problem))
    if cfg.eval.problems:
        checks.append(("eval.problems", cfg.eval.problems, None if pathlib.Path(
            cfg.eval.problems).expanduser().is_file() else "no such file"))
    for key, value, problem in checks:
        if problem:
            raise ConfigError(f"{key}={value!r}: {problem}")


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_resolved(loaded: LoadedConfig, path: str | pathlib.Path) -> None:
    """Writes the resolved config (loadable as a job file) with its sources in a header."""
    header = "# Resolved config. Sources (later wins):\n" + "".join(
        f"#   {s}\n" for s in loaded.sources) + "".join(
        f"# overridden: {o}\n" for o in loaded.overridden)
    text = header + yaml.safe_dump(to_dict(loaded.config), sort_keys=False)
    pathlib.Path(path).write_text(text)
