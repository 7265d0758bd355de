"""Write docs/parameters.md from the config model. A test fails when the file is out of date."""

from __future__ import annotations

from pathlib import Path

from engine.config.reference import parameters_markdown

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "parameters.md"


def main() -> None:
    DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
    DOC_PATH.write_text(parameters_markdown(), encoding="utf-8")
    print(f"wrote {DOC_PATH}")


if __name__ == "__main__":
    main()
