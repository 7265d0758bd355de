"""Config sections for what a run produces and how it is launched: saving, samples, logs, accelerate."""

from __future__ import annotations

from pydantic import field_validator

from engine.config.base import StrictModel, setting
from engine.config.choices import SD_FAMILIES, DynamoBackend, LogWith, Sampler, SaveModelAs, SavePrecision
from engine.config.prompts import parse_prompt_line


class MetadataSection(StrictModel):
    """Information written into the saved file's metadata (modelspec and ss_* keys)."""

    title: str = setting("", "Title shown by model browsers.", use="metadata")
    author: str = setting("", "Your name or handle.", use="metadata")
    description: str = setting("", "What the model does and how to prompt it.", widget="textarea", use="metadata")
    license: str = setting("", "License of the trained file, e.g. 'CreativeML OpenRAIL-M'.", use="metadata")
    tags: str = setting("", "Comma-separated tags, e.g. 'character, anime'.", use="metadata")
    training_comment: str = setting("", "Free text stored as ss_training_comment.", advanced=True,
                                     use="metadata")


class SavingSection(StrictModel):
    """Where and how trained files and resumable states are written."""

    output_dir: str = setting(
        "output", "Folder for trained files, samples and states (relative paths are relative to the config file).",
        widget="folder",
    )
    output_name: str = setting("last", "File name of the trained model, without extension.", min_length=1)
    save_model_as: SaveModelAs = setting(
        "safetensors", "File format; LoRA and embeddings use safetensors, ckpt or pt; full models also diffusers.",
    )
    save_precision: SavePrecision = setting("fp16", "Precision of the saved weights.")
    save_every_n_epochs: int = setting(0, "Also save a file every N epochs (0 = only at the end).", ge=0)
    save_every_n_steps: int = setting(0, "Also save a file every N steps (0 = off).", ge=0, advanced=True)
    save_last_n_epochs: int = setting(
        0, "Keep only the newest N per-epoch files (0 = keep all).", ge=0, advanced=True,
    )
    save_last_n_steps: int = setting(
        0, "Keep only the per-step files of the last N steps (0 = keep all).", ge=0, advanced=True,
    )
    keep_best: bool = setting(
        False, "Keep the saved file with the lowest validation loss even when save_last_n_epochs or "
        "save_last_n_steps would remove it; the validation loss is computed at every save.", advanced=True,
    )
    save_state: bool = setting(
        False, "Save a resumable training state next to each saved file.", advanced=True,
    )
    save_state_on_train_end: bool = setting(
        False, "Save a resumable training state when the run ends, to continue it later.", advanced=True,
    )
    resume: str = setting("", "Resume from a saved state folder.", widget="folder", advanced=True)
    metadata: MetadataSection = setting(
        default_factory=MetadataSection, description="Information stored in the saved file.",
    )

    @field_validator("output_name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if any(char in name for char in '/\\:*?"<>|') or name.strip() != name:
            raise ValueError(f"{name!r} must be a plain file name without folders, surrounding spaces or any of "
                             '/ \\ : * ? " < > |; put the folder in output_dir')
        if name.lower().endswith((".safetensors", ".ckpt", ".pt")):
            raise ValueError("leave the extension out; save_model_as decides it")
        return name


class SamplingSection(StrictModel):
    """Sample images generated during training to watch progress."""

    sample_every_n_steps: int = setting(0, "Generate samples every N steps (0 = off).", ge=0)
    sample_every_n_epochs: int = setting(0, "Generate samples every N epochs (0 = off).", ge=0)
    sample_at_first: bool = setting(False, "Generate samples before the first step, as a reference.")
    sample_sampler: Sampler = setting("euler_a", "Sampler used for sample images (FLUX and SD3 always use their own "
                                      "Euler sampler).", families=SD_FAMILIES)
    sample_prompts: list[str] = setting(
        default_factory=list, widget="prompts",
        description="Prompts, one per line, with options like '--n negative --w 512 --h 512 --d 42 --l 7 --s 28'.",
    )
    sample_prompts_file: str = setting(
        "", "A prompt file (.txt, .toml or .json in sd-scripts' format) instead of the prompts above.",
        widget="file", advanced=True,
    )

    @field_validator("sample_prompts")
    @classmethod
    def _parseable_prompts(cls, prompts: list[str]) -> list[str]:
        for index, line in enumerate(prompts):
            try:
                parse_prompt_line(line)
            except ValueError as error:
                raise ValueError(f"prompt {index + 1}: {error}") from None
        return prompts


class LoggingSection(StrictModel):
    """Training logs for TensorBoard or Weights & Biases."""

    logging_dir: str = setting(
        "", "Folder for TensorBoard/W&B logs; each run writes into its own subfolder <log_prefix><date-time> "
        "(empty = no logs).", widget="folder",
    )
    log_with: LogWith = setting("tensorboard", "Where logs go.", advanced=True)
    log_prefix: str = setting("", "Start of the run's log folder name, before its date and time (e.g. 'mylora-').",
                              advanced=True)
    log_tracker_name: str = setting(
        "", "The tracker's project name (the TensorBoard folder inside the run's log folder, the W&B project); "
        "empty = sd-scripts' name for the method: network_train, dreambooth, finetuning or textual_inversion.",
        advanced=True,
    )


class LaunchSection(StrictModel):
    """How the engine is started: one process, or several GPUs/machines through accelerate."""

    num_processes: int = setting(1, "Training processes, usually one per GPU.", ge=1, le=1024)
    multi_gpu: bool = setting(False, "Train on several GPUs with data parallelism.")
    gpu_ids: list[int] = setting(
        default_factory=list, description="Which GPUs to use, e.g. [0, 1] (empty = all).", advanced=True,
    )
    num_machines: int = setting(1, "Machines taking part in the run.", ge=1, le=1024, advanced=True)
    machine_rank: int = setting(0, "This machine's index among them (0 = the main one).", ge=0, advanced=True)
    main_process_ip: str = setting("", "Address of the main machine (several machines only).", advanced=True)
    main_process_port: int = setting(
        0, "Port on the main machine (0 = accelerate's default, 29500).", ge=0, le=65535, advanced=True,
    )
    num_cpu_threads_per_process: int | None = setting(
        None, "CPU threads each training process uses (torch and OpenMP), one process or several; unset: as the "
        "environment's OMP_NUM_THREADS says, else torch's default for one process and accelerate's for several.",
        ge=1, le=256, advanced=True,
    )
    dynamo_backend: DynamoBackend = setting(
        "no", "Compile the denoiser with torch.compile using this backend (no = off); the first steps are slow "
        "while it traces. inductor is the fast one (needs a C++ compiler on a CPU), cudagraphs needs a GPU. Not with "
        "training.blocks_to_swap.",
        advanced=True,
    )
    accelerate_config_file: str = setting(
        "", "An accelerate config file (e.g. for DeepSpeed or FSDP) passed to accelerate launch.", widget="file",
        advanced=True,
    )
