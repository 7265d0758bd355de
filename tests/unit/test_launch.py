"""The launch command: the engine directly for one process, accelerate's launcher otherwise, checked against
accelerate's own command-line parser and help text."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config.schema import RunConfig
from engine.rundir.launch import ACCELERATE_LAUNCH, describe_command, launch_command, needs_accelerate

PYTHON = "/opt/py/bin/python3"


def make_config(launch=None, training=None):
    data = {"launch": launch or {}, "training": training or {}}
    return RunConfig.model_validate(data, context={"check_packages": False})


@pytest.fixture(scope="module")
def accelerate_help():
    result = subprocess.run([sys.executable, "-m", ACCELERATE_LAUNCH, "--help"], capture_output=True, text=True,
                            check=True, timeout=120)
    return result.stdout


@pytest.fixture(scope="module")
def accelerate_parser():
    from accelerate.commands.launch import launch_command_parser
    return launch_command_parser()


def launcher_options(argv):
    """The accelerate options of a launch command: what comes between the module and `-m engine`."""
    start = argv.index(ACCELERATE_LAUNCH) + 1
    return argv[start:argv.index("-m", start)]


CASES = {
    "multi_gpu": {"launch": {"num_processes": 2, "multi_gpu": True, "gpu_ids": [0, 1], "main_process_port": 29512}},
    "multi_machine": {"launch": {"num_processes": 4, "multi_gpu": True, "num_machines": 2, "machine_rank": 1,
                                 "main_process_ip": "10.0.0.5", "num_cpu_threads_per_process": 4},
                      "training": {"mixed_precision": "bf16"}},
    "config_file": {"launch": {"num_processes": 2, "multi_gpu": True, "accelerate_config_file": "ds.yaml",
                               "dynamo_backend": "inductor"}},
}


def test_one_process_runs_the_engine_directly():
    config = make_config(training={"mixed_precision": "no"})
    assert launch_command(config, "runs/a/config.toml", python=PYTHON) == [
        PYTHON, "-m", "engine", "train", "runs/a/config.toml"]
    assert launch_command(config, Path("c.toml"), run_dir=Path("runs/a"), python=PYTHON, extra_args=["--x"]) == [
        PYTHON, "-m", "engine", "train", "c.toml", "--run-dir", "runs/a", "--x"]


def test_default_python_is_this_interpreter():
    assert launch_command(make_config(), "c.toml")[0] == sys.executable


@pytest.mark.parametrize("launch", [{"gpu_ids": [1]}, {"dynamo_backend": "inductor"},
                                    {"accelerate_config_file": "fsdp.yaml"}])
def test_settings_only_accelerate_applies_go_through_it(launch):
    assert needs_accelerate(make_config(launch).launch)
    assert launch_command(make_config(launch), "c.toml", python=PYTHON)[1:3] == ["-m", ACCELERATE_LAUNCH]


def test_multi_gpu_command():
    argv = launch_command(make_config(**CASES["multi_gpu"]), "c.toml", run_dir="r", python=PYTHON)
    assert argv[:3] == [PYTHON, "-m", ACCELERATE_LAUNCH]
    assert argv[-6:] == ["-m", "engine", "train", "c.toml", "--run-dir", "r"]
    assert launcher_options(argv) == [
        "--num_processes", "2", "--num_machines", "1", "--machine_rank", "0", "--multi_gpu", "--gpu_ids", "0,1",
        "--main_process_port", "29512", "--mixed_precision", "fp16", "--dynamo_backend", "no"]  # threads unset


def test_multi_machine_command_names_the_main_machine_and_a_port():
    options = launcher_options(launch_command(make_config(**CASES["multi_machine"]), "c.toml", python=PYTHON))
    pairs = dict(zip(options, options[1:], strict=False))
    assert pairs["--num_machines"] == "2" and pairs["--machine_rank"] == "1"
    assert pairs["--main_process_ip"] == "10.0.0.5" and pairs["--main_process_port"] == "29500"
    assert pairs["--mixed_precision"] == "bf16" and pairs["--num_cpu_threads_per_process"] == "4"
    assert "--multi_gpu" in options


def test_config_file_is_resolved_and_decides_the_distributed_type(tmp_path):
    config_path = tmp_path / "run" / "config.toml"
    options = launcher_options(launch_command(make_config(**CASES["config_file"]), config_path, python=PYTHON))
    assert options[options.index("--config_file") + 1] == str(tmp_path / "run" / "ds.yaml")
    assert options[options.index("--dynamo_backend") + 1] == "inductor"
    assert "--multi_gpu" not in options  # it would override a DeepSpeed/FSDP distributed_type in the file


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_emitted_flag_is_in_accelerates_help(case, accelerate_help):
    known = set(re.findall(r"--[a-z_]+", accelerate_help)) | {"-m"}
    options = launcher_options(launch_command(make_config(**CASES[case]), "c.toml", python=PYTHON))
    flags = [option for option in options if option.startswith("-")]
    assert flags and set(flags) <= known


@pytest.mark.parametrize("case", sorted(CASES))
def test_accelerates_parser_reads_the_command(case, accelerate_parser, tmp_path):
    config = make_config(**CASES[case])
    argv = launch_command(config, tmp_path / "c t.toml", run_dir=tmp_path / "run dir", python=PYTHON)
    args = accelerate_parser.parse_args(argv[3:])
    launch = config.launch
    assert args.module and args.training_script == "engine"
    assert args.training_script_args == ["train", str(tmp_path / "c t.toml"), "--run-dir", str(tmp_path / "run dir")]
    assert (args.num_processes, args.num_machines, args.machine_rank) == (
        launch.num_processes, launch.num_machines, launch.machine_rank)
    assert args.mixed_precision == config.training.mixed_precision
    assert args.dynamo_backend == launch.dynamo_backend
    assert args.num_cpu_threads_per_process == launch.num_cpu_threads_per_process
    assert args.gpu_ids == (",".join(map(str, launch.gpu_ids)) if launch.gpu_ids else None)


def test_describe_command_quotes_for_a_shell():
    text = describe_command([PYTHON, "-m", "engine", "train", "my runs/config.toml"])
    assert text == f"{PYTHON} -m engine train 'my runs/config.toml'"


def test_modules_import_without_torch():
    code = ("import sys, engine.rundir.launch, engine.rundir.control, engine.rundir.naming; "
            "print(sorted(m for m in ('torch', 'accelerate', 'diffusers', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
