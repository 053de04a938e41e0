"""Settings of `glmtune train`: one dataclass, read from flags and/or a YAML/JSON file, validated.

The names and defaults are those of THUDM/ChatGLM2-6B `ptuning/main.py` (its `ModelArguments`,
`DataTrainingArguments` and transformers' `Seq2SeqTrainingArguments`), except where the P-tuning recipe
of `ptuning/train.sh` is the better default: learning rate 2e-2 (transformers' 5e-5 does not move a
prefix), and logging every 10 steps. So `train.sh` habits carry over: every flag is accepted in kebab
case and in the official snake_case spelling, and a config file may use either as keys.

No torch import here: the `--nproc` launcher builds the config without loading the training stack.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from glmtune.data.preprocess import DataConfig  # no torch import there either
from glmtune.errors import GlmtuneError
from glmtune.families.chatglm3.data import RULES as GLM3_RULES
from glmtune.families.registry import FAMILIES  # plain data, no torch

DTYPE_CHOICES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
BEST_METRICS = ("eval_loss", "bleu-4", "rouge-1", "rouge-2", "rouge-l")
_DATA = DataConfig()  # the data settings' defaults are the tokenizer's (the official ADGEN columns and lengths)
NEW_RUN_PRE_SEQ_LEN = 128  # the official train.sh; a resumed run keeps its checkpoint's prefix shape


def setting(default, help: str, *, official: tuple[str, ...] = (), switch: bool = False, shown: str | None = None):
    """A TrainConfig field with what `glmtune train` shows for it: the one place a setting is written.

    The flag is `--kebab-name` (and, as for every flag, `--snake_name`); `official` adds names of the
    official scripts that differ beyond case (flags in both spellings, and config-file keys); `switch` makes a
    `--name/--no-name` pair of a bool; `shown` is the default help shows where the field's own is None
    ("not given") but stands for a value.
    """
    return field(default=default, metadata={"help": help, "official": official, "switch": switch, "shown": shown})


@dataclass
class TrainConfig:
    # model and prefix
    model_path: str | None = setting(None, "ChatGLM2 or ChatGLM3 model folder (official layout).",
                                     official=("model_name_or_path",))
    # None = not given: NEW_RUN_PRE_SEQ_LEN / off for a new run, the checkpoint's values when resuming.
    pre_seq_len: int | None = setting(None, "Prefix length", shown=str(NEW_RUN_PRE_SEQ_LEN))
    prefix_projection: bool | None = setting(None, "Prefix through the 2-layer MLP.", switch=True, shown="off")
    quantization_bit: int | None = setting(None, "Quantize the frozen weights to 4 or 8 bits.")
    dtype: str = setting("auto", "Frozen weights' dtype: auto (fp32 on CPU, bf16/fp16 on GPU), float32, bfloat16, float16.")
    device: str = setting("auto", "auto, cpu, cuda.")
    family: str | None = setting(None, f"Model family ({', '.join(FAMILIES)}); default: detected from the model folder.")
    # data (the official ADGEN columns and lengths)
    train_file: str | None = setting(None, "Raw training data (.json/.jsonl/.csv), tokenized on the fly (cached).")
    dataset: str | None = setting(None, "A folder written by `glmtune preprocess` (instead of --train-file).",
                                  official=("train_dataset",))
    prompt_column: str = setting(_DATA.prompt_column, "Prompt column.")
    response_column: str = setting(_DATA.response_column, "Answer column.")
    history_column: str | None = setting(_DATA.history_column, "Column of [query, answer] pairs.")
    source_prefix: str = setting(_DATA.source_prefix, "Text put before every prompt.")
    max_source_length: int = setting(_DATA.max_source_length, "Prompt tokens kept (cut on the right).")
    max_target_length: int = setting(_DATA.max_target_length, "Answer tokens kept (cut on the right).")
    max_seq_length: int | None = setting(_DATA.max_seq_length, "ChatGLM3 conversations (2023 rules): tokens kept per "
                                         "conversation.", shown="source + target + 1")
    chatglm3_rules: str = setting(_DATA.glm3_rules, "ChatGLM3 data rules: 2023 (official demo of Nov 2023: loss flags, "
                                  "tools) or finetune-hf (the 2024 finetune_hf.py).")
    combine: bool = setting(_DATA.combine, "GLM-4 messages: train only the last reply (the demo's combine) or every "
                            "assistant message.", switch=True)
    max_train_samples: int | None = setting(None, "Use the first N rows.")
    preprocessing_num_workers: int = setting(1, "Tokenizing processes.")
    data_format: str = setting(_DATA.data_format, "columns, alpaca, sharegpt, or auto (from the first row).")
    train_on: str = setting(_DATA.train_on, "each-turn: one row per answer (official); all-turns: every answer of a "
                            "conversation labelled in one row.")
    mix_file: str | None = setting(None, "General-purpose rows mixed into every epoch (against forgetting).")
    mix_ratio: float = setting(0.0, "Rows drawn from --mix-file per epoch, as a share of the training rows.")
    # validation (transformers' names): a file, or a seeded share of the training rows held out
    validation_file: str | None = setting(None, "Validation data (any format --train-file reads).")
    val_size: float = setting(0.0, "Hold out this seeded share of the training rows for validation.")
    eval_steps: int | None = setting(None, "Validate (and checkpoint) every N steps and at the end.",
                                     shown="--save-steps")
    per_device_eval_batch_size: int = setting(8, "Validation rows per forward.")
    eval_generate: int = setting(0, "Also generate greedily for the first K validation rows and score BLEU-4/ROUGE.")
    metric_for_best_model: str = setting("eval_loss", "eval_loss, bleu-4, rouge-1, rouge-2 or rouge-l.")
    greater_is_better: bool | None = setting(None, "Whether a bigger metric is better.", switch=True,
                                             shown="inferred from the metric: lower loss, higher scores")
    save_total_limit: int | None = setting(None, "Keep at most N checkpoints; the best and the latest are never deleted.",
                                           shown="all")
    early_stopping_patience: int | None = setting(None, "Stop after P evaluations without improvement.", shown="off")
    early_stopping_threshold: float = setting(0.0, "Smallest change that counts as an improvement.")
    report_to: str = setting("auto", "tensorboard (event files in OUTPUT/runs), none, or auto (tensorboard when installed).")
    # optimisation: AdamW, linear decay to 0, no warmup, no weight decay, clip 1.0 (transformers' defaults)
    output_dir: str | None = setting(None, "Checkpoints, metrics.jsonl, loss_curve.png.")
    per_device_train_batch_size: int = setting(8, "Rows per process and forward.")
    gradient_accumulation_steps: int = setting(1, "Forwards per optimizer step.")
    num_train_epochs: float = setting(3.0, "Epochs (when --max-steps is -1).")
    max_steps: int = setting(-1, "Total optimizer steps; > 0 overrides --num-train-epochs.")
    learning_rate: float = setting(2e-2, "Peak learning rate, decayed linearly to 0.")
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    adam_beta1: float = setting(0.9, "AdamW beta1.")
    adam_beta2: float = setting(0.999, "AdamW beta2.")
    adam_epsilon: float = setting(1e-8, "AdamW epsilon.")
    max_grad_norm: float = setting(1.0, "Gradient-norm clip; 0 = off.")
    warmup_steps: int = setting(0, "Linear warm-up steps.")
    seed: int = setting(42, "Random seed (data order, prefix init, dropout).")
    gradient_checkpointing: bool = setting(True, "Recompute layers in backward to save memory (the official main.py "
                                           "always enables it).", switch=True)
    group_by_length: bool = setting(False, "Batch rows of similar length together (less padding, faster).", switch=True)
    # bookkeeping
    logging_steps: int = setting(10, "Log every N steps.")
    save_steps: int = setting(500, "Checkpoint every N steps, and always at the end.")
    resume: bool = setting(False, "Continue from the latest checkpoint in --output-dir (its prefix settings apply).")
    resume_from_checkpoint: str | None = setting(None, "Continue from this checkpoint folder.")
    overwrite_output_dir: bool = setting(False, "Delete a previous run's checkpoints and logs in --output-dir.")
    disable_tqdm: bool = setting(False, "No progress bar.")
    nproc: int = setting(1, "Data-parallel processes on this machine (runs torchrun).", official=("nproc_per_node",))

    def prefix_shape(self, resuming: bool) -> tuple[int | None, bool | None]:
        """(pre_seq_len, prefix_projection) to build the prefix with: a resumed run reads them from its
        checkpoint (what was given here must agree), a new one fills in NEW_RUN_PRE_SEQ_LEN and no projection."""
        if resuming:
            return self.pre_seq_len, self.prefix_projection
        return self.pre_seq_len or NEW_RUN_PRE_SEQ_LEN, bool(self.prefix_projection)

    def data_config(self):
        """The tokenizer's settings (glmtune.data.preprocess.DataConfig) for the training file."""
        return DataConfig(
            prompt_column=self.prompt_column, response_column=self.response_column, history_column=self.history_column,
            source_prefix=self.source_prefix, max_source_length=self.max_source_length,
            max_target_length=self.max_target_length, max_samples=self.max_train_samples,
            glm3_rules=self.chatglm3_rules, max_seq_length=self.max_seq_length, data_format=self.data_format,
            train_on=self.train_on, combine=self.combine,
        )

    def validate(self) -> None:
        if not self.model_path:
            raise GlmtuneError("train: --model-path is required (the ChatGLM2 or ChatGLM3 model folder)")
        if not self.output_dir:
            raise GlmtuneError("train: --output-dir is required")
        # Checked here, before any data or model loads (issue 9, item 8): a file in the way fails at once.
        for folder in (Path(self.output_dir), *Path(self.output_dir).parents):
            if folder.exists():
                if not folder.is_dir():
                    raise GlmtuneError(f"train: --output-dir {self.output_dir}: {folder} exists and is not a folder")
                break
        if bool(self.train_file) == bool(self.dataset):
            raise GlmtuneError("train: give exactly one of --train-file (raw JSON/JSONL/CSV) or --dataset (a `glmtune preprocess` folder)")
        if self.pre_seq_len is not None and self.pre_seq_len < 1:
            raise GlmtuneError(f"train: --pre-seq-len must be at least 1, found {self.pre_seq_len}")
        positive = ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps",
                    "save_steps", "max_source_length", "max_target_length", "preprocessing_num_workers", "nproc")
        for name in positive:
            if getattr(self, name) < 1:
                raise GlmtuneError(f"train: --{_flag(name)} must be at least 1, found {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            # transformers' rule: -1 means "train --num-train-epochs"; any other non-positive value is a mistake.
            raise GlmtuneError(f"train: --max-steps must be a positive number of steps, or -1 to use --num-train-epochs; found {self.max_steps}")
        if self.max_steps == -1 and not (math.isfinite(self.num_train_epochs) and self.num_train_epochs > 0):
            raise GlmtuneError(f"train: --num-train-epochs must be > 0 when --max-steps is -1, found {self.num_train_epochs}")
        if self.max_seq_length is not None and self.max_seq_length < 3:
            raise GlmtuneError(f"train: --max-seq-length must be at least 3 ([gMASK] sop + text), found {self.max_seq_length}")
        if self.chatglm3_rules not in GLM3_RULES:
            raise GlmtuneError(f"train: --chatglm3-rules must be one of {list(GLM3_RULES)}, found {self.chatglm3_rules!r}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise GlmtuneError(f"train: --max-train-samples must be at least 1, found {self.max_train_samples}")
        if self.quantization_bit not in (None, 4, 8):
            raise GlmtuneError(f"train: --quantization-bit must be 4 or 8, found {self.quantization_bit}")
        if self.family is not None and self.family not in FAMILIES:
            raise GlmtuneError(f"train: --family must be one of {sorted(FAMILIES)}, found {self.family!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise GlmtuneError(f"train: --dtype must be one of {list(DTYPE_CHOICES)}, found {self.dtype!r}")
        for name in ("learning_rate", "weight_decay", "max_grad_norm", "adam_epsilon", "warmup_steps"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise GlmtuneError(f"train: --{_flag(name)} must be a finite number >= 0, found {value}")
        self._validate_steering()
        if self.resume and self.resume_from_checkpoint:
            raise GlmtuneError("train: give --resume (latest checkpoint in the output dir) or --resume-from-checkpoint DIR, not both")

    @property
    def has_validation(self) -> bool:
        return bool(self.validation_file) or self.val_size > 0

    @property
    def evaluation_steps(self) -> int:
        return self.eval_steps or self.save_steps

    @property
    def bigger_is_better(self) -> bool:
        if self.greater_is_better is not None:
            return self.greater_is_better
        return not self.metric_for_best_model.endswith("loss")  # transformers' inference rule

    def _validate_steering(self) -> None:
        """Validation, best checkpoint, early stopping, data-format and mixing settings."""
        from glmtune.data.formats import resolve

        resolve(self.data_format, self.train_on)
        if not (0 <= self.val_size < 1):
            raise GlmtuneError(f"train: --val-size must be a fraction in [0, 1), found {self.val_size}")
        if self.validation_file and self.val_size:
            raise GlmtuneError("train: give --validation-file or --val-size, not both")
        for name in ("eval_steps", "save_total_limit", "early_stopping_patience"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise GlmtuneError(f"train: --{_flag(name)} must be at least 1, found {value}")
        if self.per_device_eval_batch_size < 1:
            raise GlmtuneError(f"train: --per-device-eval-batch-size must be at least 1, found {self.per_device_eval_batch_size}")
        if self.eval_generate < 0:
            raise GlmtuneError(f"train: --eval-generate must be >= 0, found {self.eval_generate}")
        if self.metric_for_best_model not in BEST_METRICS:
            raise GlmtuneError(f"train: --metric-for-best-model must be one of {list(BEST_METRICS)}, found {self.metric_for_best_model!r}")
        if self.metric_for_best_model != "eval_loss" and self.eval_generate < 1:
            raise GlmtuneError(f"train: --metric-for-best-model {self.metric_for_best_model} needs --eval-generate K > 0")
        needs_validation = [f"--{_flag(n)}" for n in ("eval_steps", "eval_generate", "early_stopping_patience")
                            if getattr(self, n)]
        if needs_validation and not self.has_validation:
            raise GlmtuneError(f"train: {', '.join(needs_validation)} need validation data (--validation-file or --val-size)")
        if not (math.isfinite(self.early_stopping_threshold) and self.early_stopping_threshold >= 0):
            raise GlmtuneError(f"train: --early-stopping-threshold must be a finite number >= 0, found {self.early_stopping_threshold}")
        if self.report_to not in ("auto", "tensorboard", "none"):
            raise GlmtuneError(f"train: --report-to must be tensorboard, none or auto, found {self.report_to!r}")
        from glmtune.train.log import tensorboard_available  # (no torch import there either)

        if self.report_to == "tensorboard" and not tensorboard_available():  # here, before any model loads
            raise GlmtuneError("train: --report-to tensorboard: the tensorboard package is not installed "
                               "(pip install tensorboard, or pass --report-to none)")
        if bool(self.mix_file) != (self.mix_ratio > 0):
            raise GlmtuneError("train: --mix-file and --mix-ratio > 0 go together")
        if not (math.isfinite(self.mix_ratio) and self.mix_ratio >= 0):
            raise GlmtuneError(f"train: --mix-ratio must be a finite number >= 0, found {self.mix_ratio}")

    def to_json(self) -> dict:
        return asdict(self)


def _flag(name: str) -> str:
    return name.replace("_", "-")


_FIELDS = {f.name: f for f in fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)
# The official spellings that differ beyond case, from the fields themselves (the same list makes the flags).
_OFFICIAL = {alias: f.name for f in _FIELDS.values() for alias in f.metadata["official"]}


def canonical_key(key: str) -> str:
    """`--per-device-train-batch-size`, `per_device_train_batch_size`, `model_name_or_path` -> field names."""
    name = key.strip().lstrip("-").replace("-", "_")
    return _OFFICIAL.get(name, name)


def setting_specs():
    """(name, value type, help, flags, switch, shown default) of every setting, in field order: what the
    command layer builds `glmtune train`'s options from. The value type is str, int, float or bool; the
    options themselves default to None (not given), so a --config file can fill what the flags leave."""
    for f in _FIELDS.values():
        args = typing.get_args(_HINTS[f.name])
        base = next((a for a in args if a is not type(None)), None) if args else _HINTS[f.name]
        meta = f.metadata
        shown = meta["shown"]
        if shown is None and f.default not in (None, ""):
            shown = ("on" if f.default else "off") if base is bool else str(f.default)
        if base is bool and not meta["switch"] and f.default is False:
            shown = None  # a plain flag: off unless given
        flags = ("--" + _flag(f.name), *("--" + _flag(alias) for alias in meta["official"]))
        yield f.name, base, meta["help"], flags, meta["switch"], shown


def _coerce(name: str, value, source: str):
    """Check a config-file value against the field's type; numbers written as text (YAML `2e-2`) are accepted."""
    hint = _HINTS[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None:
        if optional:
            return None
        raise GlmtuneError(f"{source}: key {name!r}: expected {base.__name__}, found null")
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise GlmtuneError(f"{source}: key {name!r}: expected {base.__name__}, found {type(value).__name__} {value!r}")


def read_config_file(path: str | Path) -> dict:
    """Settings from a YAML (.yaml/.yml) or JSON file; keys are flag names in either spelling."""
    path = Path(path)
    if not path.is_file():
        raise GlmtuneError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            raise GlmtuneError(f"{path}: {where}invalid YAML ({getattr(exc, 'problem', exc)})") from None
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GlmtuneError(f"{path}: line {exc.lineno}: invalid JSON ({exc.msg})") from None
    else:
        raise GlmtuneError(f"{path}: config file must end in .yaml, .yml or .json, found {path.suffix!r}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise GlmtuneError(f"{path}: expected a mapping of flag names to values, found {type(data).__name__}")
    out = {}
    for key, value in data.items():
        name = canonical_key(str(key))
        if name not in _FIELDS:
            known = ", ".join(sorted(_FIELDS))
            raise GlmtuneError(f"{path}: unknown key {key!r} (known keys: {known})")
        out[name] = _coerce(name, value, str(path))
    return out


def build_config(config_file: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults < config file < flags given on the command line (`overrides`, None = not given)."""
    values = read_config_file(config_file) if config_file else {}
    for key, value in (overrides or {}).items():
        if value is not None:
            values[canonical_key(key)] = value
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise GlmtuneError(f"train: unknown settings {unknown}")
    config = TrainConfig(**values)
    config.validate()
    return config


def launch_torchrun(config: TrainConfig, command_line: str | None = None) -> int:
    """`glmtune train --nproc N`: rerun this command as N local processes under torchrun; returns the exit code.

    The resolved settings travel as a JSON config file, so every process sees exactly what was asked;
    `command_line` is the command as typed, which the workers print when interrupted.
    """
    import os
    import signal
    import subprocess
    import sys
    import tempfile

    settings = dict(config.to_json(), nproc=1)
    handle, path = tempfile.mkstemp(prefix="glmtune-train-", suffix=".json")
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        json.dump(settings, file, indent=2)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={config.nproc}",
            "-m", "glmtune", "train", "--config", path]
    # Its own session, so a Ctrl-C at the terminal reaches this launcher only, and the workers get exactly one
    # signal (torchrun turns the forwarded one into one SIGTERM each): they save a checkpoint and stop. Left
    # in our process group, each worker would get the terminal's SIGINT and then torchrun's SIGTERM, which
    # counts as the second signal ("exit at once").
    env = dict(os.environ, GLMTUNE_COMMAND=command_line) if command_line else None  # see train_log.resume_command
    process = subprocess.Popen(argv, start_new_session=True, env=env)
    signals = []

    def forward(signum, frame):
        signals.append(signum)
        if len(signals) == 1:
            process.send_signal(signal.SIGTERM)
        else:
            process.kill()

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = process.wait()
        return 130 if signals else code  # torchrun reports its own SIGTERM as a failure; the workers saved
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.unlink(path)
