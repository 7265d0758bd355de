"""Widget values <-> config values for optional numbers, which the form edits as text so that empty means unset
(a gr.Number shown without a value hands back 0: a learning rate of 0, or a value under the field's minimum)."""

import pytest

from engine.config.io import default_config_dict
from gui.state import config_to_form, form_to_config, from_widget, to_widget
from gui.views.parameters import editable_fields

SPECS = editable_fields()


@pytest.mark.parametrize("path", ["optimizer.unet_lr", "optimizer.text_encoder_lr", "model.t5xxl_max_token_length",
                                  "dataset.general.validation_seed"])
def test_an_unset_optional_number_is_an_empty_box_and_reads_back_unset(path):
    spec = SPECS[path]
    assert spec.optional and spec.kind in ("int", "float", "number")
    assert to_widget(spec, None) == "" and from_widget(spec, "") is None


def test_typed_optional_numbers_read_as_numbers():
    assert from_widget(SPECS["optimizer.unet_lr"], "1e-4") == 1e-4
    assert from_widget(SPECS["model.t5xxl_max_token_length"], " 256 ") == 256
    assert to_widget(SPECS["optimizer.unet_lr"], 0.0005) == "0.0005"
    with pytest.raises(ValueError, match="cannot read 'fast'"):
        from_widget(SPECS["optimizer.unet_lr"], "fast")


def test_the_default_form_keeps_optional_numbers_unset():
    values = config_to_form(default_config_dict(), SPECS)
    config, _, problems = form_to_config(values, SPECS)
    assert problems == [] and config.optimizer.unet_lr is None and config.model.t5xxl_max_token_length is None
    values["model.t5xxl_max_token_length"] = "0"
    _, _, problems = form_to_config(values, SPECS)
    assert [problem.path for problem in problems] == ["model.t5xxl_max_token_length"]  # named in the status
