"""SD3 medium, SD3.5 medium and SD3.5 large (issue 13): the MMDiT transformer, its conversion, files and text.

Import the submodules you need; this file imports nothing, so that the light ones (sizing a model from a file's
header, say) do not pull in torch.
"""
