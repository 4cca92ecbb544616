"""Opening a dataset by its layout, a batch sampler that is a pure function of (seed, step, rank) so
training can restart at any step, and the loader over both (torch DataLoader, or DALI for packed data)."""
import os

import numpy as np
from torch.utils.data import DataLoader, Sampler


class StepSampler(Sampler):
    """Index batches for steps start_step, start_step+1, ...: step s uses epoch s // steps_per_epoch.

    Each epoch is a permutation of the dataset drawn from (seed, epoch); the global batch of a step is a
    contiguous slice of it (the last partial batch of an epoch is dropped) and rank r takes its
    local_batch-sized part. Restarting at step s yields exactly the batches an uninterrupted run saw.
    """

    def __init__(self, num_items: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1,
                 start_step: int = 0, num_steps: int | None = None):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by the {world_size} processes")
        if num_items < global_batch:
            raise ValueError(f"the dataset has {num_items} items, fewer than one global batch of {global_batch}")
        self.num_items, self.global_batch, self.seed = num_items, global_batch, seed
        self.rank, self.local_batch = rank, global_batch // world_size
        self.steps_per_epoch = num_items // global_batch
        self.start_step, self.num_steps = start_step, num_steps
        self._perm_epoch, self._perm = None, None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, step: int) -> list[int]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        start = pos * self.global_batch + self.rank * self.local_batch
        return self.permutation(epoch)[start:start + self.local_batch].tolist()

    def __iter__(self):
        step = self.start_step
        while self.num_steps is None or step < self.start_step + self.num_steps:
            yield self.batch(step)
            step += 1

    def __len__(self):
        if self.num_steps is None:
            raise TypeError("StepSampler without num_steps is endless")
        return self.num_steps


def open_dataset(path: str, verify: bool = False):
    """The dataset at `path`, by its layout: a folder with manifest.json is a pack (PackedDataset; verify=True
    also checks every file's sha256), one with images/ and vae-sd/ is the official REPA layout
    (REPAFolderDataset). Both yield (image uint8 [3, H, W], moments float32 [2C, h, w], label int64)."""
    from fastrepa.data.folder import REPAFolderDataset
    from fastrepa.data.packed import MANIFEST, PackedDataset

    if not os.path.isdir(path):
        raise FileNotFoundError(f"dataset folder {path} does not exist (see --data-dir)")
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return PackedDataset(path, verify=verify)
    if os.path.isdir(os.path.join(path, "images")) or os.path.isdir(os.path.join(path, "vae-sd")):
        return REPAFolderDataset(path)
    if os.path.isdir(os.path.join(path, ".pack")):
        raise FileNotFoundError(f"{path} holds an unfinished pack (.pack/ but no {MANIFEST}): rerun "
                                f"`python -m fastrepa.data.pack SRC {path}` to finish it")
    raise FileNotFoundError(f"{path} is neither a packed dataset ({MANIFEST}) nor the official REPA layout "
                            f"(images/ and vae-sd/ with vae-sd/dataset.json); see python -m fastrepa.data.prepare "
                            f"and python -m fastrepa.data.pack")


def open_training_data(cfg):
    """The dataset a TrainConfig trains on: for a PDE-DiT model the train windows of the PDEBench HDF5 file
    --data-dir (fastrepa.data.pde.PDETrainWindows: --pde-reduce, --num-frames, --test-fraction, --seed), else
    the image dataset folder (`open_dataset`), its labels checked against --num-classes."""
    if cfg.model.pde:
        from fastrepa.data.pde import PDETrainWindows
        from fastrepa.models import model_kwargs
        patch = model_kwargs(cfg.model.model, **cfg.model_overrides(), z_dims=[])["patch_size"]
        windows = PDETrainWindows.open(cfg.data.data_dir, reduce=cfg.data.pde_reduce, patch=patch,
                                       frames=cfg.model.num_frames, test_fraction=cfg.data.test_fraction, seed=cfg.seed)
        if cfg.data.feature_cache:  # the encoder's tokens, read instead of computed (fastrepa.data.pde_features)
            from fastrepa.data.pde_features import FeatureCache
            windows.use_features(FeatureCache.open(cfg.data.feature_cache), cfg.objective.enc_path or None)
        return windows
    dataset = open_dataset(cfg.data.data_dir)
    check_labels(dataset, cfg.model.num_classes)
    return dataset


def check_labels(dataset, num_classes: int, flag: str = "--num-classes") -> None:
    """Raise ValueError unless every label of `dataset` (REPAFolderDataset or PackedDataset) is a class of a
    model with `num_classes` classes: 0 <= label < num_classes (index num_classes is the model's null
    class for classifier-free guidance, so a label equal to it would be read as "unconditional")."""
    labels = np.asarray(dataset.labels)
    hi = int(labels.max())
    if hi >= num_classes:
        i = int(np.argmax(labels))
        raise ValueError(f"the labels in {dataset.label_file} go up to {hi} (sample {i}, {dataset.describe(i)}) but "
                         f"{flag} is {num_classes}, so the model knows labels 0..{num_classes - 1} only (label "
                         f"{num_classes} is its unconditional class): pass {flag} {hi + 1} or more, or relabel "
                         f"the dataset")


FIELDS = ("image", "moments", "label")  # the image datasets' samples, in their tuple order


def as_batch(*tensors) -> dict:
    """A batch of the image datasets as the trainer takes it: {"image": uint8 [B, 3, H, W], "moments":
    [B, 2C, h, w], "label": int64 [B]}. Other data (captions, PDE fields) adds keys, not positions."""
    return dict(zip(FIELDS, tensors, strict=True))


class DictLoader:
    """A torch DataLoader whose tuple batches are given as dicts (`as_batch`)."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for tensors in self.loader:
            yield tensors if isinstance(tensors, dict) else as_batch(*tensors)

    def __len__(self):
        return len(self.loader)


def build_loader(dataset, sampler: StepSampler, num_workers: int = 0, pin_memory: bool = False, *,
                 backend: str = "torch", device=None):
    """Batches as dicts (`as_batch`: image uint8 [B, 3, H, W], moments [B, 2C, h, w], label int64 [B]) in the
    sampler's order.

    backend "torch": a DataLoader with `num_workers` processes. backend "dali": fastrepa.data.dali.DALILoader
    (packed datasets only) with `num_workers` CPU threads, decoding on `device` (a CUDA device: the GPU,
    batches arrive on it; None: the GPU when CUDA is available, else the CPU)."""
    if backend == "dali":
        from fastrepa.data.dali import DALILoader
        return DALILoader(dataset, sampler, device=device, num_threads=max(num_workers, 1))
    if backend != "torch":
        raise ValueError(f"data loader backend {backend!r}: expected 'torch' or 'dali'")
    return DictLoader(DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                                 persistent_workers=num_workers > 0))
