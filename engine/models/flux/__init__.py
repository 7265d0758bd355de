"""FLUX.1 and Chroma models (issue 12): transformer, AE, text encoders and their loading.

Import the submodules you need; this file imports nothing, so that the light ones (reading a file header, say)
do not pull in torch.
"""
