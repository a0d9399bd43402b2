"""Training configuration: TrainConfig (the optimisation recipe), RunConfig (model + training + paths) and
`load_config(path, overrides)`, which merges a YAML recipe with dotted `key=value` overrides.

A recipe file (see configs/*.yaml) has four optional top-level keys besides `model` and `train`:

    preset: tiny-deepseekmoe   # the model starts from this preset (null: ModelConfig defaults)
    data: null                 # a prepared data directory (null: the built-in corpus)
    out: null                  # the run directory (null: runs/<preset>)
    model: {hidden_size: 64}   # ModelConfig fields, applied over the preset
    train: {lr: 1.0e-3}        # TrainConfig fields, applied over the defaults below

Overrides are `preset=NAME`, `data=DIR`, `out=DIR`, `model.FIELD=VALUE` or `train.FIELD=VALUE`; each value is
parsed for the field's type, and a file's values must have it (configio.py has the rules, the same for
ModelConfig's own files). Unknown keys and values of the wrong type raise ValueError naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import yaml

from ..config import ModelConfig
from ..configio import check, field_types, from_data, from_text, read_mapping, require
from ..errors import UserValueError
from ..presets import load_preset

Schedule = Literal["step", "cosine", "constant"]
Precision = Literal["auto", "fp32", "bf16"]
DEFAULT_PRESET = "tiny-deepseekmoe"
_TOP_LEVEL = ("preset", "data", "out")
Reader = Callable[[Any, Any, str], Any]


@dataclass(kw_only=True)
class TrainConfig:
    """The optimisation recipe. Defaults follow the paper (Sec. 4.1.2) at the tiny main-job scale.

    Sizes and LR are the main job's (`deepseekmoe train`, tiny-deepseekmoe on the built-in corpus, ~5 minutes on
    2 CPU cores): 420 steps of 8 x 256 tokens (~0.86M tokens) at a peak LR of 4e-3 were the best of the batch/LR
    settings measured for that budget (B=4/lr 8e-3 and B=16/lr 5e-3 reached higher validation loss).
    """

    max_steps: int = 420
    """Optimizer steps in the run (the LR schedule spans exactly these)."""
    batch_size: int = 8
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (tokens per step = batch_size * grad_accum * seq_len)."""
    seq_len: int = 256
    """Tokens per training sequence (at most model.max_position_embeddings)."""
    lr: float = 4.0e-3
    """Peak learning rate, reached at the end of warmup."""
    schedule: Schedule = "step"
    """LR after warmup: step (x step_decay_factor at each step_decay_at fraction), cosine, or constant."""
    warmup_steps: int = 40
    """Linear warmup steps (the paper: 2000 at full scale)."""
    step_decay_at: list[float] = field(default_factory=lambda: [0.8, 0.9])
    """Fractions of max_steps where the step schedule multiplies the LR by step_decay_factor."""
    step_decay_factor: float = 0.316
    """Multiplier applied at each step_decay_at point (the paper: 0.316)."""
    min_lr_ratio: float = 0.1
    """Cosine schedule floor, as a fraction of lr."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1.0e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, on matrices only (not on norm weights or biases)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping; the norm is still logged)."""
    seed: int = 0
    """Seeds weight init and data order; one seed makes a run deterministic."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda, cuda:N."""
    precision: Precision = "auto"
    """auto (bf16 autocast on GPU, fp32 on CPU), fp32, bf16 (autocast; weights stay fp32)."""
    fsdp: bool = False
    """Shard parameters, gradients and AdamW state over the processes with FSDP2 (composed with --ep); the
    checkpoints are then sharded (torch.distributed.checkpoint), one shard per process."""
    activation_checkpointing: bool = False
    """Keep only each block's input and recompute its forward in backward (less activation memory, one more
    forward); with fsdp, or on one process."""
    deterministic: bool = False
    """On CUDA, torch's deterministic algorithms (the experts' index_add_ without atomics, a fixed cuBLAS
    workspace): the same bits on every run, at a cost not yet measured. CPU runs are deterministic without it."""
    log_every: int = 10
    """Write metrics every this many steps (and at the last step)."""
    eval_every: int = 140
    """Validation every this many steps (0: only at the end)."""
    eval_batches: int = 8
    """Periodic validation uses the first this-many batches of the val split (a fixed subset)."""
    final_eval_batches: int | None = 256
    """Validation batches at the end of training (None: the whole val split)."""
    save_every: int = 140
    """Checkpoint every this many steps (0: only at the end or on interrupt)."""
    keep_last: int = 2
    """Checkpoints kept in RUN_DIR/checkpoints (older ones are deleted)."""
    max_nonfinite: int = 5
    """Stop the run after this many non-finite losses in a row (each one skips its step)."""
    peak_flops: float | None = None
    """Hardware peak FLOP/s for MFU (None: 50 GFLOP/s per CPU thread, 989 TFLOP/s bf16 on GPU)."""
    tensorboard: bool = True
    """Also log to RUN_DIR/tensorboard when the tensorboard package is importable."""
    sample_prompt: str = "def "
    """Prompt of the sample printed at the end of training."""
    sample_tokens: int = 48
    """Tokens generated for the final sample (0 disables it)."""
    sample_temperature: float = 0.8
    """Temperature of the final sample (0: greedy)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name, tp in field_types(type(self)).items():
            check(getattr(self, name), tp, name)
        for name in ("max_steps", "batch_size", "grad_accum", "seq_len", "log_every", "eval_batches",
                     "keep_last", "max_nonfinite"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        for name in ("warmup_steps", "eval_every", "save_every", "sample_tokens"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "an integer >= 0")
        for name in ("lr", "weight_decay", "grad_clip", "adam_eps", "sample_temperature"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "a number >= 0")
        for name in ("adam_beta1", "adam_beta2", "min_lr_ratio"):
            require(0 <= getattr(self, name) <= 1, name, getattr(self, name), "a number in [0, 1]")
        require(self.step_decay_factor > 0, "step_decay_factor", self.step_decay_factor, "a number > 0")
        require(all(0 < f <= 1 for f in self.step_decay_at), "step_decay_at", self.step_decay_at,
                 "fractions in (0, 1]")
        require(self.final_eval_batches is None or self.final_eval_batches >= 1, "final_eval_batches",
                 self.final_eval_batches, "an integer >= 1 or null")
        require(self.peak_flops is None or self.peak_flops > 0, "peak_flops", self.peak_flops,
                 "a number > 0 or null")


@dataclass(kw_only=True)
class RunConfig:
    """Everything a run needs; RUN_DIR/config.yaml holds exactly `to_dict()` of the resolved one."""

    preset: str | None = DEFAULT_PRESET
    """The model preset the model section was applied over (None: ModelConfig defaults)."""
    data: str | None = None
    """Prepared data directory (None: the built-in corpus)."""
    out: str | None = None
    """Run directory (None: runs/<preset>, or runs/custom without a preset)."""
    model: ModelConfig = field(default_factory=lambda: load_preset(DEFAULT_PRESET))
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / (self.preset or "custom")

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "data": self.data, "out": self.out,
                "model": self.model.to_dict(), "train": dataclasses.asdict(self.train)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: str | Path | None = None, options: Mapping[str, Any] | None = None) -> RunConfig:
    """Resolve a run configuration: defaults <- `base` file <- `path` file <- `options` <- `key=value` overrides.

    Files are optional; `base` is how a resumed run starts from its own RUN_DIR/config.yaml. `options` holds typed
    values under the overrides' keys (`{"train.seed": 1, "preset": "tiny-gshard"}`), as commands pass them.
    """
    raw: dict[str, Any] = {"model": {}, "train": {}}
    for source in (base, path):
        if source is not None:
            _merge_file(raw, source)
    for key, value in (options or {}).items():
        _set(raw, check_key(key), from_data, value)
    for item in overrides:
        key, value = parse_override(item)
        _set(raw, key, from_text, value)
    return build_run_config(raw)


def _merge_file(raw: dict[str, Any], source: str | Path) -> None:
    layer = read_mapping(source)
    unknown = sorted(set(layer) - set(_TOP_LEVEL) - {"model", "train"})
    if unknown:
        raise UserValueError(f"{source}: unknown top-level key(s) {', '.join(unknown)}; "
                         f"expected {', '.join(_TOP_LEVEL)}, model, train")
    for key, value in layer.items():
        if key not in ("model", "train"):
            raw[key] = (from_data, value)
            continue
        section = value or {}
        if not isinstance(section, dict):
            raise UserValueError(f"{source}: {key}: expected a mapping, got {type(section).__name__}")
        raw[key].update({name: (from_data, v) for name, v in section.items()})


def _set(raw: dict[str, Any], key: str, reader: Reader, value: Any) -> None:
    section, _, name = key.rpartition(".")
    (raw[section] if section else raw)[name] = (reader, value)


def parse_override(item: str) -> tuple[str, str]:
    """'train.lr=1e-3' -> ('train.lr', '1e-3'); raises ValueError for a malformed or unknown key."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserValueError(f"override {item!r} is not of the form key=value (e.g. train.lr=1e-3)")
    return check_key(key), value


