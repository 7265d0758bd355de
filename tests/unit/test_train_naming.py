"""Checkpoint names, retention and the save/sample predicates, against sd-scripts' rules (spec §7, §8)."""

import pytest

from engine.config.sections_output import SamplingSection
from engine.rundir import naming
from engine.rundir.naming import (
    epoch_files_to_remove,
    epoch_save_due,
    epoch_stem,
    file_name,
    last_stem,
    name_in_use,
    sample_due_after_epoch,
    sample_due_after_step,
    state_dir_name,
    step_files_to_remove,
    step_save_due,
    step_stem,
    unique_output_name,
)


def test_stems_follow_sd_scripts_examples():
    assert epoch_stem("name", 1) == "name-000001"
    assert step_stem("name", 500) == "name-step00000500"
    assert last_stem("name") == "name"
    assert state_dir_name(epoch_stem("name", 3)) == "name-000003-state"
    assert state_dir_name(step_stem("name", 500)) == "name-step00000500-state"
    assert state_dir_name(last_stem("name")) == "name-state"


@pytest.mark.parametrize(("save_as", "expected"), [
    ("safetensors", "name-000001.safetensors"), ("ckpt", "name-000001.ckpt"), ("pt", "name-000001.pt"),
    ("diffusers", "name-000001"), ("diffusers_safetensors", "name-000001"),
])
def test_file_names_per_format(save_as, expected):
    assert file_name(epoch_stem("name", 1), save_as) == expected


def test_every_save_format_has_an_extension():
    from typing import get_args

    from engine.config.choices import SaveModelAs
    assert set(naming.EXTENSIONS) == set(get_args(SaveModelAs))


def simulate_epochs(num_epochs, every_n, keep_last_n):
    """The set of per-epoch stems on disk after a run that saves and prunes as the trainer does."""
    on_disk = set()
    for epoch in range(1, num_epochs + 1):
        if epoch_save_due(epoch, num_epochs, every_n):
            on_disk.add(epoch_stem("n", epoch))
            on_disk -= set(epoch_files_to_remove("n", epoch, every_n=every_n, keep_last_n=keep_last_n))
    return on_disk


@pytest.mark.parametrize(("num_epochs", "every_n", "keep"), [(10, 1, 3), (20, 2, 2), (13, 3, 1), (7, 2, 5)])
def test_epoch_retention_keeps_the_newest_k_saves(num_epochs, every_n, keep):
    saved = [epoch for epoch in range(1, num_epochs + 1) if epoch_save_due(epoch, num_epochs, every_n)]
    assert simulate_epochs(num_epochs, every_n, keep) == {epoch_stem("n", epoch) for epoch in saved[-keep:]}


def test_epoch_retention_removes_epoch_minus_n_times_k():
    assert epoch_files_to_remove("n", 10, every_n=2, keep_last_n=3) == [epoch_stem("n", 4)]
    assert epoch_files_to_remove("n", 6, every_n=2, keep_last_n=3) == []  # epoch 0 was never saved
    assert epoch_files_to_remove("n", 10, every_n=2, keep_last_n=0) == []  # 0 = keep all


def test_step_retention_matches_the_spec_formula():
    # keep the saves of the last 300 steps: at step 500 (saves every 100) step 100 goes, 200..500 stay
    assert step_files_to_remove("n", 500, every_n=100, keep_last_n_steps=300) == [step_stem("n", 100)]
    assert step_files_to_remove("n", 500, every_n=100, keep_last_n_steps=250) == [step_stem("n", 200)]
    assert step_files_to_remove("n", 300, every_n=100, keep_last_n_steps=300) == []
    assert step_files_to_remove("n", 500, every_n=100, keep_last_n_steps=0) == []


@pytest.mark.parametrize(("every_n", "keep_steps"), [(100, 300), (100, 250), (7, 20), (5, 5), (10, 1)])
def test_step_retention_keeps_saves_within_the_last_s_steps(every_n, keep_steps):
    on_disk = set()
    for step in range(1, 1001):
        if step_save_due(step, every_n):
            on_disk.add(step)
            on_disk -= {int(stem.rsplit("step", 1)[1])
                        for stem in step_files_to_remove("n", step, every_n=every_n, keep_last_n_steps=keep_steps)}
        # invariant after every step: exactly the saves no older than `keep_steps` steps ago are kept
        last_save = step - step % every_n
        assert on_disk == {s for s in range(every_n, last_save + 1, every_n) if s >= last_save - keep_steps}


def test_epoch_save_is_never_due_on_the_last_epoch():
    assert [e for e in range(1, 11) if epoch_save_due(e, 10, 2)] == [2, 4, 6, 8]
    assert [e for e in range(1, 11) if epoch_save_due(e, 10, 0)] == []


