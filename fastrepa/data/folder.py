"""The official REPA dataset layout, read as the official CustomDataset reads it.

data_dir/images/**.png (or .npy) are the raw images for the encoder; data_dir/vae-sd/**.npy are the
SD-VAE moments cat[mean, std] [2C, h, w]; data_dir/vae-sd/dataset.json holds {"labels": [[fname,
label], ...]} keyed by the feature path relative to vae-sd/. Images and features pair up by sorted order;
where both names follow the prepare pattern (img00000123.png <-> img-mean-std-00000123.npy) their
numbers must agree. Every latent file needs an integer class label >= 0 and every label a latent file.
"""
import json
import os
import re

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".npy")
_IMAGE_NUMBER = re.compile(r"(?:.*/)?img(\d+)\.[^./]+")
_FEATURE_NUMBER = re.compile(r"(?:.*/)?img-mean-std-(\d+)\.npy")


def _files(root: str, exts) -> list[str]:
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.lower().endswith(exts):
                found.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return sorted(found)


class REPAFolderDataset(Dataset):
    """Items: (image uint8 [3, H, W], moments float32 [2C, h, w], label int64).

    Attributes: images_dir, features_dir, image_fnames, feature_fnames (sorted, sample i = entry i),
    labels (int64 array), label_file (vae-sd/dataset.json), num_classes (largest label + 1)."""

    def __init__(self, data_dir: str):
        self.images_dir = os.path.join(data_dir, "images")
        self.features_dir = os.path.join(data_dir, "vae-sd")
        self.label_file = os.path.join(self.features_dir, "dataset.json")
        for d, what in ((self.images_dir, "the raw images for the encoder"),
                        (self.features_dir, "the SD-VAE latents, python -m fastrepa.data.prepare writes both")):
            if not os.path.isdir(d):
                raise FileNotFoundError(f"dataset folder {d} does not exist ({what}); expected the REPA layout "
                                        f"{data_dir}/images and {data_dir}/vae-sd (see --data-dir)")
        self.image_fnames = _files(self.images_dir, IMAGE_EXTS)
        self.feature_fnames = _files(self.features_dir, (".npy",))
        if not self.feature_fnames:
            raise ValueError(f"no .npy latent files under {self.features_dir}")
        if len(self.image_fnames) != len(self.feature_fnames):
            raise ValueError(f"{self.images_dir} has {len(self.image_fnames)} images but {self.features_dir} has "
                             f"{len(self.feature_fnames)} latent files; they must pair up one to one")
        self._check_pairing()
        self.labels = self._read_labels()
        self.num_classes = int(self.labels.max()) + 1  # classes the labels need (the largest label + 1)
        self._shapes = None  # (image, moments) shapes of sample 0: every sample must have them

    def _check_pairing(self) -> None:
        """Sample i is the i-th image and the i-th latent file by sorted name; where both names carry the
        prepare numbering, a missing file on each side (equal counts, shifted pairs) is caught here."""
        for i, (a, b) in enumerate(zip(self.image_fnames, self.feature_fnames)):
            ma, mb = _IMAGE_NUMBER.fullmatch(a), _FEATURE_NUMBER.fullmatch(b)
            if ma and mb and int(ma.group(1)) != int(mb.group(1)):
                raise ValueError(f"sample {i} pairs image {self.describe(i, 'image')} with latent file "
                                 f"{self.describe(i)}, whose numbers differ ({int(ma.group(1))} vs "
                                 f"{int(mb.group(1))}): the two folders do not pair up (a file missing on each side, "
                                 f"or renamed). Restore or remove the unpaired files, or prepare the dataset again")

    def _read_labels(self) -> np.ndarray:
        """The integer class label of every latent file, from vae-sd/dataset.json."""
        path = self.label_file
        form = '{"labels": [[fname, label], ...]}'
        try:
            with open(path) as f:
                entries = json.load(f)["labels"]
        except FileNotFoundError:
            raise FileNotFoundError(f"label file {path} is missing (expected {form})") from None
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"label file {path} is not {form}: {e}") from None
        if entries is None:
            raise ValueError(f"label file {path} has \"labels\": null (an unlabelled dataset): class-conditional "
                             f"training needs an integer class label for every latent file; prepare the data "
                             f"from class folders (python -m fastrepa.data.prepare) or write {form}")
        try:
            labels = dict(entries)
        except (TypeError, ValueError) as e:
            raise ValueError(f"label file {path} is not {form}: {e}") from None
        missing = [f for f in self.feature_fnames if f not in labels]
        if missing:
            raise ValueError(f"label file {path} has no label for {len(missing)} latent file(s), "
                             f"e.g. {missing[:3]}")
        if len(labels) > len(self.feature_fnames):
            have = set(self.feature_fnames)
            extra = [k for k in labels if k not in have]
            raise ValueError(f"label file {path} has labels for {len(extra)} name(s) that are no latent file under "
                             f"{self.features_dir}, e.g. {extra[:3]}: a latent file was deleted, or the labels "
                             f"belong to another dataset")
        values = [labels[f] for f in self.feature_fnames]
        try:
            fast = np.asarray(values)
        except ValueError:  # ragged lists
            fast = None
        if fast is not None and fast.ndim == 1 and fast.dtype.kind in "iu" and fast.min() >= 0:
            return fast.astype(np.int64)
        for f, v in zip(self.feature_fnames, values):  # find the offending label
            if not isinstance(v, (int, float)) or v < 0 or (isinstance(v, float) and not v.is_integer()):
                what = "null (no label)" if v is None else f"{v!r}"
                raise ValueError(f"label file {path}: the label of {f} is {what}; expected an integer class "
                                 f"index >= 0 (class-conditional training needs one for every latent file)")
        return np.array(values, dtype=np.int64)

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
