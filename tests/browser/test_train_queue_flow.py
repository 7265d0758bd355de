"""The Train tab with runs going (issue 14), clicked as a user does on the tiny SD1 model: the typed run name is the
output name; the log follows new lines unless the user scrolled up; samples are captioned with step and prompt;
Start while a run is going offers to queue the new run (two at once only when chosen); the queue shows the doctor's
warnings of its runs and takes a run out; texts about one run go away when another is picked; a stopped run shows no
old speed or time left, and a finished one no Resume hint."""

from __future__ import annotations

import re

import pytest
from conftest import EXPECT_TIMEOUT_MS, open_tab
from playwright.sync_api import expect

from engine.config.io import load_config
from gui.runner import RunManager

pytestmark = [pytest.mark.browser, pytest.mark.slow]
SLOW = 240_000
VISIBLE_LOG_LINES = 12  # the Log box's height in lines (gui/tabs/train.py)

SETTINGS = """method = "lora"
[model]
pretrained_model_name_or_path = "{model}"
model_family = "sd1"
[network]
network_dim = 4
network_alpha = 4.0
[dataset]
train_data_dir = "{data}"
[dataset.general]
resolution = {resolution}
batch_size = 4
min_bucket_reso = 64
max_bucket_reso = 256
bucket_no_upscale = false
[training]
max_train_epochs = 0
max_train_steps = {steps}
mixed_precision = "no"
cache_latents = true
[optimizer]
learning_rate = 0.001
[saving]
save_state_on_train_end = true
[sampling]
sample_at_first = true
sample_every_n_steps = 20
sample_prompts = ["sks dog, red square --w 64 --h 64 --s 2 --d 1"]
"""
LOG_AT_END = """([lines, end]) => {
  const box = document.querySelector('#run-log textarea');
  const count = box.value.split('\\n').length;
  return count > lines && (box.scrollTop + box.clientHeight >= box.scrollHeight - 2) === end;
}"""


def load_settings(page, folder, name: str, **values) -> None:
    """Load a config file into the Parameters tab (64 px: no doctor warning; 128 px: the images are upscaled)."""
    path = folder / f"{name}.toml"
    path.write_text(SETTINGS.format(**values), encoding="utf-8")
    open_tab(page, "Parameters")
    page.locator("#params-file textarea, #params-file input").first.fill(str(path))
    page.locator("#params-load").click()
    expect(page.locator("#preset-message")).to_contain_text(name, timeout=90_000)
    expect(page.locator("#validation-status")).to_contain_text("Valid.", timeout=90_000)
    open_tab(page, "Train")


def type_name(page, name: str) -> None:
    page.locator("#train-name textarea, #train-name input").first.fill(name)


def pick(page, box: str, name: str) -> None:
    page.locator(f"#{box} input").click()
    page.get_by_role("option", name=re.compile(name)).click()


def log_lines(page) -> int:
    return len(page.locator("#run-log textarea").input_value().splitlines())


