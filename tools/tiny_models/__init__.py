"""Builders for the tiny, random-weight models and data used by Atelier's tests (see tools/make_tiny_model.py).

Everything here runs offline and deterministically: weights come from fixed seeds, tokenizers from hand-written
vocabularies. Nothing is downloaded from a model hub.
"""

# Bump one of these to force a rebuild of that artefact wherever it is stamped (tools/make_tiny_model.py).
# They live here, away from the builders, so that checking a stamp imports neither torch nor diffusers.
SD_VERSION = "1"
CAPTIONER_VERSION = "1"
WD14_VERSION = "1"
DATASET_VERSION = "1"
