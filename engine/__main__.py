"""`python -m engine ...` (or the `atelier-engine` script): the engine's command line."""

import sys


def main() -> int:
    # Before the imports: the garbage collector is off until the command has loaded its model (engine.startup).
    from engine.startup import pause_collector

    pause_collector()
    if sys.argv[1:2] == ["train"]:
        # Before anything heavy (the CLI pulls in pydantic, training torch): from here on SIGTERM, Ctrl+C and
        # `stop` lines in the run's control file ask for a graceful stop, which the run honours at its next phase
        # boundary instead of dying without a word (engine.rundir.control explains what counts as this run's).
        from engine.rundir.control import watch_from_process_start

        watch_from_process_start(sys.argv[1:])
    from engine.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
