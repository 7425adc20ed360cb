"""Run configuration: one pydantic model per component, composed into :class:`Config`.

A run is configured by a YAML file (``configs/default.yaml`` is the embedded default) and
dotted ``key=value`` overrides on the command line (``train.max_steps=50
aggregation.rule=median``). Every model forbids unknown keys, so a typo is an error that
names the field instead of a silently ignored setting.

Failure behaviour: :func:`load_config` raises :class:`ConfigError` with a one-line message
naming the offending field; nothing is written before a config has validated.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedgspo.federation.config import FederatedConfig
from fedgspo.robust.config import AggregationConfig
from fedgspo.telemetry.alerts import AlertsConfig
from fedgspo.gspo.model import ModelConfig
from fedgspo.gspo.task import TaskConfig
from fedgspo.robust.attacks import AttackConfig
from fedgspo.integrity.auth import SecurityConfig
from fedgspo.bookkeeping import BookkeepingConfig
from fedgspo.checkpoint import CheckpointConfig
from fedgspo.telemetry.metrics import MetricsConfig
from fedgspo.integrity.proof import ProofConfig
from fedgspo.telemetry.tracing import TracingConfig

class ConfigError(ValueError):
    """A config file or override is invalid; the message is one line naming the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    """Where the run writes its outputs."""

    name: str | None = Field(None, description="Run name; default: a timestamp.")
    dir: Path | None = Field(None, description="Run directory; default: runs/<name>.")
    log_every: int = Field(50, gt=0, description="Steps between console summaries.")
    tensorboard: bool = Field(True, description="Write TensorBoard event files.")
    progress_bar: bool = Field(True, description="Show a progress bar on rank 0 when stderr is a terminal.")


class GSPOConfig(_Section):
    """GSPO hyper-parameters, named as in TRL's ``GRPOConfig``."""

    num_generations: int = Field(8, ge=2, description="Completions per prompt (group size G).")
    num_iterations: int = Field(2, ge=1, description="Optimizer steps per rollout batch (mu).")
    epsilon: float = Field(3e-4, gt=0, lt=1, description="Lower clip range of the sequence ratio.")
    epsilon_high: float | None = Field(4e-4, gt=0, description="Upper clip range; default epsilon.")
    beta: float = Field(0.0, ge=0, description="Weight of the k3 KL to the reference model.")
    importance_sampling_level: Literal["sequence", "token"] = Field(
        "sequence", description="'sequence' is GSPO, 'token' is GSPO-token."
    )
    max_completion_length: int = Field(6, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling; 1.0 keeps every token.")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens; 0 keeps every token.")
    repetition_penalty: float = Field(1.0, gt=0, description="As transformers defines it; 1.0 is off.")
    stop_strings: list[str] = Field(default_factory=list, description="A completion ends at the first of these.")
    generation_batch_size: int | None = Field(
        None, gt=0, description="Sequences generated at once (chunks of the group); default: all of them.")
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.99, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the aggregated gradient.")
    warmup_steps: int = Field(0, ge=0)
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="LR schedule by name (hot-swappable).")
    scale_rewards: bool = Field(True, description="Divide group advantages by the group std.")


