"""What each tab computes apart from Gradio, in a module named after its tab (gui/views/captioning.py beside
gui/tabs/captioning.py): command lines, paths checked against the roots, and the page's wording. Torch-free."""
