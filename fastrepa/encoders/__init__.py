"""Representation encoders: frozen modules that map raw uint8 images [B, 3, H, W] to patch tokens [B, T, C].

`load_encoder(enc_type, path=None, resolution=256, grid=None)` is the entry point and
`load_encoders("dinov2-vit-b,mocov3-vit-b", ...)` the comma-separated form the trainer's --enc-type
takes. Besides the embedded `patch-pixels` stand-in (no weights), the pretrained REPA encoders are built
from their official weight files on local disk (nothing is downloaded). The file each one looks for, its
preprocessing, positional-embedding resampling and tokens, as official REPA computes them: docs/encoders.md.
Every encoder is frozen: eval mode that `train()` cannot undo, requires_grad False, no_grad forward.
"""
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vit import CLIPVisual, ViT

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# name -> architecture (official widths); dinov2 hub: patch 14, layer-scale, pos-embed 37x37 (518px)
_DINOV2 = {"s": (384, 12, 6, "mlp"), "b": (768, 12, 12, "mlp"), "l": (1024, 24, 16, "mlp"),
           "g": (1536, 40, 24, "swiglu")}
_MOCOV3 = {"s": (384, 12, 12), "b": (768, 12, 12), "l": (1024, 24, 16)}
_MAE = {"l": (1024, 24, 16)}
_DINOV1 = {"b": (768, 12, 12)}
_JEPA = {"h": (1280, 32, 16)}  # patch 14, 224px
_CLIP = {"L": (1024, 24, 16, 768)}  # width, layers, heads, output_dim; patch 14, 224px

DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{x}14/{file}"
MOCOV3_URL = {"s": "https://dl.fbaipublicfiles.com/moco-v3/vit-s-300ep/vit-s-300ep.pth.tar",
              "b": "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar"}
MAE_URL = "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_large.pth"
DINOV1_URL = "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"
JEPA_URL = "https://dl.fbaipublicfiles.com/ijepa/IN1K-vit.h.14-300e.pth.tar"
CLIP_URL = ("https://openaipublic.azureedge.net/clip/models/"
            "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt")

SUPPORTED = tuple([f"dinov2-vit-{x}" for x in _DINOV2] + [f"dinov2-vit-{x}-reg" for x in _DINOV2]
                  + [f"mocov3-vit-{x}" for x in _MOCOV3] + [f"mae-vit-{x}" for x in _MAE]
                  + [f"dinov1-vit-{x}" for x in _DINOV1] + [f"jepa-vit-{x}" for x in _JEPA]
                  + [f"clip-vit-{x}" for x in _CLIP])
# REPA's spelling -> ours (both accepted everywhere a name is; encoders report the canonical name)
ALIASES = {f"dinov2reg-vit-{x}": f"dinov2-vit-{x}-reg" for x in _DINOV2}
EMBEDDED = ("patch-pixels",)
FIELD_ENCODERS = ("vivit",)  # encoders of PDE fields [B, F, C, H, W] (FourierFlow's MAE ViViT), not images


class EncoderWeightsError(ValueError):
    """A weight file whose keys or shapes are not those of the official checkpoint."""


def canonical_name(enc_type: str) -> str:
    """Our name for an encoder name: REPA's `dinov2reg-vit-b` -> `dinov2-vit-b-reg`; other names unchanged."""
    name = enc_type.strip()
    return ALIASES.get(name, name)


