"""Datasets and loaders: the official REPA folder layout, the packed layout, the embedded synthetic data,
a resumable sampler, a dataset factory by layout (open_dataset; open_training_data adds PDE files), a label range check against the model
(check_labels), the torch / DALI loaders (build_loader)."""
from fastrepa.data.folder import REPAFolderDataset
from fastrepa.data.loader import StepSampler, build_loader, check_labels, open_dataset, open_training_data
from fastrepa.data.packed import PackedDataset, PackedFormatError

__all__ = ["REPAFolderDataset", "PackedDataset", "PackedFormatError", "StepSampler", "build_loader",
           "check_labels", "open_dataset", "open_training_data"]