class RolloutConfig(_Section):
    """How rollouts decode; what they sample is set in ``gspo``."""

    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="Compiled one-token decode over a static KV cache: 'on', 'off' (the eager reference "
                            "path) or 'auto': on when the run's expected decode steps (rollouts x generation chunks "
                            "x (max_completion_length - 1)) reach auto_min_decode_steps and the model allows it.")
    min_bucket: int = Field(
        32, gt=0, description="Shortest static cache: prompts are left-padded to a power of two (at least 8) "
                              "and the cache holds a power of two at least this, so that prompts of different "
                              "lengths share one compiled shape.")
    auto_min_decode_steps: int = Field(
        10_000, gt=0, description="Expected decode steps from which compile='auto' compiles (compiling costs "
                                  "5-35 s once per shape on a small CPU and saves ~1.5-10 ms per decode step).")

    @field_validator("compile", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any) -> Any:
        """YAML reads ``on``/``off`` (as in ``rollout.compile=on``) as booleans."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class TrainConfig(_Section):
    """The outer loop."""

    max_steps: int = Field(1000, gt=0, description="Optimizer steps (as in TRL).")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    evaluate_only: bool = Field(False, description="Roll out and score max_steps batches; no updates.")
    num_threads: int | None = Field(
        None, gt=0, description="torch intra-op threads per rank; default: cores / local ranks."
    )
    micro_batch_size: int | None = Field(
        None, gt=0, description="Sequences per forward/backward (gradient accumulation); default: the whole rollout.")
    compile: bool = Field(
        False, description="Compile the loss forward/backward (torch.compile with symbolic shapes); the same "
                           "gradients as eager up to float rounding.")


class EvalConfig(_Section):
    """Evaluation on the eval split (``task.eval_dataset``; the digit task has its own stream)."""

    every: int = Field(0, ge=0, description="Steps between evaluations; 0: never.")
    num_prompts: int = Field(32, gt=0, description="Prompts per evaluation (on each rank).")
    greedy: bool = Field(True, description="Greedy decoding; else sampled like training (num_generations=1).")


class Config(_Section):
    """The whole run: one section per component."""

    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    gspo: GSPOConfig = GSPOConfig()
    rollout: RolloutConfig = RolloutConfig()
    aggregation: AggregationConfig = AggregationConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    bookkeeping: BookkeepingConfig = BookkeepingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    security: SecurityConfig = SecurityConfig()
    proof: ProofConfig = ProofConfig()
    metrics: MetricsConfig = MetricsConfig()
    alerts: AlertsConfig = AlertsConfig()
    tracing: TracingConfig = TracingConfig()
    federated: FederatedConfig = FederatedConfig()
    attack: AttackConfig | None = Field(None, description="Simulated Byzantine ranks (testing only).")

    @model_validator(mode="after")
    def _fits_context(self) -> "Config":
        # prompt = BOS + task token + digits + '='; completion = digits + EOS.
        needed = self.task.max_digits + 3 + self.gspo.max_completion_length
        if self.model.path is None and self.task.dataset is None and needed > self.model.max_position_embeddings:
            raise ValueError(
                f"model.max_position_embeddings ({self.model.max_position_embeddings}) < "
                f"longest prompt + completion ({needed})"
            )
        return self

    @model_validator(mode="after")
    def _compression_fits_the_exchange(self) -> "Config":
        if self.federated.compression == "int8" and self.aggregation.mode == "audited":
            raise ValueError("federated.compression=int8 works with aggregation.mode sharded or replicated, "
                             "not audited")
        return self

    @model_validator(mode="after")
    def _data_needs_a_tokenizer(self) -> "Config":
        if self.task.dataset is not None and self.model.path is None:
            raise ValueError("task.dataset needs model.path: a local model directory with its tokenizer "
                             "(the tiny model built from config only knows the digit task's characters)")
        return self

    @model_validator(mode="after")
    def _checkpoints_between_rollouts(self) -> "Config":
        # A checkpoint holds no rollout batch, so it must fall where a new rollout begins.
        every, mu = self.checkpoint.every, self.gspo.num_iterations
        if every % mu:
            raise ValueError(f"checkpoint.every ({every}) must be a multiple of gspo.num_iterations ({mu})")
        return self

    def digest(self) -> str:
        """sha256 of the canonical JSON form: identifies a configuration in logs and lineage."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


def _parse_value(text: str) -> Any:
    """Parse an override's value with YAML rules (``3e-4``, ``true``, ``[a, b]``, ``null``)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``key = "a.b.c"``, creating sections as needed."""
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[leaf] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return ``data`` with dotted ``key=value`` overrides applied (nested dicts created)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        set_dotted(data, key, _parse_value(value))
    return data


def format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in first and first["type"] not in ("missing",):
        msg = f"{msg} (got {first['input']!r})"
    more = len(err.errors()) - 1
    return f"{loc}: {msg}" + (f" (+{more} more)" if more else "")


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping document is a :class:`ConfigError`."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


def load_config(path: Path | str | None = None, overrides: list[str] | None = None) -> Config:
    """Build a validated :class:`Config` from a YAML file and dotted overrides.

    Without a file the field defaults apply: they are the embedded default, which
    ``configs/default.yaml`` spells out. Raises :class:`ConfigError` (one line) on any problem.
    """
    data = read_yaml(Path(path)) if path else {}
    data = apply_overrides(data, list(overrides or []))
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None
