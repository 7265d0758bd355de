"""launch.dynamo_backend compiles the denoiser of an in-process run with torch.compile, and the compiled LoRA run
trains as the uncompiled one (issue 18). The "eager" backend traces with dynamo and runs the captured graphs
without generating code, so it needs no compiler and the two runs do the same arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch._dynamo
from safetensors.torch import load_file
from train_helpers import write_config


def _train(tmp_path: Path, tiny_models: dict[str, Path], name: str, backend: str) -> tuple[Path, str]:
    from accelerate.state import AcceleratorState

    from engine.config.io import load_config
    from engine.train.run import run_training

    AcceleratorState._reset_state(True)
    folder = tmp_path / name
    folder.mkdir()
    config = write_config(folder / "config.toml", tiny_models, launch={"dynamo_backend": backend},
                          training={"max_train_steps": 3})
    run_dir = folder / "run"
    assert run_training(load_config(config, check_packages=False), folder, run_dir=run_dir) == 0
    return folder / "out" / "lora.safetensors", (run_dir / "train.log").read_text(encoding="utf-8")


@pytest.mark.slow
def test_a_compiled_denoiser_trains_as_the_plain_one(tiny_models, tmp_path):
    torch._dynamo.reset()
    plain, plain_log = _train(tmp_path, tiny_models, "plain", "no")
    frames_before = torch._dynamo.utils.counters["frames"]["ok"]
    compiled, compiled_log = _train(tmp_path, tiny_models, "compiled", "eager")
    assert "compiled with torch.compile (backend eager)" in compiled_log and "torch.compile" not in plain_log
    assert torch._dynamo.utils.counters["frames"]["ok"] > frames_before  # dynamo captured the UNet's forward
    expected, actual = load_file(plain), load_file(compiled)
    assert expected.keys() == actual.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(actual[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    torch._dynamo.reset()


def test_a_backend_this_machine_cannot_run_is_refused_before_loading(monkeypatch):
    import shutil

    import pytest

    from engine.config.schema import RunConfig
    from engine.train.placement import check_compile_backend
    from engine.train.setup import RunInputError

    def config(backend: str) -> RunConfig:
        return RunConfig.model_validate({"launch": {"dynamo_backend": backend}}, context={"check_packages": False})

    cpu = torch.device("cpu")
    with pytest.raises(RunInputError, match="needs a CUDA GPU") as refused:
        check_compile_backend(config("cudagraphs"), cpu)
    assert refused.value.where == "launch.dynamo_backend"
    check_compile_backend(config("cudagraphs"), torch.device("cuda", 0))  # fine where there is a GPU
    check_compile_backend(config("aot_eager"), cpu)
    monkeypatch.setattr(shutil, "which", lambda name: None)  # a machine without a C++ compiler
    with pytest.raises(RunInputError, match="no C\\+\\+ compiler"):
        check_compile_backend(config("inductor"), cpu)
