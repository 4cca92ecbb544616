"""The official REPA dataset layout, read as the official CustomDataset reads it.

data_dir/images/**.png (or .npy) are the raw images for the encoder; data_dir/vae-sd/**.npy are the
SD-VAE moments cat[mean, std] [2C, h, w]; data_dir/vae-sd/dataset.json holds {"labels": [[fname,
label], ...]} keyed by the feature path relative to vae-sd/. Images and features pair up by sorted order.
"""
import json
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".npy")


def _files(root: str, exts) -> list[str]:
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.lower().endswith(exts):
                found.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return sorted(found)


class REPAFolderDataset(Dataset):
    """Items: (image uint8 [3, H, W], moments float32 [2C, h, w], label int64)."""

    def __init__(self, data_dir: str):
        self.images_dir = os.path.join(data_dir, "images")
        self.features_dir = os.path.join(data_dir, "vae-sd")
        for d in (self.images_dir, self.features_dir):
            if not os.path.isdir(d):
                raise FileNotFoundError(f"dataset folder {d} does not exist (expected the REPA layout: "
                                        f"{data_dir}/images and {data_dir}/vae-sd; see --data-dir)")
        self.image_fnames = _files(self.images_dir, IMAGE_EXTS)
        self.feature_fnames = _files(self.features_dir, (".npy",))
        if not self.feature_fnames:
            raise ValueError(f"no .npy latent files under {self.features_dir}")
        if len(self.image_fnames) != len(self.feature_fnames):
            raise ValueError(f"{self.images_dir} has {len(self.image_fnames)} images but {self.features_dir} has "
                             f"{len(self.feature_fnames)} latent files; they must pair up one to one")
        label_file = os.path.join(self.features_dir, "dataset.json")
        try:
            with open(label_file) as f:
                labels = dict(json.load(f)["labels"])
        except FileNotFoundError:
            raise FileNotFoundError(f"label file {label_file} is missing") from None
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"label file {label_file} is not {{\"labels\": [[fname, label], ...]}}: {e}") from None
        missing = [f for f in self.feature_fnames if f not in labels]
        if missing:
            raise ValueError(f"label file {label_file} has no label for {len(missing)} latent file(s), "
                             f"e.g. {missing[:3]}")
        self.labels = np.array([labels[f] for f in self.feature_fnames], dtype=np.int64)
        self._shapes = None  # (image, moments) shapes of sample 0: every sample must have them

    def _check_shapes(self, idx: int, image: np.ndarray, moments: np.ndarray) -> None:
        """A dataset of mixed resolutions fails naming the odd file, not deep inside batch collation."""
        if self._shapes is None:
            self._shapes = ((image.shape, moments.shape) if idx == 0
                            else (self.load_image(0).shape, self.load_moments(0).shape))
        for part, got, want in (("image", image.shape, self._shapes[0]), ("moments", moments.shape, self._shapes[1])):
            if got != want:
                raise ValueError(f"{self.describe(idx, part)} has shape {tuple(got)} but {self.describe(0, part)} "
                                 f"has {tuple(want)}: a dataset must have one resolution (prepare it again, or "
                                 f"remove the odd file)")

    def __len__(self):
        return len(self.feature_fnames)

    def load_image(self, idx: int) -> np.ndarray:
        path = os.path.join(self.images_dir, self.image_fnames[idx])
        try:
            if path.endswith(".npy"):
                img = np.load(path)
                return img.reshape(-1, *img.shape[-2:])
            with Image.open(path) as im:
                img = np.array(im.convert("RGB"))
        except Exception as e:
            raise ValueError(f"cannot read image {path}: {e}") from None
        return img.transpose(2, 0, 1)

    def load_moments(self, idx: int) -> np.ndarray:
        path = os.path.join(self.features_dir, self.feature_fnames[idx])
        try:
            return np.load(path)
        except Exception as e:
            raise ValueError(f"cannot read latent file {path}: {e}") from None

    def describe(self, idx: int, part: str = "moments") -> str:
        """The file that holds sample idx's image or moments, for error messages."""
        if part == "image":
            return os.path.join(self.images_dir, self.image_fnames[idx])
        return os.path.join(self.features_dir, self.feature_fnames[idx])

    def __getitem__(self, idx):
        image, moments = self.load_image(idx), self.load_moments(idx)
        self._check_shapes(idx, image, moments)
        return (torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(moments).float(),
                torch.tensor(self.labels[idx]))
