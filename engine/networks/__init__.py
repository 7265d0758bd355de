"""Trainable networks added to a frozen model: kohya LoRA/LoCon (``lora``), LyCORIS types, Textual Inversion."""
