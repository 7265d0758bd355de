"""Cross-field rules about captions and the text encoders: settings that only some methods read.

Registered with the same `@rule` as the rules in :mod:`engine.config.rules`, which imports this module so that
`check()` runs them all. FLUX full fine-tuning's refusal of ``stop_text_encoder_training`` (it never trains the
text encoders) is in :mod:`engine.config.rules_flux`; this module does not repeat it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from engine.config.base import field_families
from engine.config.choices import FLUX_FAMILIES
from engine.config.rule_registry import Problem, RuleContext, rule

if TYPE_CHECKING:
    from engine.config.schema import RunConfig

STOP_FIELD = "training.stop_text_encoder_training"
# The methods whose trainer stops the text encoders part-way (engine.train.method_full and its SD3 variant), as
# sd-scripts' train_db.py / fine_tune.py do; train_network.py and the TI trainer have no such option.
_STOPPING_METHODS = ("dreambooth", "finetune")
# What the other methods do instead, for the warning.
_INSTEAD = {
    "lora": "a LoRA trains its text-encoder part to the end; set network.train_unet_only = true (or "
            "optimizer.text_encoder_lr = 0) to leave the text encoder alone",
    "textual_inversion": "Textual Inversion trains only its new embedding, for the whole run",
}


@rule
def stop_text_encoder_training_is_read(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    """A stop step for a method that never reads it would look like it worked: warn, naming the field."""
    if not config.training.stop_text_encoder_training:
        return
    if config.method not in _STOPPING_METHODS:
        yield Problem(STOP_FIELD, f"method '{config.method}' ignores it: {_INSTEAD[config.method]}; set it back to 0",
                      "warning")
    elif config.model.model_family not in FLUX_FAMILIES and not _trains_a_text_encoder(config):
        yield Problem(STOP_FIELD, "no text encoder is trained (optimizer.text_encoder_lr = 0), so there is nothing "
                      "to stop; set it back to 0, or give the text encoder a learning rate", "warning")


def _trains_a_text_encoder(config: RunConfig) -> bool:
    """Whether a full-model run trains any text encoder: text_encoder_lr (empty: learning_rate) or, for SDXL,
    text_encoder2_lr (empty: text_encoder_lr)."""
    optimizer = config.optimizer
    first = optimizer.learning_rate if optimizer.text_encoder_lr is None else optimizer.text_encoder_lr
    second = first if optimizer.text_encoder2_lr is None else optimizer.text_encoder2_lr
    # the families with a second text encoder of its own rate are those text_encoder2_lr is declared for (SDXL)
    families = field_families(type(optimizer).model_fields["text_encoder2_lr"])
    has_second = families is None or config.model.model_family in families
    return first > 0 or (has_second and second > 0)
