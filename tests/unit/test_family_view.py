"""Which Parameters fields show per model family: derived from the config model's `families`, never a typed list."""

from engine.config.io import default_config_dict
from gui.family_view import FAMILY_FIELD, FamilyBlock, family_specific, is_default, shown_paths, unused_note
from gui.state import config_to_form
from gui.views.parameters import editable_fields

SPECS = editable_fields()


def form(**changes) -> dict:
    values = config_to_form(default_config_dict(), SPECS)
    values.update({path.replace("__", "."): value for path, value in changes.items()})
    return values


def shown_for(family: str, **changes) -> set[str]:
    return shown_paths(SPECS, form(**{FAMILY_FIELD.replace(".", "__"): family}, **changes))


def test_flux_shows_its_files_and_the_flow_section_and_hides_sd_only_fields():
    shown = shown_for("flux1")
    assert {"model.clip_l", "model.t5xxl", "model.ae", "model.tokenizer_cache_dir", "flow.timestep_sampling",
            "flow.guidance_scale", "training.blocks_to_swap"} <= shown
    assert not {"model.clip_skip", "model.v_parameterization", "model.vae", "training.noise_offset",
                "training.min_snr_gamma"} & shown
    assert {"model.pretrained_model_name_or_path", "network.network_dim", "optimizer.learning_rate"} <= shown


def test_chroma_hides_clip_l():
    shown = shown_for("chroma")
    assert {"model.t5xxl", "model.ae"} <= shown and "model.clip_l" not in shown


def test_sd_hides_the_flux_fields_and_auto_shows_everything():
    shown = shown_for("sdxl")
    assert {"model.clip_skip", "optimizer.text_encoder2_lr", "training.noise_offset"} <= shown
    assert not {path for path in SPECS if path.startswith("flow.")} & shown
    assert not {"model.clip_l", "model.t5xxl", "model.ae"} & shown
    assert {"training.blocks_to_swap", "training.cpu_offload_checkpointing"} <= shown  # every family swaps (issue 16)
    assert "optimizer.text_encoder2_lr" not in shown_for("sd1")
    assert shown_for("auto") == set(SPECS)


def test_a_changed_value_of_another_family_stays_in_view_to_be_reset():
    # The config rule refuses clip_skip = 2 with FLUX and names the field: the user must be able to see it.
    assert "model.clip_skip" in shown_for("flux1", model__clip_skip=2)
    assert "model.ae" in shown_for("sd1", model__ae="/models/ae.safetensors")
    assert "training.noise_offset" not in shown_for("flux1", training__noise_offset=0.0)


def test_is_default_reads_the_widget_value_as_the_config_does():
    assert is_default(SPECS["model.clip_skip"], 1.0) == (SPECS["model.clip_skip"].default == 1)
    assert is_default(SPECS["model.ae"], "")
    assert not is_default(SPECS["dataset.general.resolution"], "not a size")


def test_a_part_shows_while_any_of_its_fields_shows():
    block = FamilyBlock("tab", ("flow.sigmoid_scale", "flow.logit_mean"))
    assert block.visible({"flow.logit_mean"}) and not block.visible({"model.ae"})
    flow = [spec for spec in SPECS.values() if spec.section == "flow"]
    assert family_specific(flow)
    assert not family_specific([SPECS["model.ae"], SPECS["model.pretrained_model_name_or_path"]])
    assert not family_specific([])


def test_an_empty_sections_note_shows_while_its_fields_are_hidden():
    flow = [spec for spec in SPECS.values() if spec.section == "flow"]
    note = FamilyBlock("note", tuple(spec.path for spec in flow), when_hidden=True)
    assert note.visible(shown_for("sd1")) and not note.visible(shown_for("chroma"))
    assert unused_note(flow).startswith("Only FLUX.1, Chroma and SD3 / SD3.5 models use these settings")


def test_sd3_shows_its_three_text_encoders_and_its_flow_fields_only():
    shown = shown_for("sd3")
    assert {"model.clip_l", "model.clip_g", "model.t5xxl", "model.vae", "model.apply_lg_attn_mask",
            "model.apply_t5_attn_mask", "model.t5xxl_max_token_length", "model.tokenizer_cache_dir",
            "model.fp8_base", "flow.training_shift", "flow.weighting_scheme", "flow.logit_mean",
            "flow.pos_emb_random_crop_rate", "flow.enable_scaled_pos_embed", "training.clip_l_dropout_rate",
            "training.clip_g_dropout_rate", "training.t5_dropout_rate", "training.blocks_to_swap"} <= shown
    # FLUX's own flow settings and AE file, and the SD UNet options, stay hidden
    assert not {"model.ae", "flow.guidance_scale", "flow.timestep_sampling", "flow.discrete_flow_shift",
                "flow.model_prediction_type", "flow.sigmoid_scale", "model.clip_skip", "model.v_parameterization",
                "training.noise_offset", "training.min_snr_gamma"} & shown
    # and SD3's fields stay out of the other families' forms
    sd3_only = {"model.clip_g", "model.apply_lg_attn_mask", "flow.training_shift", "training.clip_g_dropout_rate"}
    assert not sd3_only & (shown_for("flux1") | shown_for("sdxl"))
    assert sd3_only <= shown_for("auto")
