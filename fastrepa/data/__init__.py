"""Datasets and loaders: the official REPA folder layout, the embedded synthetic data, a resumable sampler."""
from fastrepa.data.folder import REPAFolderDataset
from fastrepa.data.loader import StepSampler, build_loader

__all__ = ["REPAFolderDataset", "StepSampler", "build_loader"]
