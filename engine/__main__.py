"""`python -m engine ...`: the engine's command line."""

from engine.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
