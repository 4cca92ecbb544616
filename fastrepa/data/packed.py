"""The packed dataset layout: a few large memory-mapped files instead of two small files per sample.

    DIR/manifest.json       written last (atomically): its presence marks a complete pack
    DIR/images.npy          --image-format raw:  uint8 [N, H, W, 3] (HWC, as image decoders return it)
    DIR/images.jpeg         --image-format jpeg: the N JPEG files concatenated, and
    DIR/image_offsets.npy                        int64 [N + 1]: sample i is images.jpeg[off[i]:off[i+1]]
    DIR/moments.npy         the official img-mean-std files stacked: [N, 2C, h, w], their dtype (float32)
    DIR/labels.npy          int64 [N]

manifest.json: {"format": "fastrepa-packed", "version": 1, "count": N, "image_format", "image_shape":
[3, H, W], "resolution", "moments_shape": [2C, h, w], "moments_dtype", "labels_dtype", "num_classes",
"files": {role: {"path", "bytes", "sha256", and for .npy files "dtype", "shape"}}, ...}.
Sample i of a pack is sample i of the official folder it was packed from (python -m fastrepa.data.pack),
and PackedDataset[i] returns what REPAFolderDataset[i] returns: (image uint8 [3, H, W], moments float32
[2C, h, w], label int64). With raw images that is bit for bit; with JPEG it is the decoded JPEG (a source
JPEG is stored verbatim, anything else is encoded at the pack's quality, 4:4:4), decoded with PIL, which
gives the same pixels as DALI's CPU decoder (both libjpeg-turbo).

Opening checks every file against the manifest (present, byte size, .npy dtype and shape, the count, the
JPEG offsets) and, with verify=True, their sha256; each error names the file and what was expected.
"""
import hashlib
import io
import json
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

FORMAT_NAME = "fastrepa-packed"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMAGE_FORMATS = ("raw", "jpeg")
# file role -> file name, per image format
FILES = {
    "raw": {"images": "images.npy", "moments": "moments.npy", "labels": "labels.npy"},
    "jpeg": {"images": "images.jpeg", "image_offsets": "image_offsets.npy", "moments": "moments.npy",
             "labels": "labels.npy"},
}


class PackedFormatError(ValueError):
    """A packed dataset that does not match its manifest; the message names the file and the expectation."""


def sha256_file(path: str, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def npy_header(path: str) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, data offset) of a .npy file, from its header only."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            offset = f.tell()
    except Exception as e:  # noqa: BLE001 - any header failure is a bad file
        raise PackedFormatError(f"{path} is not a readable .npy file: {e}") from None
    if fortran:
        raise PackedFormatError(f"{path} is stored in Fortran order; expected C order")
    return tuple(shape), dtype, offset


def decode_jpeg(data) -> np.ndarray:
    """HWC uint8 RGB pixels of one JPEG file (bytes or a uint8 array), decoded by PIL (libjpeg-turbo)."""
    with Image.open(io.BytesIO(bytes(data))) as im:
        return np.asarray(im.convert("RGB"))