def check_key(key: str) -> str:
    """A run config key (`preset`, `data`, `out`, `model.FIELD`, `train.FIELD`), or ValueError naming it."""
    if key in _TOP_LEVEL:
        return key
    section, _, name = key.partition(".")
    known = {"model": field_types(ModelConfig), "train": field_types(TrainConfig)}.get(section)
    if known is None or name not in known:
        raise UserValueError(f"unknown config key {key!r}: expected {', '.join(_TOP_LEVEL)}, "
                         f"model.<ModelConfig field> or train.<TrainConfig field>")
    return key


def build_run_config(raw: dict[str, Any]) -> RunConfig:
    """A RunConfig from the layered (reader, value) pairs of `load_config`, each read by its own rules."""
    top = {key: _read(raw[key], str | None, key) for key in _TOP_LEVEL if key in raw}
    preset = top.get("preset", DEFAULT_PRESET)
    model = (load_preset(preset) if preset else ModelConfig()).replace(**_section(ModelConfig, raw["model"], "model"))
    train = TrainConfig(**_section(TrainConfig, raw["train"], "train"))
    return RunConfig(preset=preset, data=top.get("data"), out=top.get("out"), model=model, train=train)


def _section(cls: type, values: dict[str, tuple[Reader, Any]], section: str) -> dict[str, Any]:
    types_ = field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise UserValueError(f"unknown config key '{section}.{unknown[0]}'")
    return {name: _read(pair, types_[name], f"{section}.{name}") for name, pair in values.items()}


def _read(pair: tuple[Reader, Any], tp: Any, key: str) -> Any:
    reader, value = pair
    return reader(value, tp, key)
