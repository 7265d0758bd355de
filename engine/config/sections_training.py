"""Config sections for how training runs: the optimizer and the training loop (precision, noise, loss, caches)."""

from __future__ import annotations

from pydantic import field_validator

from engine.config.base import StrictModel, setting
from engine.config.choices import (
    FLUX_FAMILIES,
    OPTIMIZERS,
    SD3_FAMILIES,
    SD_FAMILIES,
    Attention,
    HuberSchedule,
    LossType,
    LrScheduler,
    MixedPrecision,
    canonical_optimizer_name,
    class_path_problem,
    is_dotted_class_path,
)

OptimizerArg = str | int | float | bool | list[str | int | float | bool]

# torch.optim's optimizer classes, which sd-scripts takes by their bare name (`RMSprop`) when the name is not one of
# its own (OPTIMIZERS wins: 'Adafactor' is transformers' Adafactor there). Listed, not imported, so `validate` stays
# torch-free; tests/unit/test_optimizers.py checks every name against torch.optim.
TORCH_OPTIMIZERS: tuple[str, ...] = (
    "ASGD", "Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW", "Adamax", "LBFGS", "Muon", "NAdam", "RAdam",
    "RMSprop", "Rprop", "SGD", "SparseAdam",
)
# torch.optim.lr_scheduler's schedules that are built from the optimizer and lr_scheduler_args alone, by bare name as
# sd-scripts' --lr_scheduler_type takes them. Left out: LambdaLR / MultiplicativeLR (need a Python function),
# SequentialLR / ChainedScheduler (need other schedulers), ReduceLROnPlateau (needs a validation metric each step).
TORCH_LR_SCHEDULERS: tuple[str, ...] = (
    "ConstantLR", "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "CyclicLR", "ExponentialLR", "LinearLR",
    "MultiStepLR", "OneCycleLR", "PolynomialLR", "StepLR",
)
_BY_LOWER = {name.lower(): name for name in (*TORCH_OPTIMIZERS, *TORCH_LR_SCHEDULERS)}


def torch_class_name(name: str, known: tuple[str, ...]) -> str | None:
    """torch's spelling of a bare class name of `known` given in any letter case, or None."""
    spelled = _BY_LOWER.get(name.lower())
    return spelled if spelled in known else None


def steps_or_fraction(value: int | float) -> int | float:
    """A length given as whole steps (int) or as a fraction of the run (float below 1)."""
    if isinstance(value, float) and value >= 1:
        raise ValueError(f"{value} is a fraction of the run and must be below 1; write an integer for a number "
                         "of steps")
    return value


