"""The comparison grid (`python -m engine compare`): every checkpoint x prompt x strength x seed of a run, rendered
with the run's own sampler around a base model loaded once, written as one labelled grid PNG per prompt plus a
JSON index.

- :mod:`.plan`: what to render (checkpoints, prompts, strengths, seeds) and the run's validation losses; light, no
  torch, so the GUI lists a run's checkpoints and prompts with it;
- :mod:`.grid`: the grid picture and the JSON index (PIL only);
- :mod:`.render`: the model, the network and the loop over cells (torch, diffusers).
"""
