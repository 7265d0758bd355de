"""The validation section: when the validation loss is computed, and on how much of the held-out data.

Which images are held out is the dataset's business (sd-scripts' dataset-level `validation_split` and
`validation_seed`, and Atelier's subset-level `validation_only`); this section only says when and how much.
"""

from __future__ import annotations

from engine.config.base import StrictModel, setting


class ValidationSection(StrictModel):
    """Validation loss on held-out images: the same objective as training, at fixed timesteps and fixed noise."""

    validate_every_n_steps: int = setting(
        0, "Compute the validation loss every N steps (0 = not by steps).", ge=0, unit="steps",
    )
    validate_every_n_epochs: int = setting(
        1, "Compute the validation loss every N epochs (0 = not by epochs); as in sd-scripts, every epoch by "
        "default whenever the dataset holds images out for validation.", ge=0,
    )
    max_validation_steps: int = setting(
        0, "Evaluate at most this many validation batches per pass (0 = all of them).", ge=0, advanced=True,
    )