class OptimizerSection(StrictModel):
    """The optimizer and learning-rate schedule."""

    optimizer_type: str = setting(
        "AdamW", "Optimizer: AdamW, AdamW8bit, Lion, Prodigy, Adafactor, ..., a torch.optim class name such as "
        "RMSprop, or a class path from torch, transformers, bitsandbytes or an optimizer package, e.g. "
        "'torch.optim.RAdam' or 'bitsandbytes.optim.AdEMAMix8bit'.",
    )
    learning_rate: float = setting(
        1e-4, "Base learning rate (about 1e-4 for LoRA, 1e-6 for DreamBooth, 1.0 for Prodigy/D-Adaptation).",
        gt=0.0, le=10.0,
    )
    unet_lr: float | None = setting(
        None, "Learning rate for the UNet; empty uses learning_rate, 0 freezes the UNet.", ge=0.0, le=10.0,
    )
    text_encoder_lr: float | None = setting(
        None, "Learning rate for the text encoder (FLUX and SD3: all of them); empty uses learning_rate, 0 freezes it.",
        ge=0.0, le=10.0,
    )
    text_encoder2_lr: float | None = setting(
        None, "SDXL only: learning rate for the second text encoder; empty uses text_encoder_lr.",
        ge=0.0, le=10.0, advanced=True, families=("sdxl",),
    )
    optimizer_args: dict[str, OptimizerArg] = setting(
        default_factory=dict, description="Extra optimizer arguments, e.g. {weight_decay = 0.01, betas = [0.9, 0.99]}.",
        advanced=True,
    )
    max_grad_norm: float = setting(1.0, "Clip gradients to this norm (0 = no clipping).", ge=0.0, advanced=True)
    fused_backward_pass: bool = setting(
        False, "Adafactor only: update each weight as soon as its gradient is ready and free that gradient, so a "
        "full fine-tune never holds all gradients at once (much less memory); max_grad_norm then clips each tensor "
        "on its own. Needs gradient_accumulation_steps = 1.", advanced=True,
    )
    lr_scheduler: LrScheduler = setting("cosine", "How the learning rate changes over the run.")
    lr_warmup_steps: int | float = setting(
        0, "Warm-up: a whole number of steps, or a fraction of the run below 1 (e.g. 0.05).", ge=0,
    )
    lr_scheduler_num_cycles: int = setting(
        1, "Restarts for cosine_with_restarts.", ge=1, le=1000, advanced=True,
    )
    lr_scheduler_power: float = setting(1.0, "Power of the polynomial schedule.", gt=0.0, advanced=True)
    lr_scheduler_args: dict[str, OptimizerArg] = setting(
        default_factory=dict, description="Extra scheduler arguments, e.g. {min_lr_ratio = 0.1}; with "
        "lr_scheduler_type, all of that class's arguments, e.g. {T_max = 1000, eta_min = 1e-6}.", advanced=True,
    )
    lr_scheduler_type: str = setting(
        "", "A scheduler class used instead of lr_scheduler, as sd-scripts' --lr_scheduler_type: a "
        "torch.optim.lr_scheduler name such as CosineAnnealingLR, or a class path from torch, transformers or "
        "diffusers; it gets the optimizer and lr_scheduler_args (counts in scheduler steps: optimizer steps x "
        "processes), and no warm-up (empty = use lr_scheduler).", advanced=True,
    )

    @field_validator("optimizer_type")
    @classmethod
    def _known_optimizer(cls, name: str) -> str:
        canonical = canonical_optimizer_name(name) or torch_class_name(name, TORCH_OPTIMIZERS)
        if canonical is not None:
            return canonical
        if is_dotted_class_path(name):
            problem = class_path_problem(name)  # checked here, without importing, so `validate` refuses it
            if problem is not None:
                raise ValueError(problem)
            return name
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}, a torch.optim class "
                         f"({', '.join(TORCH_OPTIMIZERS)}), or give a full class path such as 'torch.optim.RAdam'")

    @field_validator("lr_scheduler_type")
    @classmethod
    def _known_scheduler_class(cls, name: str) -> str:
        if not name:
            return name
        canonical = torch_class_name(name, TORCH_LR_SCHEDULERS)
        if canonical is not None:
            return canonical
        if is_dotted_class_path(name):
            problem = class_path_problem(name)  # without importing, so `validate` refuses it (exit 2)
            if problem is not None:
                raise ValueError(problem)
            return name
        raise ValueError(f"unknown scheduler class {name!r}; give one of {', '.join(TORCH_LR_SCHEDULERS)}, or a "
                         "full class path such as 'torch.optim.lr_scheduler.OneCycleLR'; leave it empty to use "
                         "lr_scheduler")

    _warmup_form = field_validator("lr_warmup_steps")(steps_or_fraction)


