"""The commands that start engine processes, and their environment: a training run (the engine directly, or
through `accelerate launch`) and the engine's other commands (`python -m engine ARGS`).

The GUI builds the command here and runs it as an argument list (never a shell string, so paths with spaces or
quotes need no escaping). One process on one machine runs the engine directly: accelerate would only add a few
seconds of start-up. Everything that only accelerate's launcher applies (several processes or machines, a GPU
selection, torch.compile, an accelerate config file) goes through `python -m accelerate.commands.launch`, the
module behind the `accelerate` console script, so the run uses the same Python as the GUI.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from engine.config.io import resolve_path
from engine.config.schema import RunConfig
from engine.config.sections_output import LaunchSection

ACCELERATE_LAUNCH = "accelerate.commands.launch"
ENGINE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the `engine` package
# accelerate's simple launcher asserts a port on several machines; 29500 is what torchrun would pick anyway
DEFAULT_MAIN_PROCESS_PORT = 29500


def needs_accelerate(launch: LaunchSection) -> bool:
    """Whether the run needs accelerate's launcher, i.e. uses a setting only the launcher applies."""
    return (launch.num_processes > 1 or launch.multi_gpu or launch.num_machines > 1 or bool(launch.gpu_ids)
            or launch.dynamo_backend != "no" or bool(launch.accelerate_config_file))


def engine_arguments(config_path: str | Path, run_dir: str | Path | None, extra_args: Sequence[str]) -> list[str]:
    """`engine train CONFIG [--run-dir DIR] [extra...]`, as given to `python -m`."""
    arguments = ["engine", "train", str(config_path)]
    if run_dir is not None:
        arguments += ["--run-dir", str(run_dir)]
    return arguments + list(extra_args)


def _distributed(launch: LaunchSection) -> bool:
    """--multi_gpu starts torchrun, which several machines need even with one GPU each.

    With an accelerate config file the file's distributed_type decides: an explicit --multi_gpu would override
    a DeepSpeed or FSDP setup.
    """
    return (launch.multi_gpu or launch.num_machines > 1) and not launch.accelerate_config_file


def _main_process_port(launch: LaunchSection) -> int:
    if launch.main_process_port or launch.num_machines == 1:
        return launch.main_process_port
    return DEFAULT_MAIN_PROCESS_PORT


def accelerate_arguments(config: RunConfig, config_dir: str | Path) -> list[str]:
    """The `accelerate launch` options for the config's launch section; every value is passed explicitly, so
    accelerate neither warns about defaults nor picks them up from a stray default config file."""
    launch = config.launch
    arguments = ["--num_processes", str(launch.num_processes), "--num_machines", str(launch.num_machines),
                 "--machine_rank", str(launch.machine_rank)]
    if _distributed(launch):
        arguments.append("--multi_gpu")
    if launch.gpu_ids:
        arguments += ["--gpu_ids", ",".join(map(str, launch.gpu_ids))]
    if launch.main_process_ip:
        arguments += ["--main_process_ip", launch.main_process_ip]
    if port := _main_process_port(launch):
        arguments += ["--main_process_port", str(port)]
    arguments += ["--mixed_precision", config.training.mixed_precision, "--dynamo_backend", launch.dynamo_backend]
    if launch.num_cpu_threads_per_process is not None:
        arguments += ["--num_cpu_threads_per_process", str(launch.num_cpu_threads_per_process)]
    if launch.accelerate_config_file:
        arguments += ["--config_file", str(resolve_path(launch.accelerate_config_file, config_dir))]
    return arguments


def launch_command(
    config: RunConfig,
    config_path: str | Path,
    *,
    run_dir: str | Path | None = None,
    python: str = sys.executable,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The argument list that trains `config` (read from config_path) with the given Python.

    A relative accelerate_config_file is resolved against the config file's folder, like every path in it.
    """
    engine = engine_arguments(config_path, run_dir, extra_args)
    if not needs_accelerate(config.launch):
        return [python, "-m", *engine]
    return [python, "-m", ACCELERATE_LAUNCH, *accelerate_arguments(config, Path(config_path).parent), "-m", *engine]


def describe_command(argv: Sequence[str]) -> str:
    """The command as a user could paste it into a POSIX shell, for logs."""
    return shlex.join(argv)


def engine_command(args: Sequence[str], *, python: str = sys.executable) -> list[str]:
    """`python -m engine ARGS` with the given Python (one of the engine's commands other than a training run)."""
    return [python, "-m", "engine", *args]


def engine_environment(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment of an engine process: `base` (default this process's) with `extra` set, output unbuffered
    (so its log shows what it printed until now) and the folder holding `engine` first on PYTHONPATH (so
    `python -m engine` runs this copy whatever the working folder)."""
    env = dict(os.environ if base is None else base, PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ENGINE_ROOT), env.get("PYTHONPATH", "")]))
    return env
