"""Running `python -m engine lora ...` in-process through its own parser, for the LoRA tool tests."""

from __future__ import annotations

import argparse
import json

from engine.cli import lora_cmd


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """`python -m engine lora ...` through its own parser; returns (exit code, stdout, stderr)."""
    parser = argparse.ArgumentParser()
    lora_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args(["lora", *(str(arg) for arg in args)])
    code = parsed.handler(parsed)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys, *args) -> tuple[int, dict]:
    code, out, _ = run_cli(capsys, *args, "--json")
    return code, json.loads(out)