class PackedDataset(Dataset):
    """Items: (image uint8 [3, H, W], moments float32 [2C, h, w], label int64), as REPAFolderDataset.

    The files are opened lazily as memory maps in each process (DataLoader workers reopen them; pickling
    the dataset never copies the arrays). Attributes: root, manifest, count, image_format, image_shape,
    moments_shape, labels (int64 array), label_file (labels.npy), num_classes (largest label + 1, as the
    manifest says), paths (role -> file path).
    """

    def __init__(self, root: str, verify: bool = False):
        self.root = root
        path = os.path.join(root, MANIFEST)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"packed dataset folder {root} does not exist")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: {root} is not a finished packed dataset (an interrupted "
                                    f"`python -m fastrepa.data.pack` leaves no manifest; rerun it to finish)")
        try:
            with open(path) as f:
                m = json.load(f)
        except ValueError as e:
            raise PackedFormatError(f"{path} is not valid JSON: {e}") from None
        self.manifest = m
        self.manifest_path = path
        self._check_manifest(m)
        self.count = m["count"]
        self.image_format = m["image_format"]
        self.image_shape = tuple(m["image_shape"])
        self.moments_shape = tuple(m["moments_shape"])
        self.paths = {role: os.path.join(root, m["files"][role]["path"]) for role in FILES[self.image_format]}
        self._check_files(verify)
        self.labels = np.load(self.paths["labels"])
        self.label_file = self.paths["labels"]
        self.num_classes = self._check_labels()
        self._pid = None
        self._arrays = None

    # ---------------------------------------------------------------------------------- validation

    def _check_manifest(self, m) -> None:
        where = self.manifest_path
        if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
            raise PackedFormatError(f"{where}: \"format\" is {m.get('format') if isinstance(m, dict) else m!r}, "
                                    f"expected {FORMAT_NAME!r}")
        if m.get("version") != FORMAT_VERSION:
            raise PackedFormatError(f"{where}: version {m.get('version')!r}; this fastrepa reads version "
                                    f"{FORMAT_VERSION} (repack with python -m fastrepa.data.pack)")
        need = ("count", "image_format", "image_shape", "moments_shape", "moments_dtype", "files")
        missing = [k for k in need if k not in m]
        if missing:
            raise PackedFormatError(f"{where}: missing key(s) {', '.join(missing)}")
        if m["image_format"] not in IMAGE_FORMATS:
            raise PackedFormatError(f"{where}: image_format {m['image_format']!r}, expected one of {IMAGE_FORMATS}")
        if not isinstance(m["count"], int) or m["count"] < 1:
            raise PackedFormatError(f"{where}: count {m['count']!r}, expected a positive integer")
        roles = FILES[m["image_format"]]
        absent = [r for r in roles if r not in m["files"]]
        if absent:
            raise PackedFormatError(f"{where}: \"files\" has no entry for {', '.join(absent)}")

    def _check_files(self, verify: bool) -> None:
        m, n = self.manifest, self.count
        expect_npy = {"moments": ((n, *self.moments_shape), np.dtype(m["moments_dtype"])),
                      "labels": ((n,), np.dtype(np.int64)),
                      "images": ((n, self.image_shape[1], self.image_shape[2], self.image_shape[0]),
                                 np.dtype(np.uint8)),
                      "image_offsets": ((n + 1,), np.dtype(np.int64))}
        for role, path in self.paths.items():
            entry = m["files"][role]
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} is missing (the {role} file of the packed dataset {self.root}; "
                                        f"{MANIFEST} lists it with {entry['bytes']} bytes)")
            size = os.path.getsize(path)
            if size != entry["bytes"]:
                raise PackedFormatError(f"{path} is {size} bytes but {MANIFEST} says {entry['bytes']} "
                                        f"({'truncated' if size < entry['bytes'] else 'longer than written'}; "
                                        f"repack it)")
            if path.endswith(".npy"):
                shape, dtype, offset = npy_header(path)
                want_shape, want_dtype = expect_npy[role]
                if dtype != want_dtype:
                    raise PackedFormatError(f"{path} holds {dtype}, expected {want_dtype} ({MANIFEST})")
                if shape != want_shape:
                    what = (f"{shape[0]} samples" if shape and shape[0] != want_shape[0] else f"shape {list(shape)}")
                    raise PackedFormatError(f"{path} has shape {list(shape)} ({what}); expected {list(want_shape)} "
                                            f"from {MANIFEST} (count {n})")
                need = offset + int(np.prod(shape)) * dtype.itemsize
                if size < need:
                    raise PackedFormatError(f"{path} is {size} bytes, its header needs {need}: truncated")
            if verify:
                digest = sha256_file(path)
                if digest != entry.get("sha256"):
                    raise PackedFormatError(f"{path}: sha256 {digest} does not match {MANIFEST} "
                                            f"({entry.get('sha256')}); the file changed since it was packed")
        if self.image_format == "jpeg":
            off = np.load(self.paths["image_offsets"])
            blob = m["files"]["images"]["bytes"]
            if off[0] != 0 or off[-1] != blob or np.any(np.diff(off) <= 0):
                raise PackedFormatError(f"{self.paths['image_offsets']}: expected increasing byte offsets from 0 "
                                        f"to {blob} (the size of {self.paths['images']}); found {off[0]} .. {off[-1]}")

    def _check_labels(self) -> int:
        """The classes the labels need (largest label + 1); labels are >= 0 and agree with the manifest."""
        lo, hi = int(self.labels.min()), int(self.labels.max())
        if lo < 0:
            i = int(np.argmin(self.labels))
            raise PackedFormatError(f"{self.label_file}: sample {i} has label {lo}; expected class indices >= 0")
        said = self.manifest.get("num_classes")
        if said is not None and said != hi + 1:
            raise PackedFormatError(f"{self.label_file}: the largest label is {hi} ({hi + 1} classes) but "
                                    f"{MANIFEST} says num_classes {said}; repack it")
        return hi + 1

    # ------------------------------------------------------------------------------------- reading

    def _open(self):
        if self._pid != os.getpid():
            arrays = {"moments": np.load(self.paths["moments"], mmap_mode="r")}
            if self.image_format == "raw":
                arrays["images"] = np.load(self.paths["images"], mmap_mode="r")
            else:
                arrays["images"] = np.memmap(self.paths["images"], dtype=np.uint8, mode="r")
                arrays["image_offsets"] = np.load(self.paths["image_offsets"])
            self._arrays, self._pid = arrays, os.getpid()
        return self._arrays

    def __getstate__(self):
        return dict(self.__dict__, _arrays=None, _pid=None)

    def __len__(self):
        return self.count

    def _index(self, idx) -> int:
        i = int(idx)
        if not -self.count <= i < self.count:
            raise IndexError(f"index {i} out of range for the {self.count} samples of {self.root}")
        return i % self.count

    def jpeg_bytes(self, idx) -> np.ndarray:
        """The stored JPEG file of sample idx as a uint8 array (jpeg packs only)."""
        if self.image_format != "jpeg":
            raise ValueError(f"{self.root} stores raw images, not JPEG")
        a, i = self._open(), self._index(idx)
        off = a["image_offsets"]
        return np.array(a["images"][off[i]:off[i + 1]])

    def load_image_hwc(self, idx) -> np.ndarray:
        i = self._index(idx)
        if self.image_format == "raw":
            return np.array(self._open()["images"][i])
        try:
            img = decode_jpeg(self.jpeg_bytes(i))
        except Exception as e:  # noqa: BLE001
            raise PackedFormatError(f"cannot decode the JPEG of sample {i} in {self.paths['images']}: {e}") from None
        want = (self.image_shape[1], self.image_shape[2], self.image_shape[0])
        if img.shape != want:
            raise PackedFormatError(f"the JPEG of sample {i} in {self.paths['images']} decodes to {img.shape}, "
                                    f"expected {want}")
        return img

    def load_image(self, idx) -> np.ndarray:
        """uint8 [3, H, W] (C-contiguous: one copy out of the memory map for raw packs)."""
        if self.image_format == "raw":
            return np.ascontiguousarray(self._open()["images"][self._index(idx)].transpose(2, 0, 1))
        return np.ascontiguousarray(self.load_image_hwc(idx).transpose(2, 0, 1))

    def load_moments(self, idx) -> np.ndarray:
        return np.array(self._open()["moments"][self._index(idx)])

    def describe(self, idx: int, part: str = "moments") -> str:
        """Where sample idx's image or moments live, for error messages."""
        role = "images" if part == "image" else "moments"
        return f"{self.paths[role]}[{int(idx)}]"

    def __getitem__(self, idx):
        i = self._index(idx)
        image = torch.from_numpy(self.load_image(i))
        moments = torch.from_numpy(self.load_moments(i)).float()
        return image, moments, torch.tensor(self.labels[i])