class TrainingSection(StrictModel):
    """The training loop: length, precision, memory savers, noise and loss."""

    max_train_epochs: int = setting(10, "Epochs to train (one epoch sees every image its repeats times).",
                                    ge=0, le=100000)
    max_train_steps: int = setting(
        0, "Steps to train instead of epochs; 0 uses max_train_epochs. Set only one of the two.", ge=0,
        le=10_000_000,
    )
    stop_text_encoder_training: int | float = setting(
        0, "DreamBooth/fine-tuning: stop training the text encoder after this many steps, or this fraction of the "
        "run below 1 (0 = train it to the end).", ge=0, advanced=True,
    )
    gradient_accumulation_steps: int = setting(
        1, "Add up gradients over this many batches before each update (a larger effective batch).",
        ge=1, le=1024, advanced=True,
    )
    mixed_precision: MixedPrecision = setting(
        "fp16", "Compute precision: fp16 for most GPUs, bf16 for RTX 30xx and newer, no for CPU.",
    )
    full_fp16: bool = setting(False, "Keep trained weights in fp16 too (less memory, less stable).", advanced=True,
                              group="precision")
    full_bf16: bool = setting(False, "Keep trained weights in bf16 too (less memory).", advanced=True,
                              group="precision")
    gradient_checkpointing: bool = setting(
        False, "Recompute activations in the backward pass: much less memory, about 20% slower.",
    )
    blocks_to_swap: int = setting(
        0, "Every family: keep this many blocks in CPU memory and move them to the GPU only while they run; saves "
        "VRAM, slows training. 0 = off. FLUX: transformer blocks (about 0.6 GB each), at most 35 (e.g. 18 for 16 GB, "
        "16+ for 12 GB); SD3: the blocks minus 2 (22 for medium models, 36 for SD3.5 large); SD1/SD2/SDXL: UNet "
        "resnets and transformer blocks, the last ones first, at most 36 for SD1/SD2 and 85 for SDXL. Full "
        "fine-tuning (not FLUX) needs optimizer.fused_backward_pass.",
        ge=0, le=100,
    )
    cpu_offload_checkpointing: bool = setting(
        False, "Every family (FLUX, SD3, SD1/SD2/SDXL): keep gradient checkpointing's saved activations in CPU memory "
        "(about 1 GB less VRAM for FLUX, ~15% slower); needs gradient_checkpointing, not with blocks_to_swap.",
        advanced=True,
    )
    attention: Attention = setting(
        "sdpa", "Attention kernel: PyTorch's SDPA, xformers (needs the gpu extra), or none (plain).", advanced=True,
    )
    seed: int = setting(42, "Random seed; the same seed and settings give the same run.", ge=0, le=2**32 - 1)
    cache_latents: bool = setting(
        True, "Encode every image with the VAE once before training: faster and less memory.", group="caching",
    )
    cache_latents_to_disk: bool = setting(
        False, "Keep the latent cache on disk so later runs reuse it.", group="caching",
    )
    cache_text_encoder_outputs: bool = setting(
        False, "Encode captions once before training; needs fixed captions and a frozen text encoder.",
        advanced=True, group="caching",
    )
    cache_on_device: bool = setting(
        False, "Keep the cached latents and text-encoder outputs in GPU memory for the whole run instead of copying "
        "each batch from system memory (uses GPU memory; needs max_data_loader_n_workers = 0).", advanced=True,
        group="caching",
    )
    vae_batch_size: int = setting(1, "Images encoded at once while caching latents.", ge=1, le=256, advanced=True,
                                  group="caching")
    clip_l_dropout_rate: float = setting(
        0.0, "SD3: chance per image of training without CLIP-L's output (it is zeroed), so the model also works "
        "without it (0 = off).", ge=0.0, le=1.0, advanced=True, group="text dropout", families=SD3_FAMILIES,
    )
    clip_g_dropout_rate: float = setting(
        0.0, "SD3: chance per image of training without CLIP-G's output (0 = off).", ge=0.0, le=1.0, advanced=True,
        group="text dropout", families=SD3_FAMILIES,
    )
    t5_dropout_rate: float = setting(
        0.0, "SD3: chance per image of training without T5's output, e.g. for use without T5 later (0 = off).",
        ge=0.0, le=1.0, advanced=True, group="text dropout", families=SD3_FAMILIES,
    )
    noise_offset: float = setting(
        0.0, "Adds a constant offset to the noise so the model learns very dark and bright images (0.05-0.1).",
        ge=0.0, le=1.0, advanced=True, group="noise", families=SD_FAMILIES,
    )
    noise_offset_random_strength: bool = setting(
        False, "Use a random noise offset between 0 and noise_offset each step.", advanced=True, group="noise",
        families=SD_FAMILIES,
    )
    adaptive_noise_scale: float = setting(
        0.0, "Grows the noise offset with each latent's mean; needs noise_offset.", ge=-1.0, le=1.0,
        advanced=True, group="noise", families=SD_FAMILIES,
    )
    multires_noise_iterations: int = setting(
        0, "Multi-resolution (pyramid) noise iterations, 6-10 is typical (0 = off).", ge=0, le=64, advanced=True,
        group="noise", families=SD_FAMILIES,
    )
    multires_noise_discount: float = setting(
        0.3, "Strength falloff of each multi-resolution noise level.", ge=0.0, le=1.0, advanced=True, group="noise",
        families=SD_FAMILIES,
    )
    ip_noise_gamma: float = setting(
        0.0, "Input-perturbation noise strength, about 0.1 (0 = off).", ge=0.0, le=1.0, advanced=True, group="noise",
        families=(*SD_FAMILIES, *FLUX_FAMILIES),
    )
    ip_noise_gamma_random_strength: bool = setting(
        False, "Use a random input-perturbation strength between 0 and ip_noise_gamma each step.", advanced=True,
        group="noise", families=(*SD_FAMILIES, *FLUX_FAMILIES),
    )
    min_snr_gamma: float = setting(
        0.0, "Min-SNR loss weighting; 5 is the usual value (0 = off).", ge=0.0, le=100.0, advanced=True,
        group="loss", families=SD_FAMILIES,
    )
    loss_type: LossType = setting("l2", "Loss function.", advanced=True, group="loss")
    masked_loss: bool = setting(
        False, "Learn only where each image's mask is white: the masks are the images of the same name in the "
        "subsets' conditioning_data_dir (alpha_mask subsets use the alpha channel either way).", advanced=True,
        group="loss",
    )
    huber_schedule: HuberSchedule = setting(
        "snr", "How the Huber loss's threshold varies with the timestep.", advanced=True, group="loss",
    )
    huber_c: float = setting(0.1, "Huber loss threshold.", gt=0.0, le=10.0, advanced=True, group="loss")
    huber_scale: float = setting(
        1.0, "Scale of the Huber threshold for the constant and exponential schedules.", gt=0.0, le=10.0,
        advanced=True, group="loss",
    )
    scale_v_pred_loss_like_noise_pred: bool = setting(
        False, "Weight the v-prediction loss like a noise-prediction loss.", advanced=True, group="loss",
        families=SD_FAMILIES,
    )
    debiased_estimation_loss: bool = setting(
        False, "Debiased estimation loss weighting.", advanced=True, group="loss", families=SD_FAMILIES,
    )
    zero_terminal_snr: bool = setting(
        False, "Rescale the noise schedule to reach pure noise at the last step (use with v-prediction).",
        advanced=True, group="noise", families=SD_FAMILIES,
    )
    min_timestep: int = setting(0, "Lowest noise timestep trained (SD3: noise level x 1000).", ge=0, le=999,
                                advanced=True, group="noise", families=(*SD_FAMILIES, *SD3_FAMILIES))
    max_timestep: int = setting(1000, "Highest noise timestep trained (exclusive; SD3: noise level x 1000).", ge=1,
                                le=1000, advanced=True, group="noise", families=(*SD_FAMILIES, *SD3_FAMILIES))
    prior_loss_weight: float = setting(
        1.0, "Loss weight of regularization images relative to training images.", ge=0.0, le=100.0,
    )
    _stop_form = field_validator("stop_text_encoder_training")(steps_or_fraction)

    max_data_loader_n_workers: int = setting(
        0, "Processes loading images in parallel (0 = in the training process).", ge=0, le=64, advanced=True,
    )
    persistent_data_loader_workers: bool = setting(
        False, "Keep loader processes alive between epochs (faster epochs, more memory).", advanced=True,
    )