def test_runs_queue_name_and_show_only_their_own_texts(app_page, app_server, tiny_models, work_dir, screenshot):
    page = app_page
    page.set_default_timeout(90_000)
    # The server answers clicks slowly while alpha trains on the same two cores: 30 s instead of 5 for every check.
    expect.set_options(timeout=30_000)
    manager = RunManager(app_server["runs_dir"])
    model, data = tiny_models["sd1_ckpt"], tiny_models["dataset_img"]
    message, status = page.locator("#train-message"), page.locator("#run-status")
    try:
        load_settings(page, work_dir, "long", model=model, data=data, resolution=64, steps=100000)
        type_name(page, "alpha")
        page.locator("#train-start").click()
        expect(message).to_contain_text("Started", timeout=60_000)
        expect(message).to_contain_text("saves its model as alpha")  # the typed name is the output name
        [alpha] = [handle for handle in manager.discover() if handle.name.endswith("-alpha")]
        assert load_config(alpha.config_path, check_packages=False).saving.output_name == "alpha"

        # Samples are labelled with their step and prompt.
        expect(status).to_contain_text(re.compile(r"running · step [1-9]"), timeout=SLOW)
        expect(page.locator("#run-samples")).to_contain_text(re.compile(r"step \d+ · sks dog, red square"),
                                                             timeout=SLOW)
        # The log follows new lines; after the user scrolls up it stays where they read.
        # (the box shows 12 lines; the engine logs a line every 10 steps and one per sample. A sample every 20
        # steps fills it within about 80 steps; every 5 steps, alpha's hundreds of samples in the gallery slowed
        # the page the rest of the test waits on)
        page.wait_for_function(LOG_AT_END, arg=[VISIBLE_LOG_LINES + 1, True], timeout=SLOW)
        page.wait_for_function(LOG_AT_END, arg=[log_lines(page), True], timeout=SLOW)
        page.locator("#run-log textarea").hover()
        page.mouse.wheel(0, -400)
        page.wait_for_function(LOG_AT_END, arg=[log_lines(page), False], timeout=SLOW)
        screenshot(page, "train-queue-flow-running")

        # Start while alpha runs: the page asks; Queue it puts the run in the queue with its doctor warning.
        load_settings(page, work_dir, "short", model=model, data=data, resolution=128, steps=10)
        type_name(page, "beta")
        page.locator("#train-start").click()
        expect(page.locator("#train-busy")).to_be_visible()
        expect(message).to_contain_text("alpha is running")
        assert [handle.name for handle in manager.running()] == [alpha.name]  # nothing started beside it
        page.locator("#train-busy-queue").click()
        expect(message).to_contain_text("Queued (position 1)")
        expect(page.locator("#train-busy")).to_be_hidden()
        queue = page.locator("#run-queue")
        expect(queue).to_contain_text("beta")
        expect(queue).to_contain_text("the doctor's 1 warning(s)")
        expect(queue).to_contain_text("smaller than 128x128")

        # A second queued run is removed again; the first stays.
        type_name(page, "delta")
        page.locator("#train-enqueue").click()
        expect(queue).to_contain_text("delta")
        pick(page, "queue-pick", "delta")
        page.locator("#queue-remove").click()
        expect(message).to_contain_text("Removed")
        expect(queue).not_to_contain_text("delta")
        expect(queue).to_contain_text("beta")

        # Two at once only when the user says so.
        type_name(page, "gamma")
        page.locator("#train-start").click()
        expect(page.locator("#train-busy")).to_be_visible()
        page.locator("#train-busy-both").click()
        expect(message).to_contain_text("Started beside the running run(s)")
        expect(page.locator("#run-picker input")).to_have_value(re.compile("gamma"))
        expect(status).to_contain_text(re.compile("gamma.*(running|finished)"), timeout=SLOW)
        screenshot(page, "train-queue-flow-queued")

        # Alpha: a TensorBoard link and Stop; the stopped run shows no old speed or time left.
        pick(page, "run-picker", "alpha")
        page.locator("#run-tensorboard").click()
        expect(page.locator("#tensorboard-link a")).to_be_visible(timeout=90_000)
        page.locator("#run-stop").click()
        expect(message).to_contain_text(re.compile("Asked .*alpha to stop"))
        expect(status).to_contain_text("stopped", timeout=SLOW)
        expect(status).not_to_contain_text("it/s")
        expect(status).not_to_contain_text("ETA")

        # Picking beta clears what was said about alpha; beta starts from the queue and finishes.
        pick(page, "run-picker", "beta")
        expect(message).not_to_contain_text("alpha")
        expect(page.locator("#tensorboard-link")).not_to_contain_text("TensorBoard")
        expect(status).to_contain_text("finished", timeout=SLOW)
        checkpoints = page.locator("#run-checkpoints")
        expect(checkpoints).to_contain_text("state")  # it saved a state at its end ...
        expect(checkpoints).not_to_contain_text("Resume continues")  # ... but has nothing left to resume
        screenshot(page, "train-queue-flow-finished")
    finally:
        expect.set_options(timeout=EXPECT_TIMEOUT_MS)  # the suite's wait, for the tests after this one
        for handle in manager.running():
            manager.kill(handle)
