"""`RunConfig`: the one model a run is described by. Everything else (TOML, presets, widgets, docs) derives from it."""

from __future__ import annotations

from pydantic import ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from engine.config.base import StrictModel, setting
from engine.config.choices import FLOW_FAMILIES, SD_FAMILIES, Method
from engine.config.dataset import DatasetSection
from engine.config.migrations import SCHEMA_VERSION
from engine.config.rule_registry import Problem, RuleContext
from engine.config.rules import check
from engine.config.sections_ema import EmaSection
from engine.config.sections_flow import FlowSection
from engine.config.sections_model import EmbeddingSection, ModelSection, NetworkSection
from engine.config.sections_output import LaunchSection, LoggingSection, SamplingSection, SavingSection
from engine.config.sections_training import OptimizerSection, TrainingSection
from engine.config.sections_validation import ValidationSection

SECTIONS = ("model", "network", "embedding", "dataset", "optimizer", "training", "flow", "validation", "saving",
            "ema", "sampling", "logging", "launch")


class RunConfig(StrictModel):
    """Everything that describes one training run."""

    schema_version: int = setting(SCHEMA_VERSION, "Version of this file's layout; older files are migrated.",
                                  advanced=True, use="file")
    method: Method = setting(
        "lora", "What to train: a LoRA-family network, a full model (DreamBooth or fine-tuning), or an embedding.",
    )
    model: ModelSection = setting(default_factory=ModelSection, description="The base model.")
    network: NetworkSection = setting(default_factory=NetworkSection, description="The LoRA-family network.")
    embedding: EmbeddingSection = setting(default_factory=EmbeddingSection, description="The Textual Inversion token.",
                                          families=SD_FAMILIES)
    dataset: DatasetSection = setting(default_factory=DatasetSection, description="The training images.")
    optimizer: OptimizerSection = setting(default_factory=OptimizerSection, description="Optimizer and schedule.")
    training: TrainingSection = setting(default_factory=TrainingSection, description="The training loop.")
    flow: FlowSection = setting(default_factory=FlowSection, families=FLOW_FAMILIES,
                                description="Flow matching (FLUX.1, Chroma and SD3): noise levels, target, guidance "
                                "and SD3's shift.")
    validation: ValidationSection = setting(default_factory=ValidationSection, description="Validation loss.")
    saving: SavingSection = setting(default_factory=SavingSection, description="Saved files and states.")
    ema: EmaSection = setting(default_factory=EmaSection, description="EMA of the trained weights.", title="EMA")
    sampling: SamplingSection = setting(default_factory=SamplingSection, description="Sample images.")
    logging: LoggingSection = setting(default_factory=LoggingSection, description="Training logs.")
    launch: LaunchSection = setting(default_factory=LaunchSection, description="Processes and GPUs.")

    @field_validator("schema_version")
    @classmethod
    def _current_version(cls, version: int) -> int:
        if version != SCHEMA_VERSION:
            raise ValueError(f"expected {SCHEMA_VERSION}; load files through engine.config.io, which migrates "
                             "older versions")
        return version

    @model_validator(mode="after")
    def _cross_field_rules(self, info: ValidationInfo) -> RunConfig:
        errors = [problem for problem in check(self, rule_context(info)) if problem.severity == "error"]
        if errors:
            raise PydanticCustomError(
                "cross_field", "{summary}",
                {"summary": "; ".join(map(str, errors)),
                 "problems": [(problem.path, problem.message) for problem in errors]},
            )
        return self


def rule_context(info: ValidationInfo | None) -> RuleContext:
    """Rule settings passed through pydantic's validation context, e.g. {"check_packages": False}."""
    context = (info.context if info is not None else None) or {}
    return RuleContext(check_packages=context.get("check_packages", True),
                       dataset_file=context.get("dataset_file"),
                       dataset_file_name=context.get("dataset_file_name", ""))


def config_warnings(config: RunConfig, context: RuleContext | None = None) -> list[Problem]:
    """The warning-level findings of the cross-field rules (errors never survive validation)."""
    return [problem for problem in check(config, context) if problem.severity == "warning"]
