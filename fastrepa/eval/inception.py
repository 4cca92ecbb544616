"""The FID Inception-v3 network, loaded from local weights.

This is the network of TF's ``inception-2015-12-05`` graph (the one ADM's evaluator and the original
TTUR FID code run), in the PyTorch port whose weights pytorch-fid publishes as
``pt_inception-2015-12-05-6726825d.pth``. It is torchvision's Inception-v3 layout (1008 classes, no
aux head) with the three TF quirks pytorch-fid patches in:

* Mixed_5b/5c/5d, Mixed_6b..6e, Mixed_7b: the 3x3 average pool of the pool branch excludes padding
  from its average (``count_include_pad=False``), as TF's avg_pool does;
* Mixed_7c: the pool branch uses a 3x3 *max* pool instead of an average pool.

The state-dict keys are torchvision's (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.
running_mean``, ..., ``fc.weight`` [1008, 2048], ``fc.bias``), so the published file loads strict.

Outputs, and where they come from in ADM's evaluator (openai/guided-diffusion,
evaluations/evaluator.py):

* ``pool`` [N, 2048]: TF ``pool_3:0``, the final average pool. FID, precision and recall.
* ``spatial`` [N, 2023]: TF ``mixed_6/conv:0`` is the ReLU output of the 1x1 branch ("conv") of the
  7th mixed block. TF numbers the mixed blocks mixed, mixed_1 .. mixed_10 = torchvision's Mixed_5b,
  5c, 5d, 6a, 6b, 6c, **6d**, 6e, 7a, 7b, 7c, so ``mixed_6/conv`` is ``Mixed_6d.branch1x1``: a
  [N, 17, 17, 192] NHWC map. ADM keeps ``spatial[..., :7]`` and flattens it in NHWC order, giving
  17 * 17 * 7 = 2023 features (not 2304). We take the first 7 channels and flatten in the same
  (h, w, c) order, so our sFID statistics line up element for element with ADM's ``mu_s``/``sigma_s``.
* ``logits`` [N, 1008]: ADM's Inception Score takes the matrix of TF ``softmax/logits/MatMul`` and
  computes ``softmax(pool_3 @ W)`` -- *without* the softmax bias. We do the same:
  ``logits = pool @ fc.weight.T`` (``fc.bias`` is loaded, for strictness, but not used), over all
  1008 outputs (the TF graph has 1008 classes, 1000 of them real ImageNet classes).

Preprocessing (``preprocess``; it is part of every features id, so features of the two are never mixed):

* ``"tf"`` (default): ADM's. Its evaluator feeds float32 [0, 255] NHWC images into the TF graph at
  ``ExpandDims:0``; the graph resizes them to 299x299 with TF1's legacy ``ResizeBilinear``
  (``align_corners=False``, no half-pixel centres: `tf_legacy_resize_bilinear`), then computes
  ``(x - 128) / 128``. ADM's reference statistics (VIRTUAL_imagenet256_labeled.npz ...) were made so.
* ``"pytorch-fid"``: uint8 -> [0, 1], PyTorch's half-pixel bilinear resize (``align_corners=False``,
  no antialias), then ``2x - 1``. For 256px inputs its resize is the larger difference from ADM's.

How the default differs from ADM's TF evaluator: not in the preprocessing (the same resize and
normalisation, in float32), only in the convolution kernels and accumulation orders (cuDNN/MKL vs TF),
which give float32 round-off differences: numbers are close, not bit-identical. Do not mix statistics from
this port with statistics from the TF graph when you need agreement beyond that round-off; compute both
sides with the same network when you can.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import inception as tv

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_NAME
)
NUM_CLASSES = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM: spatial[..., :7] of mixed_6/conv
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023 at 299x299 input
INPUT_SIZE = 299
PREPROCESS_MODES = ("tf", "pytorch-fid")  # the first is the default (ADM's)


def tf_legacy_resize_bilinear(x: torch.Tensor, size) -> torch.Tensor:
    """TF1 ``ResizeBilinear`` (``align_corners=False``, ``half_pixel_centers=False``) of float [..., H, W]
    to ``size`` (h, w), in float32: source coordinate ``o * (in / out)``, neighbours ``floor`` and the next
    (clamped to the last row/column), lerped along x in the two rows, then along y, as TF does."""
    h, w = size
    x = x.float()
    if tuple(x.shape[-2:]) == (h, w):
        return x

    def taps(n_in, n_out):  # lo, hi, frac of every output index along one axis
        src = torch.arange(n_out, dtype=torch.float32, device=x.device) * torch.tensor(
            n_in / n_out, dtype=torch.float32, device=x.device)  # TF: float(in) / out, times float(o)
        lo = src.floor()
        i = lo.long()
        return i, (i + 1).clamp(max=n_in - 1), src - lo

    (y0, y1, fy), (x0, x1, fx) = taps(x.shape[-2], h), taps(x.shape[-1], w)
    top, bottom = x[..., y0, :], x[..., y1, :]
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * fx
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * fx
    return top + (bottom - top) * fy[:, None]


def check_preprocess(mode: str) -> str:
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"Inception preprocess must be one of {PREPROCESS_MODES}, got {mode!r}")
    return mode


def features_id(weights_sha256: str, preprocess: str) -> str:
    """What names the features of these weights under this preprocessing (shard tags, reference caches,
    make-ref's stored pool features): the weights' sha256, plus ``+tf`` for the TF preprocessing. The
    pytorch-fid preprocessing keeps the bare sha256, as it was the only one when those were first written."""
    return weights_sha256 if check_preprocess(preprocess) == "pytorch-fid" else f"{weights_sha256}+{preprocess}"


def short_features_id(fid: str) -> str:
    """A features id for file names and messages: the sha256's first 12 hex digits, and the mode."""
    sha, plus, mode = fid.partition("+")
    return sha[:12] + plus + mode


class _AvgPoolExcludePad(nn.Module):
    """TF's 3x3/1 average pool: the padded zeros are not counted in the mean."""

    def forward(self, x):
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(tv.InceptionA):
    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_AvgPoolExcludePad()(x))
        return torch.cat([b1, b5, b3, bp], 1)