def _frozen(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


class FrozenEncoder(nn.Module):
    """Base: eval mode for good (`train()` keeps eval), no gradients."""

    def train(self, mode: bool = True):
        return super().train(False)

    num_heads: int | None = None  # heads of the attention maps `features` gives (None: it gives none)
    depth: int | None = None  # the blocks `features` can give attention maps of (None: any)
    has_cls_token = False  # `features` gives "cls"

    def features(self, images, attn_blocks=()) -> dict:
        """{"patch": forward(images), "cls": a global token [B, C], "attn": [B, heads, P, P] patch-to-patch
        attention scores per requested block (1-based)}, for the methods that use more than the patch
        tokens (REG: the class token; HASTE: the attention maps)."""
        name = getattr(self, "enc_type", type(self).__name__)
        raise ValueError(f"encoder {name} gives its patch tokens only (no class token or attention maps); "
                         "use a ViT encoder with a class token (dinov2-*, as HASTE and REG do)")


class PatchPixelEncoder(FrozenEncoder):
    """Parameter-free encoder: each token is the mean-centred pixels of one patch of the clean image.

    The image is scaled to [-1, 1] and cut into a grid x grid array of patches (row-major, the model's
    token order); each token is the patch's 3*p*p pixel values minus their mean, so the alignment
    target is the local structure of the clean image. It is a stand-in with REPA's interface for the
    demo and tests, not a learned representation.
    """

    def __init__(self, resolution: int, grid: int):
        super().__init__()
        if resolution % grid:
            raise ValueError(f"patch-pixels encoder: resolution {resolution} is not divisible by the token grid {grid}")
        self.patch = resolution // grid
        self.grid = grid
        self.num_tokens = grid * grid
        self.resolution = resolution
        self.embed_dim = 3 * self.patch * self.patch
        self.enc_type = "patch-pixels"

    @torch.no_grad()
    def forward(self, images):
        if images.shape[-1] != self.resolution or images.shape[-2] != self.resolution:
            raise ValueError(f"patch-pixels encoder expects {self.resolution}x{self.resolution} images, "
                             f"got {tuple(images.shape[-2:])}")
        x = images.float() / 127.5 - 1
        tokens = F.unfold(x, kernel_size=self.patch, stride=self.patch).transpose(1, 2)
        return tokens - tokens.mean(dim=-1, keepdim=True)

    num_heads, has_cls_token = 1, True

    @torch.no_grad()
    def features(self, images, attn_blocks=()):
        """The stand-in's class token is the mean of its patch tokens and its attention map the scores of one
        parameter-free head, z z^T / sqrt(C) (the same map for every block asked: it has no layers)."""
        z = self.forward(images)
        scores = (z @ z.transpose(1, 2) / self.embed_dim ** 0.5).unsqueeze(1)
        return {"patch": z, "cls": z.mean(dim=1), "attn": [scores for _ in attn_blocks]}


class PretrainedEncoder(FrozenEncoder):
    """REPA's preprocessing + a ViT: uint8 [B, 3, R, R] -> tokens [B, grid*grid, embed_dim] (fp32
    unless run under autocast, as REPA runs it).

    resize: None (use the raw image, mocov3/mae) or the side to resize to bicubically; resize_first:
    resize before normalising (clip) instead of after (dinov2). Float inputs are taken as 0..255.
    """

    def __init__(self, enc_type, vit: ViT, resolution, mean, std, resize=None, resize_first=False):
        super().__init__()
        self.enc_type, self.vit, self.resolution = enc_type, vit, resolution
        self.resize, self.resize_first = resize, resize_first
        self.embed_dim, self.grid = vit.embed_dim, vit.grid
        self.num_tokens = vit.grid * vit.grid
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encoder {self.enc_type}: expected images [B, 3, H, W], got {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != (self.resolution, self.resolution):
            raise ValueError(f"encoder {self.enc_type} was loaded for {self.resolution}px images, "
                             f"got {tuple(images.shape[-2:])}")
        x = images.float() / 255.0
        if self.resize and self.resize_first:
            x = F.interpolate(x, size=self.resize, mode="bicubic")
        x = (x - self.mean) / self.std
        if self.resize and not self.resize_first:
            x = F.interpolate(x, size=self.resize, mode="bicubic")
        return x

    @torch.no_grad()
    def forward(self, images, attn_blocks=None):
        """The patch tokens; with `attn_blocks` (a tuple, maybe empty) the `features` dict instead, so that
        one compiled call (`encoder.compile()`, as --compile does) serves both."""
        if attn_blocks is None:
            return self.vit(self.preprocess(images))
        if not isinstance(self.vit, ViT):
            return super().features(images, attn_blocks)
        return self.vit.features(self.preprocess(images), attn_blocks)

    @property
    def num_heads(self) -> int | None:
        return self.vit.num_heads if isinstance(self.vit, ViT) else None

    @property
    def depth(self) -> int | None:
        return len(self.vit.blocks) if isinstance(self.vit, ViT) else None

    @property
    def has_cls_token(self) -> bool:
        return isinstance(self.vit, ViT) and self.vit.num_prefix > 0

    def features(self, images, attn_blocks=()):
        return self(images, attn_blocks=tuple(attn_blocks))


def check_grid(encoder: nn.Module, num_tokens: int) -> None:
    """Raise when the encoder's token count differs from the model's (REPA aligns token by token)."""
    got = getattr(encoder, "num_tokens", None)
    if got != num_tokens:
        name = getattr(encoder, "enc_type", type(encoder).__name__)
        g = getattr(encoder, "grid", "?")
        raise ValueError(f"encoder {name} gives {got} tokens (a {g}x{g} grid) but the model has {num_tokens} "
                         f"tokens; REPA aligns them one to one: pick a model patch size / resolution whose "
                         f"token grid is {g}x{g}, or another encoder")


def resample_pos_embed(pos_embed: torch.Tensor, grid: int, num_prefix: int = 1) -> torch.Tensor:
    """REPA's pos-embed resampling: timm.layers.resample_abs_pos_embed(pos_embed, [grid, grid]), i.e.
    prefix rows kept, the square patch part bicubic-resized by size with antialias=True, in fp32.
    The same code without the timm import."""
    n = pos_embed.shape[1] - num_prefix
    old = int(round(n ** 0.5))
    if old * old != n:
        raise EncoderWeightsError(f"pos_embed with {n} patch rows is not a square grid")
    if old == grid:
        return pos_embed
    prefix, pe = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    dim = pe.shape[-1]
    pe = pe.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
    pe = F.interpolate(pe, size=(grid, grid), mode="bicubic", antialias=True)
    pe = pe.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([prefix, pe], dim=1)


# ---------------------------------------------------------------------------------------------- files

def _candidates(enc_type, path):
    """(files to try in order, where to get the file) for an encoder name."""
    if path is not None:
        return [os.fspath(path)], _source(enc_type)
    kind, _, size = enc_type.split("-")[:3]
    if kind == "dinov2":
        fname = f"dinov2_vit{size}14{'_reg4' if enc_type.endswith('-reg') else ''}_pretrain.pth"
        return [os.path.join(torch.hub.get_dir(), "checkpoints", fname), os.path.join("ckpts", fname)], _source(enc_type)
    if kind == "dinov1":
        return [os.path.join(torch.hub.get_dir(), "checkpoints", "dino_vitbase16_pretrain.pth"),
                os.path.join("ckpts", f"dinov1_vit{size}.pth")], _source(enc_type)
    if kind == "clip":
        return [os.path.join(os.path.expanduser("~/.cache/clip"), f"ViT-{size}-14.pt")], _source(enc_type)
    fname = {"mocov3": f"mocov3_vit{size}.pth", "mae": f"mae_vit{size}.pth", "jepa": f"ijepa_vit{size}.pth"}[kind]
    return [os.path.join("ckpts", fname)], _source(enc_type)


def _source(enc_type):
    kind, _, size = enc_type.split("-")[:3]
    if kind == "dinov2":
        fname = f"dinov2_vit{size}14{'_reg4' if enc_type.endswith('-reg') else ''}_pretrain.pth"
        return (DINOV2_URL.format(x=size, file=fname)
                + f" (torch.hub.load('facebookresearch/dinov2', 'dinov2_vit{size}14{'_reg' if enc_type.endswith('-reg') else ''}') "
                  f"saves it under {os.path.join(torch.hub.get_dir(), 'checkpoints')})")
    if kind == "mocov3":
        url = MOCOV3_URL.get(size, "no official MoCo v3 release for this size")
        return f"{url}, saved as ckpts/mocov3_vit{size}.pth (the name REPA uses)"
    if kind == "dinov1":
        return (f"{DINOV1_URL} (torch.hub.load('facebookresearch/dino:main', 'dino_vitb16') saves it under "
                f"{os.path.join(torch.hub.get_dir(), 'checkpoints')}; REPA's name is ckpts/dinov1_vitb.pth)")
    if kind == "jepa":
        return f"{JEPA_URL}, saved as ckpts/ijepa_vit{size}.pth (the name REPA uses)"
    if kind == "clip":
        return f"{CLIP_URL} (clip.load('ViT-{size}/14') saves it as ~/.cache/clip/ViT-{size}-14.pt)"
    return f"{MAE_URL}, saved as ckpts/mae_vit{size}.pth (the name REPA uses)"


def _is_torchscript(f):
    """A TorchScript archive (torch.jit.save) is a zip holding code/ and constants.pkl."""
    import zipfile
    if not zipfile.is_zipfile(f):
        return False
    with zipfile.ZipFile(f) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _read(enc_type, path):
    files, source = _candidates(enc_type, path)
    for f in files:
        if os.path.isfile(f):
            try:
                if enc_type.startswith("clip-") and _is_torchscript(f):
                    # OpenAI's CLIP file (what clip.load reads); no pickled Python runs, not weights_only
                    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export
                        warnings.simplefilter("ignore", FutureWarning)
                        return torch.jit.load(f, map_location="cpu").state_dict(), f
                if enc_type.startswith("jepa-"):  # 10 GB training checkpoint: page in what is used
                    try:
                        return torch.load(f, map_location="cpu", weights_only=True, mmap=True), f
                    except RuntimeError:
                        pass  # a legacy (non-zip) file cannot be mmapped
                return torch.load(f, map_location="cpu", weights_only=True), f
            except Exception as e:  # truncated file, or pickled objects beyond tensors / containers
                raise EncoderWeightsError(f"encoder {enc_type}: could not read weight file {f}: {e}") from e
    raise FileNotFoundError(f"encoder {enc_type}: weight file not found; looked at: {', '.join(map(os.path.abspath, files))}. "
                            f"Get it from {source}, or pass its path.")


def _mocov3_keys(sd):
    """REPA's fix_mocov3_state_dict: keep module.base_encoder.* without its prefix, drop the head and
    fc, rename blocks.13.norm13/fc13 and blocks.14.norm14/fc14 (a naming bug in some checkpoints)."""
    out = {}
    for k, v in sd.items():
        if not k.startswith("module.base_encoder."):
            continue
        nk = k[len("module.base_encoder."):]
        nk = (nk.replace("blocks.13.norm13", "blocks.13.norm1").replace("blocks.13.mlp.fc13", "blocks.13.mlp.fc1")
              .replace("blocks.14.norm14", "blocks.14.norm2").replace("blocks.14.mlp.fc14", "blocks.14.mlp.fc2"))
        if "head" not in nk and nk.split(".")[0] != "fc":
            out[nk] = v
    return out


def _load_strict(enc_type, vit: nn.Module, sd, where, resample=True):
    sd = dict(sd)
    if resample and "pos_embed" in sd and torch.is_tensor(sd["pos_embed"]) and sd["pos_embed"].ndim == 3:
        sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], vit.grid)
    own = vit.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def head(xs):
            return ", ".join(xs[:20]) + (f" ... (+{len(xs) - 20} more)" if len(xs) > 20 else "") if xs else "none"
        raise EncoderWeightsError(
            f"encoder {enc_type}: {where} does not hold the official {enc_type} weights; missing keys: {head(missing)}; "
            f"unexpected keys: {head(unexpected)}; shape mismatches: {head(shapes)}")
    vit.load_state_dict(sd, strict=True)


