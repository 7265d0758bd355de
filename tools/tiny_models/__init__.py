"""Builders for the tiny, random-weight models and data used by Atelier's tests (see tools/make_tiny_model.py).

Everything here runs offline and deterministically: weights come from fixed seeds, the SD tokenizers from the CLIP
vocabulary shipped with the package, the captioners' from a hand-written one. Nothing is downloaded from a model hub.
"""

# Bump one of these to force a rebuild of that artefact wherever it is stamped (tools/make_tiny_model.py).
# They live here, away from the builders, so that checking a stamp imports neither torch nor diffusers.
SD_VERSION = "2"
CAPTIONER_VERSION = "1"
WD14_VERSION = "1"
DATASET_VERSION = "1"
