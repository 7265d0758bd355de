"""The run directory's contract: what the GUI (or a user in a shell) and a training process agree on.

A run directory holds `config.toml` (the run's config, every path absolute), `events.jsonl` (what the run tells
its readers, docs/events.md), `train.log` (the same story for people), `control` (commands to the run) and, after
a crash, `error-traceback.txt`. The modules, by responsibility:

- :mod:`.layout`: the file names and their paths in a run directory;
- :mod:`.launch`: the command (and the environment) that starts an engine process;
- :mod:`.control`: the control file: sending stop/save/sample, and the run's side that watches for them;
- :mod:`.naming`: what the saved models and states are called, which old ones go, when saving is due;
- :mod:`.event_reader`: the one reader of JSON-lines event files, whole or incrementally (tailing).

Nothing here imports torch: the GUI imports this package. This file imports none of its modules, so that
`python -m engine train` can load the control module before anything heavy (pydantic included).
"""