def _build(enc_type, path, resolution, random_init=False):
    """The encoder with its official weights; random_init: the same architecture with random weights and
    no file read (benchmarks time it without the weight files)."""
    kind, _, size = enc_type.split("-")[:3]
    raw, where = (None, "random init") if random_init else _read(enc_type, path)
    if kind == "dinov2":
        dim, depth, heads, ffn = _DINOV2[size]
        side = 224 * (resolution // 256)
        if side == 0:
            raise ValueError(f"encoder {enc_type}: resolution {resolution} is below 256 (REPA resizes to 224*(res//256))")
        # vit-g: SwiGLUFFNFused hidden = (int(4*dim*2/3) + 7) // 8 * 8 = 4096
        hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8 if ffn == "swiglu" else 4 * dim
        vit = ViT(patch=14, dim=dim, depth=depth, heads=heads, grid=side // 14, hidden=hidden, ffn=ffn,
                  layerscale=True, num_registers=4 if enc_type.endswith("-reg") else 0, mask_token=True)
        sd = raw
        resize = side
    elif kind in ("mocov3", "mae", "dinov1"):
        if resolution % 16:
            raise ValueError(f"encoder {enc_type}: resolution {resolution} is not a multiple of its 16px patches")
        if kind == "mocov3":
            dim, depth, heads = _MOCOV3[size]
            sd = None if raw is None else _mocov3_keys(raw["state_dict"] if isinstance(raw, dict) and "state_dict" in raw
                                                      else raw)
        elif kind == "mae":
            dim, depth, heads = _MAE[size]
            sd = raw["model"] if isinstance(raw, dict) and "model" in raw else raw
        else:  # the DINO hub file is the backbone state dict itself
            dim, depth, heads = _DINOV1[size]
            sd = raw
        vit = ViT(patch=16, dim=dim, depth=depth, heads=heads, grid=resolution // 16, final_norm=(kind != "mae"))
        resize = None
    elif kind in ("jepa", "clip"):
        side = 224 * (resolution // 256)
        if side != 224:
            raise ValueError(f"encoder {enc_type}: REPA runs it only at 256px (224px input, its fixed 16x16 "
                             f"pos-embed; REPA's 512px runs support DINOv2 only), got resolution {resolution}")
        if kind == "jepa":
            dim, depth, heads = _JEPA[size]
            if raw is not None and not (isinstance(raw, dict) and "encoder" in raw):
                raise EncoderWeightsError(f"encoder {enc_type}: {where} is not an I-JEPA checkpoint (a dict with "
                                          f"'encoder'); keys: {', '.join(map(str, list(raw)[:20])) if isinstance(raw, dict) else type(raw).__name__}")
            # REPA cuts key[7:] ('module.' of the DDP-wrapped encoder); a key without it is kept as is
            sd = None if raw is None else {(k[7:] if k.startswith("module.") else k): v for k, v in raw["encoder"].items()}
            vit = ViT(patch=14, dim=dim, depth=depth, heads=heads, grid=16, cls_token=False)
            mean, std, first = IMAGENET_MEAN, IMAGENET_STD, False
        else:
            width, layers, heads, out = _CLIP[size]
            if isinstance(raw, dict) and any(str(k).startswith("visual.") for k in raw):
                sd = {k[len("visual."):]: v for k, v in raw.items() if k.startswith("visual.")}
            else:
                sd = raw
            if isinstance(sd, dict) and sd:  # OpenAI's file is fp16; clip.load(device='cpu') makes it fp32
                sd = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in sd.items()}
            vit = CLIPVisual(patch=14, width=width, layers=layers, heads=heads, grid=16, output_dim=out)
            mean, std, first = CLIP_MEAN, CLIP_STD, True
        if not random_init:
            if not isinstance(sd, dict):
                raise EncoderWeightsError(f"encoder {enc_type}: {where} holds a {type(sd).__name__}, not a state dict")
            _load_strict(enc_type, vit, sd, where, resample=False)
        return PretrainedEncoder(enc_type, vit, resolution, mean, std, resize=side, resize_first=first)
    else:  # pragma: no cover - guarded by SUPPORTED
        raise AssertionError(enc_type)
    if not random_init:
        if not isinstance(sd, dict):
            raise EncoderWeightsError(f"encoder {enc_type}: {where} holds a {type(sd).__name__}, not a state dict")
        _load_strict(enc_type, vit, sd, where)
    return PretrainedEncoder(enc_type, vit, resolution, IMAGENET_MEAN, IMAGENET_STD, resize=resize)


def load_encoder(enc_type: str, path=None, resolution: int = 256, grid: int | None = None,
                 random_init: bool = False) -> nn.Module:
    """A frozen eval-mode encoder: uint8 images [B, 3, resolution, resolution] -> tokens [B, T, C].

    enc_type: a name of EMBEDDED or SUPPORTED, or REPA's spelling of one (ALIASES: dinov2reg-vit-b);
    the encoder's `enc_type` is our canonical name.

    path: the weight file (default: the places listed in this module's docstring). grid: the model's
    token grid; a pretrained encoder whose grid differs is an error (see `check_grid`); for
    patch-pixels it sets the patch size (default resolution // 16). random_init: the architecture with
    random weights, reading no file (for benchmarks; never for training).
    """
    enc_type = canonical_name(enc_type)
    if enc_type == "patch-pixels":
        enc = PatchPixelEncoder(resolution, grid if grid is not None else resolution // 16)
    elif enc_type in SUPPORTED:
        enc = _build(enc_type, path, resolution, random_init)
        if grid is not None:
            check_grid(enc, grid * grid)
    elif enc_type == "vivit":
        from fastrepa.encoders.vivit import ViViTEncoder, load_vivit
        if random_init:  # FourierFlow's released sizes
            enc = ViViTEncoder(num_patches=grid * grid if grid else 256)
        elif not path:
            raise ValueError("--enc-type vivit needs --enc-path: FourierFlow's MAE ViViT checkpoint "
                             "(model_state_dict['encoder.*']); it has no default place")
        else:
            enc = load_vivit(path)  # its frames, variables and tokens are checked against the model by the objective
    else:
        raise ValueError(f"unknown encoder {enc_type!r}; known: {', '.join(EMBEDDED + SUPPORTED + FIELD_ENCODERS)} (and REPA's "
                         f"spellings {', '.join(ALIASES)})")
    return _frozen(enc)


def load_encoders(enc_types: str, paths=None, resolution: int = 256, grid: int | None = None) -> list[nn.Module]:
    """`load_encoder` for each name of a comma-separated list ('dinov2-vit-b,mocov3-vit-b');
    paths: None, or a list/comma-separated string of files in the same order (None / '' = default)."""
    names = [n.strip() for n in enc_types.split(",") if n.strip()]
    if not names:
        raise ValueError(f"no encoder names in {enc_types!r}")
    if paths is None:
        paths = [None] * len(names)
    elif isinstance(paths, str):
        paths = [p.strip() or None for p in paths.split(",")]
    if len(paths) != len(names):
        raise ValueError(f"{len(names)} encoder names ({', '.join(names)}) but {len(paths)} weight paths")
    return [load_encoder(n, path=p, resolution=resolution, grid=grid) for n, p in zip(names, paths)]
