"""Captioning whole folders: BLIP and GIT (transformers) and WD14 (onnxruntime) behind one interface."""