def test_step_save_due_every_n_steps():
    assert [s for s in range(0, 31) if step_save_due(s, 10)] == [10, 20, 30]
    assert not any(step_save_due(s, 0) for s in range(0, 31))


def test_sampling_by_steps():
    section = SamplingSection(sample_every_n_steps=5, sample_prompts=["a cat"])
    assert [s for s in range(1, 21) if sample_due_after_step(s, section)] == [5, 10, 15, 20]
    assert not any(sample_due_after_epoch(e, section) for e in range(1, 5))


def test_sampling_by_epochs_overrides_steps():
    section = SamplingSection(sample_every_n_steps=5, sample_every_n_epochs=2, sample_prompts=["a cat"])
    assert not any(sample_due_after_step(s, section) for s in range(1, 21))
    assert [e for e in range(1, 7) if sample_due_after_epoch(e, section)] == [2, 4, 6]


def test_sampling_off_by_default():
    section = SamplingSection()
    assert not naming.sample_due_at_start(section)
    assert not any(sample_due_after_step(s, section) for s in range(1, 10))
    assert not any(sample_due_after_epoch(e, section) for e in range(1, 10))
    assert naming.sample_due_at_start(SamplingSection(sample_at_first=True, sample_prompts=["a"]))


# --- unique output names ---------------------------------------------------------------------------------------


def test_free_name_is_kept(tmp_path):
    assert unique_output_name(tmp_path, "last", "safetensors") == ("last", False)
    assert unique_output_name(tmp_path / "missing", "last", "safetensors") == ("last", False)


@pytest.mark.parametrize("existing", [
    "last.safetensors", "last-state", "last-000002.safetensors", "last-step00000500.safetensors",
    "last-000001-state", "last-step00000010-state",
])
def test_existing_outputs_get_a_suffix(tmp_path, existing):
    target = tmp_path / existing
    target.mkdir() if existing.endswith("-state") else target.write_bytes(b"user's")
    assert unique_output_name(tmp_path, "last", "safetensors") == ("last-2", True)
    assert target.exists()


def test_suffix_counts_up_past_taken_names(tmp_path):
    for existing in ("last.safetensors", "last-2.safetensors", "last-3-state"):
        (tmp_path / existing).mkdir() if existing.endswith("-state") else (tmp_path / existing).write_bytes(b"")
    assert unique_output_name(tmp_path, "last", "safetensors") == ("last-4", True)


def test_unrelated_files_do_not_count(tmp_path):
    for existing in ("last.ckpt", "lastly.safetensors", "last-2.safetensors", "last-01.safetensors", "other-state"):
        (tmp_path / existing).write_bytes(b"")
    assert unique_output_name(tmp_path, "last", "safetensors") == ("last", False)


def test_diffusers_outputs_are_folders(tmp_path):
    (tmp_path / "model").mkdir()
    assert name_in_use(tmp_path, "model", "diffusers")
    assert unique_output_name(tmp_path, "model", "diffusers_safetensors") == ("model-2", True)


def test_names_with_regex_characters(tmp_path):
    (tmp_path / "a+b.safetensors").write_bytes(b"")
    assert not name_in_use(tmp_path, "a", "safetensors")
    assert name_in_use(tmp_path, "a+b", "safetensors")


def test_resuming_a_state_of_the_name_keeps_it(tmp_path):
    (tmp_path / "last-000002.safetensors").write_bytes(b"")
    state = tmp_path / "last-000002-state"
    state.mkdir()
    assert unique_output_name(tmp_path, "last", "safetensors", resume_from=state) == ("last", False)
    elsewhere = tmp_path / "elsewhere" / "last-000002-state"
    elsewhere.mkdir(parents=True)
    assert unique_output_name(tmp_path, "last", "safetensors", resume_from=elsewhere) == ("last-2", True)
    other = tmp_path / "other-000001-state"
    other.mkdir()
    assert unique_output_name(tmp_path, "last", "safetensors", resume_from=other) == ("last-2", True)


@pytest.mark.parametrize("existing", ["model_clip_l.safetensors", "model_clip_g.safetensors",
                                      "model-step00000010_t5xxl.safetensors"])
def test_a_users_file_named_like_a_text_encoder_sibling_is_not_overwritten(tmp_path, existing):
    """SD3 fine-tuning writes `<name>_clip_l.safetensors` ... beside its model: a file of such a name that the run
    did not write (the user's CLIP-L, an older run's) makes the run choose another name instead of replacing it."""
    (tmp_path / existing).write_bytes(b"user's")
    assert name_in_use(tmp_path, "model", "safetensors")
    assert unique_output_name(tmp_path, "model", "safetensors") == ("model-2", True)
    assert not name_in_use(tmp_path, "other", "safetensors")
