"""Atelier's browser front end. It never imports torch & co.: training, captioning, caching and the LoRA tools run as
`python -m engine ...` processes that report through their events. From the engine it imports the config
(`engine.config`), the run directory's contract (`engine.rundir`: file names, launching, the control file, output
names, the event reader), `engine.events`, `engine.files` and named light helpers (image and dataset files, the
dataset doctor, model file headers, caption files, family facts, the LoRA tools' options); tests/unit/
test_boundaries.py holds the list."""
