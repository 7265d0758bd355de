"""Datasets: scanning folders and metadata, images, buckets, captions, the batch sampler and the dataset doctor.

Scanning and checking never import torch, so the doctor runs fast and the GUI can call into the config side.
"""