class FIDInceptionC(tv.InceptionC):
    def forward(self, x, return_branch1x1: bool = False):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_AvgPoolExcludePad()(x))
        out = torch.cat([b1, b7, bd, bp], 1)
        return (out, b1) if return_branch1x1 else out


class FIDInceptionE(tv.InceptionE):
    """InceptionE with TF's pool branch: average pool excluding padding, or max pool (Mixed_7c)."""

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__(in_channels)
        self.max_pool = max_pool

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _AvgPoolExcludePad()(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], 1)


@dataclass
class InceptionFeatures:
    pool: torch.Tensor      # [N, 2048] float32
    spatial: torch.Tensor   # [N, 2023] float32, (h, w, c) order as ADM
    logits: torch.Tensor    # [N, 1008] float32, pool @ fc.weight.T (no bias, as ADM)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3. ``forward(images)`` takes uint8 [N,H,W,3] or [N,3,H,W] images, preprocessed
    as ``preprocess_mode`` says (see the module docstring)."""

    def __init__(self, preprocess: str = PREPROCESS_MODES[0]):
        super().__init__()
        self.preprocess_mode = check_preprocess(preprocess)
        conv = tv.BasicConv2d
        self.Conv2d_1a_3x3 = conv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = conv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = conv(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = conv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = conv(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = tv.InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = tv.InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(POOL_DIM, NUM_CLASSES)
        self.eval()
        self.requires_grad_(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N,H,W,3] or [N,3,H,W] -> float32 [N,3,299,299] in [-1, 1] (tf or pytorch-fid)."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 in [0, 255], got dtype {images.dtype}")
        if images.ndim != 4 or 3 not in (images.shape[1], images.shape[-1]):
            raise ValueError(
                f"images must be [N,H,W,3] or [N,3,H,W], got shape {tuple(images.shape)}")
        if images.shape[-1] == 3:  # NHWC (ADM's layout) wins when both could be 3
            images = images.permute(0, 3, 1, 2)
        if self.preprocess_mode == "tf":  # ADM: float [0, 255], TF1 legacy resize, (x - 128) / 128
            x = tf_legacy_resize_bilinear(images.float(), (INPUT_SIZE, INPUT_SIZE))
            return (x - 128.0) / 128.0
        x = images.float() / 255.0
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                              align_corners=False)
        return 2.0 * x - 1.0

    def forward(self, images: torch.Tensor) -> InceptionFeatures:
        x = self.preprocess(images.to(self.fc.weight.device))
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6a(x)
        x = self.Mixed_6c(self.Mixed_6b(x))
        x, branch1x1 = self.Mixed_6d(x, return_branch1x1=True)  # TF mixed_6/conv
        x = self.Mixed_6e(x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        # NCHW -> NHWC, first 7 channels, flatten as ADM's spatial[..., :7].reshape(N, -1).
        spatial = branch1x1[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(pool), -1)
        logits = pool @ self.fc.weight.t()
        return InceptionFeatures(pool=pool, spatial=spatial, logits=logits)


def default_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_NAME


def find_weights(path: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The weights file: ``path`` if given, else the torch hub cache. Raises FileNotFoundError."""
    tried = [Path(path)] if path is not None else [default_weights_path()]
    for p in tried:
        if p.is_file():
            return p
    where = ", ".join(str(p) for p in tried)
    raise FileNotFoundError(
        f"FID Inception weights not found (looked at: {where}). Download {FID_WEIGHTS_NAME} from "
        f"{FID_WEIGHTS_URL} and pass its path (--inception PATH), or place it at "
        f"{default_weights_path()}.")


def file_sha256(path: Union[str, os.PathLike], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_inception(path: Optional[Union[str, os.PathLike]] = None, device: Union[str, torch.device] = "cpu",
                   preprocess: str = PREPROCESS_MODES[0]) -> FIDInceptionV3:
    """Build the FID Inception with this preprocessing (``"tf"``, ADM's, or ``"pytorch-fid"``) and load
    weights strict from ``path`` (or the hub cache)."""
    weights = find_weights(path)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise RuntimeError(f"could not read FID Inception weights {weights}: {e}") from e
    if not isinstance(state, dict):
        raise RuntimeError(f"{weights}: expected a state dict, got {type(state).__name__}")
    model = FIDInceptionV3(preprocess)
    # num_batches_tracked is training bookkeeping; older files may lack it. Everything else strict.
    own = model.state_dict()
    state = dict(state)
    for k in own:
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = own[k]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise RuntimeError(
            f"{weights} is not an FID Inception state dict: missing keys {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"{weights}: {e}") from e
    return model.to(device)


@torch.no_grad()
def extract_features(model: FIDInceptionV3, images: torch.Tensor) -> InceptionFeatures:
    """Run the network in full fp32 (TF32 off on CUDA, any enclosing autocast disabled), returning
    float32 CPU tensors."""
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(model.fc.weight.device.type, enabled=False):
            out = model(images)
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    return InceptionFeatures(pool=out.pool.float().cpu(), spatial=out.spatial.float().cpu(),
                             logits=out.logits.float().cpu())
