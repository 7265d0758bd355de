"""Rules about captions and the text encoders (engine.config.rules_text)."""

import pytest

from engine.config.io import validate_config
from engine.config.schema import config_warnings

STOP = "training.stop_text_encoder_training"


def warnings_of(data):
    config = validate_config(data, check_packages=False)
    return {problem.path: problem.message for problem in config_warnings(config)}


@pytest.mark.parametrize("method, fragment", [
    ("lora", "a LoRA trains its text-encoder part to the end"),
    ("textual_inversion", "Textual Inversion trains only its new embedding"),
])
def test_stop_text_encoder_training_warns_for_methods_that_ignore_it(method, fragment):
    data = {"method": method, "training": {"stop_text_encoder_training": 100}}
    if method == "textual_inversion":
        data["embedding"] = {"token_string": "sks", "init_word": "dog"}
    message = warnings_of(data)[STOP]
    assert f"method '{method}' ignores it" in message and fragment in message and "set it back to 0" in message
    data["training"]["stop_text_encoder_training"] = 0
    assert STOP not in warnings_of(data)


def test_stop_text_encoder_training_is_quiet_where_it_stops_a_trained_encoder():
    assert STOP not in warnings_of({"method": "dreambooth", "training": {"stop_text_encoder_training": 0.5}})


def test_stop_text_encoder_training_warns_when_no_text_encoder_trains():
    data = {"method": "dreambooth", "model": {"model_family": "sd1"}, "optimizer": {"text_encoder_lr": 0},
            "training": {"stop_text_encoder_training": 10}}
    assert "no text encoder is trained" in warnings_of(data)[STOP]
    # SDXL's second encoder still trains at its own rate: the stop applies to it.
    sdxl = {**data, "model": {"model_family": "sdxl"}, "optimizer": {"text_encoder_lr": 0, "text_encoder2_lr": 1e-6}}
    assert STOP not in warnings_of(sdxl)
