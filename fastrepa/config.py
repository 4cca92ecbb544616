"""Configuration: dataclasses that are the one source of the CLI flags, their defaults and their checks.

Each dataclass field is one flag (`--learning-rate` for `learning_rate`), named as in the official REPA
train.py wherever REPA has the flag. `build_parser` makes argparse from the fields and `from_args`
turns the parsed flags back into a `TrainConfig`; nothing parses a flag anywhere else. Every config
validates itself in `__post_init__` and names the flag and the allowed values when something is wrong.
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field, fields

from fastrepa.attention import BACKENDS
from fastrepa.kernels._dispatch import IMPLS
from fastrepa.kernels.qk_norm_rope import ROPE_PAIRS
from fastrepa.models import MODEL_NAMES, PDE_FAMILY, PROJECTOR_TYPES, erw_rope, family_of, model_kwargs
from fastrepa.models.pde_blocks import LAMBDA_MODES
from fastrepa.objectives import METHODS, PATH_TYPES, PREDICTIONS, WEIGHTINGS, method_model_options
from fastrepa.objectives.erw import HALF_LIFE, check_erw, default_lambda_c0
from fastrepa.objectives.haste import ATTN_BLOCKS, ATTN_ENCODER_BLOCKS, STOP_STEP, check_haste, parse_blocks
from fastrepa.objectives.reg import CLS_COEFF
from fastrepa.objectives.irepa import SPNORM_METHODS
from fastrepa.objectives.sra import ALIGN_LOSSES, COS_AXES, check_sra, default_blocks

MIXED_PRECISIONS = ("no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "cosine")
DATA_LOADERS = ("auto", "torch", "dali")
NONFINITE = ("stop", "skip")
REPORT_TO = ("auto", "none", "tensorboard", "wandb")
PARALLELS = ("fsdp", "ddp", "none")
VAES = ("ema", "mse", "identity")  # or a local diffusers AutoencoderKL folder / a cached HF repo id


def flag(default, help: str, choices=None, aliases=(), **kw):
    """A dataclass field that is also a CLI flag (`aliases`: other spellings of it, e.g. an upstream one)."""
    meta = {"help": help, "aliases": tuple(aliases)}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


class ConfigError(ValueError):
    """A flag or config key with a bad value; the message names it and what is allowed."""


def _need(cond: bool, name: str, value, expected: str):
    if not cond:
        raise ConfigError(f"--{name.replace('_', '-')}={value!r}: expected {expected}")


@dataclass
class ModelConfig:
    model: str = flag("SiT-XL/2", "model name", choices=MODEL_NAMES)
    num_classes: int = flag(1000, "number of classes (the null class for CFG is this index)")
    encoder_depth: int | None = flag(None, "block (1-based) whose output the projectors align (default 8; 4, a "
                                           "spatial block, for PDE-DiT as FourierFlow)")
    projector_dim: int = flag(2048, "hidden width of the alignment projector")
    qk_norm: bool = flag(False, "LayerNorm on q and k per head (keys attn.q_norm / attn.k_norm)")
    fused_attn: bool = flag(True, "fused attention (sdpa); --no-fused-attn uses the explicit math reference")
    attn_backend: str = flag("sdpa", "attention backend (overrides --fused-attn when not sdpa)", choices=BACKENDS)
    kernels: str = flag("auto", "fused ops: triton (Triton kernels, CUDA), torch (PyTorch reference), "
                                "auto (triton on CUDA, torch elsewhere)", choices=IMPLS)
    rope: bool = flag(False, "2D axial rotary embedding on q and k (after the QK-norm); adds no weights")
    rope_pairs: str | None = flag(None, "which dims RoPE rotates together: half (ours: i and i + head_dim/4 "
                                        "in each half; the default) or interleaved (2i and 2i + 1: EVA-02's, as "
                                        "ERW's checkpoints use; the default with --use_rope)", choices=ROPE_PAIRS)
    projection_layer_type: str | None = flag(None, "the alignment projector: mlp (REPA's) or conv (iREPA's "
                                                   "convolution over the token grid; the default for --method "
                                                   "irepa)", choices=PROJECTOR_TYPES)
    proj_kwargs_kernel_size: int = flag(3, "kernel size of the conv projector (odd; iREPA's README: 3)")
    use_rope: bool = flag(False, "ERW's spelling of --rope: the 2D RoPE with ERW's (EVA-02's) interleaved pairs",
                          aliases=("--use_rope",))
    # Size overrides (official SiT constructor names); None keeps the registry value.
    input_size: int | None = flag(None, "latent size (default: resolution // 8)")
    in_channels: int | None = flag(None, "latent channels (default 4, the SD-VAE)")
    hidden_size: int | None = flag(None, "override the model width")
    depth: int | None = flag(None, "override the number of blocks")
    num_heads: int | None = flag(None, "override the number of heads")
    mlp_ratio: float | None = flag(None, "override the MLP ratio")
    class_dropout_prob: float | None = flag(None, "label dropout probability (default 0.1)")
    # PDE-DiT (FourierFlow)
    num_frames: int = flag(4, "PDE-DiT: condition frames = target frames per window (FourierFlow: 4)")
    lambda_mode: str = flag("learned", "PDE-DiT salient attention's lambda: learned (DIFF Transformer's "
                                       "reparametrisation) or fixed (lambda_init of the block's depth)",
                            choices=LAMBDA_MODES)

    def __post_init__(self):
        _need(self.model in MODEL_NAMES, "model", self.model, f"one of {', '.join(MODEL_NAMES)}")
        _need(self.num_classes >= 1, "num_classes", self.num_classes, "a positive integer")
        _need(self.attn_backend in BACKENDS, "attn_backend", self.attn_backend, f"one of {BACKENDS}")
        _need(self.kernels in IMPLS, "kernels", self.kernels, f"one of {IMPLS}")
        _need(self.rope_pairs is None or self.rope_pairs in ROPE_PAIRS, "rope_pairs", self.rope_pairs,
              f"one of {ROPE_PAIRS}")
        self.rope, pairs = erw_rope(self.rope, self.rope_pairs, self.use_rope or None)
        self.rope_pairs = pairs or "half"
        if self.encoder_depth is None:
            self.encoder_depth = 4 if self.pde else 8
        _need(self.num_frames >= 1, "num_frames", self.num_frames, "a positive integer")
        _need(self.lambda_mode in LAMBDA_MODES, "lambda_mode", self.lambda_mode, f"one of {LAMBDA_MODES}")

    @property
    def pde(self) -> bool:
        """A PDE-DiT model (FourierFlow's fields), not an image backbone."""
        return family_of(self.model) == PDE_FAMILY

    def backend(self) -> str:
        if self.attn_backend != "sdpa":
            return self.attn_backend
        return "sdpa" if self.fused_attn else "math"


@dataclass
class ObjectiveConfig:
    method: str = flag("repa", "training method: repa (alignment to frozen encoders, --enc-type), irepa (REPA "
                               "with a conv projector and a token-z-scored target), sra (self-alignment to the "
                               "EMA model, no encoder), erw (a warmup of the first blocks on the encoder's "
                               "features, then REPA with a decaying weight), haste (REPA plus attention-map "
                               "alignment, both stopped at --align-stop-step) or reg (REPA plus a denoised "
                               "class token carrying the encoder's class feature) on images; fourierflow (flow-"
                               "matching forecasts of PDE fields aligned to a frozen ViViT, with a PDE-DiT model "
                               "and a PDEBench HDF5 file as --data-dir)",
                       choices=tuple(METHODS))
    path_type: str = flag("linear", "interpolant", choices=PATH_TYPES)
    prediction: str = flag("v", "model prediction target", choices=PREDICTIONS)
    weighting: str = flag("uniform", "time sampling", choices=WEIGHTINGS)
    proj_coeff: float | None = flag(None, "weight of the alignment (projection) loss (default 0.5; 1.0 for "
                                          "--method irepa, as iREPA; 1e-4 for --method fourierflow, as FourierFlow)")
    enc_type: str | None = flag(None, "representation encoder(s), comma-separated; 'none' trains without "
                                      "alignment (default dinov2-vit-b; vivit, FourierFlow's MAE ViViT from "
                                      "--enc-path, for --method fourierflow)")
    enc_path: str = flag("", "the encoders' weight files, comma-separated in --enc-type order (an empty entry: "
                             "the default places, the torch hub cache or ckpts/ as official REPA names them)")
    cfg_prob: float = flag(0.1, "accepted for compatibility; as in official REPA it is unused "
                                "(label dropout is the model's class_dropout_prob)")
    # SRA (official SRA flag names)
    block_out_s: int | None = flag(None, "SRA: student block (1-based) whose output goes through the alignment "
                                         "head (default: 8 for SiT-XL / DiT-XL, else 4)")
    block_out_t: int | None = flag(None, "SRA: EMA-teacher block (1-based) aligned to (default: 20 for SiT-XL, "
                                         "16 for DiT-XL, else 8); the teacher runs only up to it")
    t_max: float = flag(0.2, "SRA: the teacher's time is up to t_max less noisy than the student's, in (0, 1]")
    align_loss: str | None = flag(None, "SRA alignment loss: cos (weight 0.5) or sml1 (smooth L1, beta 0.05, "
                                        "official epoch schedule); default cos for SiT, sml1 for DiT (as official)",
                                  choices=ALIGN_LOSSES, aliases=("--loss-type",))
    align_cos_axis: str = flag("tokens", "SRA cos loss: cosine over the token axis (tokens: official SRA's "
                                         "cosine_similarity(dim=1) on [N, T, D]) or per token over the features",
                               choices=COS_AXES)

    # iREPA (official iREPA flag names)
    spnorm_method: str | None = flag(None, "iREPA: the encoder target's normalisation over tokens before the "
                                           "cosine: zscore (the default for --method irepa) or none",
                                     choices=SPNORM_METHODS)
    zscore_alpha: float = flag(0.6, "iREPA: z = (z - alpha * mean_tokens(z)) / std_tokens(z); official 0.6")
    # ERW (official ERW flag names)
    warmup_steps: int = flag(100000, "ERW: warmup steps (phase 1), counted in --max-train-steps as ERW does")
    l2r_depth: int = flag(4, "ERW: the blocks (1..N) trained in the warmup; the projector follows block N there")
    lambda_c0: float | None = flag(None, "ERW: the alignment weight at the end of the warmup, decaying as "
                                         "c0 * 2^(-(step - warmup) / --lambda-half-life) (default 6 for XL "
                                         "models, 3 for L, 1 otherwise)")
    lambda_half_life: float = flag(float(HALF_LIFE), "ERW: steps over which the alignment weight halves")
    # HASTE (official HASTE flag names where it has them; its blocks are hard-coded upstream)
    attn_coeff: float = flag(0.5, "HASTE: weight of the attention-map alignment (cross-entropy of the model's "
                                  "attention to the encoder's)")
    align_stop_step: int = flag(STOP_STEP, "HASTE: the step from which both alignment terms are off and the "
                                           "encoder no longer runs (plain SiT training)",
                                aliases=("--early-stop-point",))
    attn_blocks: str = flag(",".join(map(str, ATTN_BLOCKS)), "HASTE: the model's blocks (1-based) whose attention "
                                                             "maps are aligned (official: 5-8 of SiT-XL/2)")
    attn_encoder_blocks: str = flag(",".join(map(str, ATTN_ENCODER_BLOCKS)),
                                    "HASTE: the encoder's blocks (1-based) they are aligned to, pairwise "
                                    "(official: 9-12 of DINOv2-B)")
    # REG (official REG flag name)
    cls: float = flag(CLS_COEFF, "REG: weight of the class token's denoising loss")

    def __post_init__(self):
        _need(self.path_type in PATH_TYPES, "path_type", self.path_type, f"one of {PATH_TYPES}")
        _need(self.warmup_steps >= 1, "warmup_steps", self.warmup_steps, "a positive integer")
        _need(self.lambda_c0 is None or self.lambda_c0 >= 0, "lambda_c0", self.lambda_c0, "a number >= 0")
        _need(self.lambda_half_life > 0, "lambda_half_life", self.lambda_half_life, "a number of steps > 0")
        _need(self.prediction in PREDICTIONS, "prediction", self.prediction, f"one of {PREDICTIONS}")
        _need(self.weighting in WEIGHTINGS, "weighting", self.weighting, f"one of {WEIGHTINGS}")
        if self.proj_coeff is None:
            self.proj_coeff = {"irepa": 1.0, "fourierflow": 1e-4}.get(self.method, 0.5)
        if self.enc_type is None:
            self.enc_type = "vivit" if self.method == "fourierflow" else "dinov2-vit-b"
        _need(self.proj_coeff >= 0, "proj_coeff", self.proj_coeff, "a number >= 0")
        if self.spnorm_method is None:
            self.spnorm_method = "zscore" if self.method == "irepa" else "none"
        _need(self.spnorm_method in SPNORM_METHODS, "spnorm_method", self.spnorm_method, f"one of {SPNORM_METHODS}")
        _need(self.spnorm_method == "none" or self.method == "irepa", "spnorm_method", self.spnorm_method,
              "none unless --method irepa (the z-scored target is iREPA's)")
        _need(bool(self.enc_type.strip()), "enc_type", self.enc_type, "an encoder name or 'none'")
        _need(not self.enc_path or len(self.enc_path.split(",")) == len(self.encoders), "enc_path", self.enc_path,
              f"one weight file per --enc-type encoder ({len(self.encoders)}: {self.enc_type}), comma-separated")
        _need(self.method in METHODS, "method", self.method, f"one of {tuple(METHODS)}")
        _need(0 < self.t_max <= 1, "t_max", self.t_max, "a number in (0, 1]")
        _need(self.align_loss is None or self.align_loss in ALIGN_LOSSES, "align_loss", self.align_loss,
              f"one of {ALIGN_LOSSES}")
        _need(self.align_cos_axis in COS_AXES, "align_cos_axis", self.align_cos_axis, f"one of {COS_AXES}")
        _need(self.attn_coeff >= 0, "attn_coeff", self.attn_coeff, "a number >= 0")
        _need(self.align_stop_step >= 0, "align_stop_step", self.align_stop_step, "a step >= 0")
        _need(self.cls >= 0, "cls", self.cls, "a number >= 0")
        for name in ("attn_blocks", "attn_encoder_blocks"):
            try:
                parse_blocks("--" + name.replace("_", "-"), getattr(self, name))
            except ValueError as e:
                raise ConfigError(str(e)) from None

    def haste_blocks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(the model's, the encoder's) HASTE attention blocks, 1-based."""
        return (parse_blocks("--attn-blocks", self.attn_blocks),
                parse_blocks("--attn-encoder-blocks", self.attn_encoder_blocks))

    @property
    def encoders(self) -> list[str]:
        """The frozen encoders the method aligns to (SRA aligns to the model itself: none)."""
        names = [e.strip() for e in self.enc_type.split(",") if e.strip()]
        return [] if names == ["none"] or self.method == "sra" else names

    def sra_blocks(self, model_name: str) -> tuple[int, int]:
        """(block_out_s, block_out_t) with the official per-model defaults for those not given."""
        s, t = default_blocks(model_name)
        return (s if self.block_out_s is None else self.block_out_s, t if self.block_out_t is None else self.block_out_t)

    def erw_lambda_c0(self, model_name: str) -> float:
        return default_lambda_c0(model_name) if self.lambda_c0 is None else self.lambda_c0

    def sra_align_loss(self, model_name: str) -> str:
        return self.align_loss or ("sml1" if model_name.startswith("DiT-") else "cos")


@dataclass
class DataConfig:
    data_dir: str = flag("../data/imagenet256", "dataset folder: the official REPA layout (images/, vae-sd/) or a "
                                                "pack (manifest.json; python -m fastrepa.data.pack)")
    resolution: int = flag(256, "image resolution")
    vae: str = flag("ema", "SD-VAE for sample grids: ema, mse (stabilityai/sd-vae-ft-*, from the local Hugging "
                           "Face cache), a local AutoencoderKL folder, or identity (pixel-space demo data)")
    latents_scale: float = flag(0.18215, "latent scale (SD-VAE: 0.18215)")
    latents_bias: float = flag(0.0, "latent bias")
    pde_reduce: int = flag(1, "PDE data: keep every N-th grid point per axis (FourierFlow: 4, 512 -> 128)")
    test_fraction: float = flag(0.1, "PDE data: the fraction of trajectories held out for evaluation (a seeded "
                                     "split by --seed, recorded in the checkpoint)")
    feature_cache: str = flag("", "PDE data: a folder of the encoder's tokens of every train window, written by "
                                  "python -m fastrepa.data.pde features; the encoder is then not loaded (--enc-path, "
                                  "if given, is checked against the cache)")
    num_workers: int = flag(4, "data loader worker processes (torch) or CPU threads (DALI)")
    data_loader: str = flag("auto", "torch (DataLoader, both layouts), dali (packed layout; GPU JPEG decode), or "
                                    "auto (dali for a packed dataset on CUDA when DALI is installed, else torch)",
                            choices=DATA_LOADERS)

    def __post_init__(self):
        _need(self.resolution >= 8, "resolution", self.resolution, "an image size >= 8")
        _need(self.vae in VAES or os.path.isdir(self.vae) or self.vae.count("/") == 1, "vae", self.vae,
              f"one of {VAES}, a local AutoencoderKL folder or a Hugging Face repo id")
        _need(self.latents_scale > 0, "latents_scale", self.latents_scale, "a number > 0")
        _need(self.pde_reduce >= 1, "pde_reduce", self.pde_reduce, "a positive integer")
        _need(0 < self.test_fraction < 1, "test_fraction", self.test_fraction, "a number in (0, 1)")
        _need(self.num_workers >= 0, "num_workers", self.num_workers, "an integer >= 0")
        _need(self.data_loader in DATA_LOADERS, "data_loader", self.data_loader, f"one of {DATA_LOADERS}")


@dataclass
class OptimConfig:
    learning_rate: float = flag(1e-4, "AdamW learning rate")
    adam_beta1: float = flag(0.9, "AdamW beta1")
    adam_beta2: float = flag(0.999, "AdamW beta2")
    adam_weight_decay: float = flag(0.0, "AdamW weight decay")
    adam_epsilon: float = flag(1e-8, "AdamW epsilon")
    max_grad_norm: float = flag(1.0, "gradient-norm clip")
    ema_decay: float = flag(0.9999, "EMA decay per step")
    lr_schedule: str = flag("constant", "learning rate after the warmup: constant (official REPA) or cosine "
                                        "(decays to 0 at --max-train-steps)", choices=LR_SCHEDULES)
    lr_warmup_steps: int = flag(0, "linear learning-rate warmup from 0 over this many steps (official REPA: 0)")

    def __post_init__(self):
        _need(self.lr_schedule in LR_SCHEDULES, "lr_schedule", self.lr_schedule, f"one of {LR_SCHEDULES}")
        _need(self.lr_warmup_steps >= 0, "lr_warmup_steps", self.lr_warmup_steps, "an integer >= 0")
        _need(self.learning_rate > 0, "learning_rate", self.learning_rate, "a number > 0")
        for name in ("adam_beta1", "adam_beta2"):
            _need(0 <= getattr(self, name) < 1, name, getattr(self, name), "a number in [0, 1)")
        _need(self.adam_weight_decay >= 0, "adam_weight_decay", self.adam_weight_decay, "a number >= 0")
        _need(self.adam_epsilon > 0, "adam_epsilon", self.adam_epsilon, "a number > 0")
        _need(self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm, "a number > 0")
        _need(0 <= self.ema_decay <= 1, "ema_decay", self.ema_decay, "a number in [0, 1]")


@dataclass
class TrainConfig:
    output_dir: str = flag("exps", "folder of experiments")
    exp_name: str = flag("", "experiment name (required): outputs go to OUTPUT_DIR/EXP_NAME")
    logging_dir: str = flag("logs", "accepted for compatibility (metrics go to the experiment folder)")
    report_to: str = flag("auto", "metrics sink besides metrics.jsonl (always written): auto (TensorBoard when "
                                  "installed), none, tensorboard, wandb", choices=REPORT_TO)
    wandb_project: str = flag("REPA", "W&B project of --report-to wandb (official REPA: REPA)")
    sampling_steps: int = flag(10000, "write a sample grid from the EMA model every N steps")
    resume_step: int = flag(0, "resume from the checkpoint of this step in OUTPUT_DIR/EXP_NAME/checkpoints "
                               "(0: the newest complete one there, if any; else start fresh)")
    batch_size: int = flag(256, "global batch size")
    epochs: int = flag(1400, "upper bound on epochs (training stops at whichever limit comes first)")
    max_train_steps: int = flag(400000, "optimizer steps to train")
    checkpointing_steps: int = flag(50000, "write a checkpoint every N steps (and at the end)")
    gradient_accumulation_steps: int = flag(1, "micro-batches per optimizer step")
    mixed_precision: str = flag("bf16", "autocast precision on CUDA (CPU runs fp32)", choices=MIXED_PRECISIONS)
    allow_tf32: bool = flag(False, "allow TF32 matmuls on CUDA")
    seed: int = flag(0, "global seed")
    log_every: int = flag(100, "write a metrics line every N steps")
    sample_cfg_scale: float = flag(4.0, "CFG scale of the periodic sample grids")
    sample_num_steps: int = flag(50, "Euler steps of the periodic sample grids")
    parallel: str = flag("fsdp", "data parallelism under torchrun: fsdp (FSDP2 fully_shard per block, then the "
                                 "root), ddp, or none; a single process always runs plain", choices=PARALLELS)
    keep_last: int | None = flag(None, "keep only the K newest complete checkpoints (default: keep all)")
    compile: bool = flag(False, "torch.compile each SiT block in place before wrapping (no _orig_mod. keys)")
    activation_checkpointing: bool = flag(False, "recompute each SiT block's activations in the backward pass")
    dry_run: bool = flag(False, "print the resolved config, parameter and FLOP counts, and exit (reads no data)")
    on_nonfinite: str = flag("stop", "a step whose loss or grad norm is not finite never updates the weights; "
                                     "stop: checkpoint the weights and exit with an error; skip: drop the step, "
                                     "count it (metrics, report) and go on", choices=NONFINITE)
    peak_tflops: float = flag(0.0, "per-device peak TFLOP/s for the MFU metric (0: bf16 dense peak from the "
                                   "device name, known for H100/H200/A100/...; none on other devices)")
    dist_timeout: float = flag(1800.0, "seconds a collective waits for the other ranks before failing, so a "
                                       "rank that died or hangs does not hold the others forever")
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self):
        _need(bool(self.exp_name), "exp_name", self.exp_name, "a non-empty experiment name")
        _need(self.report_to in REPORT_TO, "report_to", self.report_to, f"one of {REPORT_TO}")
        _need(self.on_nonfinite in NONFINITE, "on_nonfinite", self.on_nonfinite, f"one of {NONFINITE}")
        _need(self.peak_tflops >= 0, "peak_tflops", self.peak_tflops, "a number >= 0 (0: from the device name)")
        _need(self.dist_timeout > 0, "dist_timeout", self.dist_timeout, "a number of seconds > 0")
        for name in ("batch_size", "max_train_steps", "checkpointing_steps", "gradient_accumulation_steps",
                     "sampling_steps", "epochs", "log_every", "sample_num_steps"):
            _need(getattr(self, name) >= 1, name, getattr(self, name), "a positive integer")
        _need(self.parallel in PARALLELS, "parallel", self.parallel, f"one of {PARALLELS}")
        _need(self.keep_last is None or self.keep_last >= 1, "keep_last", self.keep_last,
              "an integer >= 1 (or leave it out to keep every checkpoint)")
        _need(self.resume_step >= 0, "resume_step", self.resume_step, "a step >= 0")
        _need(self.mixed_precision in MIXED_PRECISIONS, "mixed_precision", self.mixed_precision,
              f"one of {MIXED_PRECISIONS}")
        _need(self.batch_size % self.gradient_accumulation_steps == 0, "batch_size", self.batch_size,
              f"a multiple of --gradient-accumulation-steps={self.gradient_accumulation_steps}")
        _need(self.data.resolution % 8 == 0 or self.model.input_size is not None, "resolution",
              self.data.resolution, "a multiple of 8 (the SD-VAE factor) unless --input-size is given")
        if self.objective.method == "reg":
            _need(family_of(self.model.model) == "SiT", "model", self.model.model,
                  "a SiT model for --method reg (REG trains SiT with flow matching)")
            _need(self.model.projection_layer_type in (None, "mlp"), "projection_layer_type",
                  self.model.projection_layer_type, "mlp for --method reg (the class token is not on the grid)")
            _need(not self.model.rope, "rope", self.model.rope, "False for --method reg (the class token is not "
                                                                 "on the RoPE grid)")
        fourier = self.objective.method == "fourierflow"
        _need(fourier == self.model.pde, "model", self.model.model,
              f"a {PDE_FAMILY} model for --method fourierflow" if fourier else
              f"an image backbone (SiT or DiT) for --method {self.objective.method}; {PDE_FAMILY} trains with "
              "--method fourierflow")
        if fourier:
            _need(self.objective.encoders in ([], ["vivit"]), "enc_type", self.objective.enc_type,
                  "vivit (FourierFlow's MAE ViViT, with --enc-path) or none for --method fourierflow")
        _need(not self.data.feature_cache or (fourier and self.objective.encoders == ["vivit"]), "feature_cache",
              self.data.feature_cache, "empty unless --method fourierflow aligns to --enc-type vivit")
        if self.objective.method in ("erw", "haste", "reg"):
            _need(bool(self.objective.encoders), "enc_type", self.objective.enc_type,
                  f"an encoder for --method {self.objective.method}")
        # The model options are checked here, before any data or weights are touched.
        try:
            kw = model_kwargs(self.model.model, **self.model_overrides(),
                              **method_model_options(self, [1] * len(self.objective.encoders)))
        except ValueError as e:
            flags = re.findall(r"\b([a-z_]+)=", str(e))
            raise ConfigError(f"{', '.join('--' + f.replace('_', '-') for f in flags) or '--model'}: {e}") from None
        if self.objective.method == "haste":
            _need(self.parallel != "ddp", "parallel", self.parallel,
                  "fsdp or none for --method haste (after --align-stop-step its projectors get no gradients, "
                  "which DDP's reducer does not allow)")
            try:
                check_haste(*self.objective.haste_blocks(), kw["depth"], self.objective.align_stop_step)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.objective.method == "erw":
            _need(self.parallel != "ddp", "parallel", self.parallel,
                  "fsdp or none for --method erw (its warmup leaves most parameters without gradients, which "
                  "DDP's reducer does not allow)")
            try:
                check_erw(self.objective.l2r_depth, kw["encoder_depth"], kw["depth"], self.objective.warmup_steps,
                          self.max_train_steps)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.objective.method == "sra":
            try:
                check_sra(*self.objective.sra_blocks(self.model.model), self.objective.t_max, kw["depth"])
            except ValueError as e:
                raise ConfigError(str(e)) from None

    def model_overrides(self) -> dict:
        """Constructor arguments for `build_model(self.model.model, **...)` (z_dims is the caller's)."""
        m = self.model
        if m.pde:
            kw = dict(num_frames=m.num_frames, encoder_depth=m.encoder_depth, projector_dim=m.projector_dim,
                      attn_backend=m.backend(), lambda_mode=m.lambda_mode)
            for name in ("input_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio"):
                if getattr(m, name) is not None:
                    kw[name] = getattr(m, name)
            return kw
        kw = dict(num_classes=m.num_classes, encoder_depth=m.encoder_depth, projector_dim=m.projector_dim,
                  qk_norm=m.qk_norm, attn_backend=m.backend(), kernels=m.kernels, rope=m.rope, rope_pairs=m.rope_pairs,
                  projector_type=m.projection_layer_type or ("conv" if self.objective.method == "irepa" else "mlp"),
                  projector_kernel=m.proj_kwargs_kernel_size,
                  input_size=m.input_size if m.input_size is not None else self.data.resolution // 8)
        for name in ("in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio", "class_dropout_prob"):
            if getattr(m, name) is not None:
                kw[name] = getattr(m, name)
        return kw


GROUPS = {"model": ModelConfig, "objective": ObjectiveConfig, "data": DataConfig, "optim": OptimConfig}

# Presets set defaults; flags given on the command line win.
PRESETS = {
    # The embedded demo: class-conditional 32x32 shapes generated by fastrepa.data.synthetic, trained in
    # pixel space (identity "VAE") and aligned to the patch-pixel encoder. Minutes on a CPU.
    "demo": dict(model="SiT-S/4", input_size=32, in_channels=3, hidden_size=128, depth=6, num_heads=2,
                 num_classes=10, encoder_depth=2, projector_dim=256, enc_type="patch-pixels", resolution=32,
                 vae="identity", latents_scale=1.0, batch_size=32, learning_rate=1e-3, ema_decay=0.995,
                 max_train_steps=1200, checkpointing_steps=600, sampling_steps=600, log_every=100,
                 num_workers=0, mixed_precision="bf16", exp_name="demo", output_dir="runs",
                 data_dir="runs/demo-data", sample_num_steps=50, sample_cfg_scale=4.0),
    # FourierFlow on the CPU: a small PDE-DiT forecasting the synthetic shallow-water file of
    # `python -m fastrepa.data.pde synth runs/pde-demo.h5 --num 48 --size 16` (no encoder: FourierFlow's MAE
    # ViViT has no public weights; add --enc-type vivit --enc-path FILE to align). About a minute on 2 cores.
    "pde-demo": dict(method="fourierflow", model="PDE-DiT-S/4", input_size=16, hidden_size=64, num_heads=2, depth=2,
                     enc_type="none", batch_size=8, learning_rate=2e-3, ema_decay=0.99, max_train_steps=1200,
                     checkpointing_steps=600, sampling_steps=600, log_every=200, test_fraction=0.25,
                     num_workers=0, mixed_precision="no", exp_name="pde-demo", output_dir="runs",
                     data_dir="runs/pde-demo.h5"),
}


def _flat_fields():
    """(name, field, group) for every flag, the TrainConfig's own first."""
    for f in fields(TrainConfig):
        if f.name in GROUPS:
            for g in fields(GROUPS[f.name]):
                yield g.name, g, f.name
        else:
            yield f.name, f, None


def flag_names() -> list[str]:
    return [name for name, _, _ in _flat_fields()]


def _parse_type(f):
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    for name, fn in (("bool", None), ("int", int), ("float", float), ("str", str)):
        if t.startswith(name):
            return name, fn
    raise TypeError(f"unsupported config field type {f.type!r} for {f.name}")


def add_flags(parser: argparse.ArgumentParser) -> None:
    for name, f, _ in _flat_fields():
        kind, fn = _parse_type(f)
        opts = ["--" + name.replace("_", "-"), *f.metadata.get("aliases", ())]
        meta = dict(f.metadata)
        # Defaults stay None on the parser so presets and dataclass defaults can tell "not given".
        if kind == "bool":
            parser.add_argument(*opts, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=meta["help"])
        else:
            parser.add_argument(*opts, dest=name, type=fn, default=None, help=meta["help"],
                                choices=meta.get("choices"))


def build_parser(description: str = "fastrepa training") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="a named set of defaults (flags given explicitly still win)")
    add_flags(parser)
    return parser


def from_flat(values: dict) -> TrainConfig:
    """Build a TrainConfig from flat flag values (unknown keys are an error naming them)."""
    known = set(flag_names())
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}")
    groups = {g: {} for g in GROUPS}
    top = {}
    for name, _, group in _flat_fields():
        if name in values:
            (groups[group] if group else top)[name] = values[name]
    return TrainConfig(**top, **{g: cls(**groups[g]) for g, cls in GROUPS.items()})


def from_args(args: argparse.Namespace) -> TrainConfig:
    values = dict(PRESETS[args.preset]) if getattr(args, "preset", None) else {}
    values.update({k: v for k, v in vars(args).items() if k != "preset" and v is not None})
    return from_flat(values)


def to_flat(cfg: TrainConfig) -> dict:
    """The config as one flat dict of flag values (plain types): the `args` of a REPA checkpoint."""
    out = {}
    for name, _, group in _flat_fields():
        out[name] = getattr(getattr(cfg, group) if group else cfg, name)
    return out
