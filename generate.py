"""Sample from a checkpoint into the ADM-style .npz (PNGs if asked), and score it. Flags follow the official
REPA generate.py.

    python generate.py --ckpt runs/demo/checkpoints/0001000.pt --num-fid-samples 100 --mode sde --num-steps 250
    torchrun --nproc_per_node=8 generate.py --ckpt ... --ref VIRTUAL_imagenet256_labeled.npz

Layout of --sample-dir: shards/shard-SSSSSSS-EEEEEEE.npz (one per batch, written atomically by the process
that made it: the images and, with --ref, their Inception features) and shards/settings.json; at the end
rank 0 writes <name>.npz (arr_0 uint8 [N, H, W, 3], index order), generate.json (settings, and the metrics
with --ref, computed from the shards' features) and, with --png, <name>/NNNNNN.png. A rerun with the same
settings skips the complete shards; other settings are refused unless --overwrite.
"""
import argparse
import json
import os
import shutil
import sys
import time

from fastrepa.io import write_json


def build_parser():
    from fastrepa.eval.inception import PREPROCESS_MODES
    from fastrepa.generation import COMPILE_MODES
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="checkpoint .pt in the official REPA layout")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights to sample from")
    p.add_argument("--sample-dir", default="samples", help="output folder")
    p.add_argument("--global-seed", type=int, default=0)
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True)
    # Model options: default to what the checkpoint's args say.
    p.add_argument("--model", default=None)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--encoder-depth", type=int, default=None)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--fused-attn", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--kernels", choices=("auto", "triton", "torch"), default="auto",
                   help="fused ops: Triton kernels on CUDA (auto, triton) or the PyTorch reference (torch)")
    p.add_argument("--rope", action=argparse.BooleanOptionalAction, default=None,
                   help="2D RoPE on q/k (default: the checkpoint's)")
    p.add_argument("--rope-pairs", choices=("half", "interleaved"), default=None,
                   help="RoPE's dim pairing (default: the checkpoint's, else half; interleaved for ERW's)")
    # ERW's inference.py spellings
    p.add_argument("--use_rope", "--use-rope", dest="use_rope", action=argparse.BooleanOptionalAction, default=None,
                   help="ERW's spelling: --rope with ERW's interleaved pairs (default: the checkpoint's)")
    p.add_argument("--use_swiglu", dest="use_swiglu", action=argparse.BooleanOptionalAction, default=False,
                   help="ERW's flag; only the off setting exists here (no SwiGLU model is built)")
    p.add_argument("--wo_shift", dest="wo_shift", action=argparse.BooleanOptionalAction, default=False,
                   help="ERW's flag; only the off setting exists here (the adaLN shift is always there)")
    p.add_argument("--calculate-fid", action="store_true",
                   help="ERW's spelling: score the samples (needs --fid-reference / --ref; scoring happens "
                        "whenever a reference is given)")
    p.add_argument("--projector-embed-dims", default=None,
                   help="accepted for compatibility; the projector sizes are read from the checkpoint")
    p.add_argument("--legacy", action=argparse.BooleanOptionalAction, default=False,
                   help="accepted for compatibility; the legacy layout is detected from the keys")
    p.add_argument("--vae", default=None,
                   help="latent decoder (default: the checkpoint's; official checkpoints: ema, the SD-VAE)")
    p.add_argument("--per-proc-batch-size", type=int, default=32)
    p.add_argument("--num-fid-samples", type=int, default=50_000)
    p.add_argument("--mode", choices=("ode", "sde", "ddpm"), default=None,
                   help="sampler: ode / sde for a velocity model (SiT; default ode, as official REPA), ddpm for a "
                        "DiT checkpoint (its default: DDPM respaced to --num-steps, as DiT's sample_ddp.py)")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    # REG's generate.py spellings
    p.add_argument("--cls-cfg-scale", type=float, default=1.5,
                   help="REG checkpoints: the CFG scale of the class token (<= 0: its conditional velocity "
                        "alone), as official REG; other checkpoints: unused")
    p.add_argument("--cls", type=int, default=None,
                   help="REG's flag (the class token's width); read from the checkpoint, checked when given")
    p.add_argument("--path-type", choices=("linear", "cosine"), default=None)
    p.add_argument("--num-steps", "--num-sampling-steps", dest="num_steps", type=int, default=None,
                   help="sampler steps (default 50 for ode/sde, 250 for ddpm; --num-sampling-steps is DiT's name)")
    p.add_argument("--guided-channels", choices=("3", "all"), default="3",
                   help="ddpm CFG: guide the first 3 eps channels as DiT does ('for exact reproducibility', the "
                        "default) or all of them")
    p.add_argument("--heun", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--guidance-low", type=float, default=0.0)
    p.add_argument("--guidance-high", type=float, default=1.0)
    p.add_argument("--png", action=argparse.BooleanOptionalAction, default=False, help="also write PNG files")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="autocast dtype of the model and the VAE decode (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model's velocity (default: on for CUDA, off on CPU; on with --compile-mode)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                   help="torch.compile mode (default: default); reduce-overhead captures CUDA graphs. Static "
                        "shapes (dynamic=False): one graph for the batch and one for the CFG-doubled batch")
    p.add_argument("--overwrite", action="store_true",
                   help="discard the shards of an earlier run with different settings in --sample-dir")
    p.add_argument("--dist-timeout", type=float, default=1800.0,
                   help="seconds a process waits for the others at a barrier before failing")
    # Metrics (fastrepa.eval) of the assembled samples.
    p.add_argument("--ref", "--fid-reference", dest="ref", default=None,
                   help="ADM reference .npz, or a folder of PNG/JPEG images: score the samples (FID, sFID, IS, "
                        "P/R); --fid-reference is ERW's spelling")
    p.add_argument("--ref-center-crop", action="store_true",
                   help="with a --ref folder: ADM center crop its images to the samples' resolution")
    p.add_argument("--inception", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (default: the torch hub cache)")
    p.add_argument("--inception-preprocess", choices=PREPROCESS_MODES, default=None,
                   help=f"Inception resize and normalisation: tf (ADM's TF evaluator) or pytorch-fid (default: "
                        f"{PREPROCESS_MODES[0]}; see python -m fastrepa.eval --help)")
    p.add_argument("--eval-batch-size", type=int, default=100)
    p.add_argument("--fd-method", choices=("sqrtm", "eigh"), default="sqrtm",
                   help="Frechet distance matrix square root (see python -m fastrepa.eval --help)")
    p.add_argument("--stream-features", action=argparse.BooleanOptionalAction, default=True,
                   help="with --ref: every process computes the Inception features of each batch right after "
                        "decoding it and stores them in the batch's shard; rank 0 scores the gathered features "
                        "(default). --no-stream-features: rank 0 scores the assembled .npz afterwards")
    return p


SETTINGS_FILE = "settings.json"


def _check_settings(shard_dir: str, settings: dict, overwrite: bool):
    """None if the shard folder is new or holds this run's shards; else a message naming the differences."""
    path = os.path.join(shard_dir, SETTINGS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        old = {"<unreadable settings.json>": str(e)}
    if old == settings or overwrite:
        return None
    diff = [f"{k}: {old.get(k, '<absent>')!r} there, {settings.get(k, '<absent>')!r} now"
            for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
    return (f"{shard_dir} holds samples of a run with different settings ({'; '.join(diff)}); pass --overwrite "
            "to discard them, or choose another --sample-dir")


def _compile_numerics(mode):
    """The part of a compile mode that changes the numbers: None (eager), "default" (reduce-overhead too: its
    CUDA graphs replay the same kernels) or "max-autotune" (other kernels, with or without CUDA graphs)."""
    return mode and ("max-autotune" if mode.startswith("max-autotune") else "default")


def _discard_previous(sample_dir: str, shard_dir: str, png_dir: str) -> None:
    report = os.path.join(sample_dir, "generate.json")
    old = {}
    if os.path.isfile(report):
        try:
            with open(report) as f:
                old = json.load(f)
        except (OSError, ValueError):
            pass
        os.remove(report)
    root = os.path.abspath(sample_dir) + os.sep
    for d in (shard_dir, png_dir, old.get("png_dir")):
        if d and os.path.abspath(d).startswith(root) and os.path.isdir(d):
            shutil.rmtree(d)
    f = old.get("samples")
    if f and os.path.abspath(f).startswith(root) and os.path.isfile(f):
        os.remove(f)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["forecast"]:  # a PDE-DiT checkpoint's forecasts and their scores (FourierFlow)
        from fastrepa.eval import pde
        return pde.main(argv[1:])
    parser = build_parser()
    a = parser.parse_args(argv)
    for name, ok, want in (("per-proc-batch-size", a.per_proc_batch_size >= 1, "a positive integer"),
                           ("num-fid-samples", a.num_fid_samples >= 1, "a positive integer"),
                           ("num-steps", a.num_steps is None or a.num_steps >= (2 if a.mode == "sde" else 1),
                            "at least 2 for --mode sde, 1 otherwise"),
                           ("cfg-scale", a.cfg_scale >= 1.0, "a number >= 1 (1 disables guidance)"),
                           ("guidance-low", 0 <= a.guidance_low <= a.guidance_high <= 1,
                            "0 <= --guidance-low <= --guidance-high <= 1"),
                           ("eval-batch-size", a.eval_batch_size >= 1, "a positive integer"),
                           ("num-fid-samples", a.ref is None or a.num_fid_samples >= 2,
                            "at least 2 to score them with --ref (FID needs a covariance)"),
                           ("dist-timeout", a.dist_timeout > 0, "a positive number of seconds")):
        if not ok:
            parser.error(f"--{name}: expected {want}")
    if not os.path.isfile(a.ckpt):
        parser.error(f"--ckpt {a.ckpt}: no such file")
    if a.compile is False and a.compile_mode is not None:
        parser.error(f"--compile-mode {a.compile_mode} needs compiling: drop --no-compile")
    if a.ref_center_crop and not (a.ref and os.path.isdir(a.ref)):
        parser.error("--ref-center-crop: applies to a --ref folder of images only")
    if a.calculate_fid and a.ref is None:
        parser.error("--calculate-fid: give the reference with --fid-reference (or --ref)")
    for flag, on in (("--use_swiglu", a.use_swiglu), ("--wo_shift", a.wo_shift)):
        if on:
            parser.error(f"{flag}: ERW's SwiGLU / shift-free variants are not built here; sample without it")
    from fastrepa.models import erw_rope
    a.rope, a.rope_pairs = erw_rope(a.rope, a.rope_pairs, a.use_rope)

    inception = None
    if a.ref is not None:  # check the metric inputs now, not after hours of sampling
        from fastrepa.eval import PREPROCESS_MODES, EvalInputError, ReferenceFile, find_weights, load_inception
        try:
            ReferenceFile(a.ref)
            weights = str(find_weights(a.inception))
            preprocess = a.inception_preprocess or PREPROCESS_MODES[0]
            inception = (weights, load_inception(weights, preprocess=preprocess))  # a damaged file fails here
        except (EvalInputError, FileNotFoundError, RuntimeError) as e:
            parser.error(f"--ref/--inception: {e}")
    elif a.inception is not None or a.inception_preprocess is not None:
        parser.error("--inception and --inception-preprocess are used with --ref only")

    from fastrepa import distributed
    env = distributed.setup(timeout_s=a.dist_timeout)
    try:
        return _run(parser, a, env, inception)
    finally:
        distributed.teardown(env)


def _run(parser, a, env, inception) -> int:
    generator = Generator(parser, a, env, inception)
    generator.build()
    return generator.fit()


class Generator:
    """One sampling run: `build` (the model the checkpoint describes, the VAE, the settings and the shard
    folder, the Inception features), `step(start, end)` (one batch sampled, decoded and written as a shard),
    `fit` (this rank's missing batches, the backfill of older shards, then on rank 0 the .npz, the metrics
    and generate.json). Returns exit codes like main."""

    def __init__(self, parser, a, env, inception):
        self.parser, self.a, self.env, self.inception = parser, a, env, inception

    def build(self) -> None:
        import torch

        from fastrepa.official_ckpt import CheckpointError, load_checkpoint_file, weights_name
        from fastrepa.models import PDE_FAMILY
        from fastrepa.generation import (check_mode, compile_velocity, cudagraph_skips, default_mode,
                                         model_from_checkpoint)
        from fastrepa.kernels import use_triton
        from fastrepa.vae import load_vae

        parser, a, env = self.parser, self.a, self.env
        self.t0 = time.time()
        device = self.device = env.device
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = a.tf32
            torch.backends.cudnn.allow_tf32 = a.tf32
        precision = a.precision if a.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
        use_compile = a.compile if a.compile is not None else (a.compile_mode is not None or device.type == "cuda")
        self.compile_mode = compile_mode = (a.compile_mode or "default") if use_compile else None
        try:  # what runs the fused ops here ("auto": Triton on CUDA); "triton" where it cannot run fails now
            kernels = "triton" if use_triton(a.kernels, torch.empty(0, device=device)) else "torch"
        except RuntimeError as e:
            parser.error(f"--kernels: {e}")
        overrides = {"model": a.model, "num_classes": a.num_classes, "encoder_depth": a.encoder_depth,
                     "qk_norm": a.qk_norm, "rope": a.rope, "rope_pairs": a.rope_pairs, "kernels": a.kernels,
                     "input_size": a.resolution // 8 if a.resolution else None}
        if a.fused_attn is not None:
            overrides["attn_backend"] = "sdpa" if a.fused_attn else "math"
        try:
            ckpt = load_checkpoint_file(a.ckpt)
            if str((ckpt.get("args") or {}).get("model") or "").startswith(PDE_FAMILY + "-"):
                parser.error(f"--ckpt {a.ckpt}: a --method fourierflow ({PDE_FAMILY}) checkpoint forecasts fields, it "
                             f"does not sample images: python generate.py forecast --ckpt {a.ckpt} (python -m "
                             "fastrepa.eval.pde)")
            model, args = model_from_checkpoint(a.ckpt, a.weights, overrides, ckpt=ckpt)
        except CheckpointError as e:
            parser.error(f"--ckpt: {e}")
        weights = weights_name(ckpt, a.weights)  # "state_dict": a bare state dict (select_weights warned)
        del ckpt
        self.mode = a.mode or default_mode(model)
        try:
            check_mode(model, self.mode)
        except ValueError as e:
            parser.error(f"{e} ({a.ckpt})")
        self.num_steps = a.num_steps or (250 if self.mode == "ddpm" else 50)
        if self.mode == "sde" and self.num_steps < 2:
            parser.error("--num-steps: expected at least 2 for --mode sde")
        if self.mode == "ddpm" and (a.guidance_low, a.guidance_high) != (0.0, 1.0):
            parser.error("--guidance-low/--guidance-high: DDPM sampling (a DiT checkpoint) guides every step, as "
                         "DiT does; the guidance interval is an option of the ODE/SDE samplers")
        if a.cls is not None and a.cls != model.cls_token_dim:
            parser.error(f"--cls {a.cls}: the checkpoint's class token has {model.cls_token_dim} dims "
                         f"({'a REG checkpoint' if model.cls_token_dim else 'not a REG checkpoint'})")
        self.model = model.to(device)
        vae_name = a.vae or args.get("vae") or "ema"
        try:  # the SD-VAE decodes under the sampler's precision: bf16 autocast, or fp32 without autocast
            self.vae = load_vae(vae_name, decode_dtype=torch.bfloat16 if precision == "bf16" else None).to(device)
        except NotImplementedError as e:
            parser.error(f"--vae: {e}")
        self.path_type = a.path_type or args.get("path_type") or "linear"
        self.latents_scale = args.get("latents_scale", 0.18215)
        self.latents_bias = args.get("latents_bias", 0.0)
        self.model_name = model_name = a.model or args.get("model") or ("DiT-XL/2" if model.prediction == "epsilon" else "SiT-XL/2")
        self.guided_channels = None if a.guided_channels == "all" else int(a.guided_channels)

        # What defines the samples: a rerun in the same --sample-dir must match all of it to reuse shards.
        settings = self.settings = {
            "ckpt": os.path.abspath(a.ckpt), "ckpt_bytes": os.path.getsize(a.ckpt),
            # a checkpoint retrained at the same path is another run: its mtime tells
            "ckpt_mtime_ns": os.stat(a.ckpt).st_mtime_ns, "weights": weights,
            "model": model_name,
            "model_overrides": {k: v for k, v in overrides.items() if v is not None and k != "kernels"},
            "latent_size": model.latent_shape[-1], "vae": vae_name, "latents_scale": self.latents_scale,
            "latents_bias": self.latents_bias, "mode": self.mode, "num_steps": self.num_steps, "heun": a.heun,
            "cfg_scale": a.cfg_scale, "guidance_low": a.guidance_low, "guidance_high": a.guidance_high,
            "path_type": self.path_type, "global_seed": a.global_seed, "num_fid_samples": a.num_fid_samples,
            "per_proc_batch_size": a.per_proc_batch_size, "precision": precision,
            # what else changes the numbers: the fused-op implementation, the compiled kernels, TF32 (CUDA only)
            "kernels": kernels, "compile": _compile_numerics(compile_mode),
            "tf32": a.tf32 if device.type == "cuda" else None,
        }
        if self.mode == "sde":  # each sample's SDE noise is its own stream: independent of the batch size
            settings["sde_noise"] = "per-sample"
        if self.mode == "ddpm":
            settings["guided_channels"] = a.guided_channels
        if model.cls_token_dim:  # REG: the class token is sampled alongside, under its own guidance scale
            settings["cls_cfg_scale"] = a.cls_cfg_scale
        if precision == "fp32" and hasattr(self.vae, "decode_dtype"):  # the SD-VAE decodes in fp32 too
            settings["vae_decode"] = "fp32"
        self.shard_dir = shard_dir = os.path.join(a.sample_dir, "shards")
        problem = _check_settings(shard_dir, settings, a.overwrite)  # every rank reads the same file
        if problem:
            parser.error(f"--sample-dir: {problem}")
        ckpt_name = os.path.splitext(os.path.basename(a.ckpt))[0]
        name = f"{model_name.replace('/', '-')}-{ckpt_name}-cfg-{a.cfg_scale}-seed-{a.global_seed}-{self.mode}"
        self.npz_path, self.png_dir = os.path.join(a.sample_dir, name + ".npz"), os.path.join(a.sample_dir, name)
        if env.is_main:
            if a.overwrite:  # start afresh: this run's shards, and the outputs the last report names
                _discard_previous(a.sample_dir, shard_dir, self.png_dir)
            os.makedirs(shard_dir, exist_ok=True)
            for f in os.listdir(shard_dir):  # leftovers of a killed run; nobody writes before the barrier
                if ".tmp" in f:
                    os.remove(os.path.join(shard_dir, f))
            write_json(os.path.join(shard_dir, SETTINGS_FILE), settings, indent=2)
        env.barrier()

        # Inception features while sampling (--ref with --stream-features): tagged with the weights' sha256 and
        # the preprocessing (fastrepa.eval.features_id), so features of others are recomputed, never mixed in.
        self.stream = self.inception is not None and a.stream_features
        self.features_id = self.weights_sha = None
        if self.stream:
            from fastrepa.eval import features_id as features_id_of
            from fastrepa.eval import file_sha256
            self.inception_net = self.inception[1].to(device)
            self.weights_sha = file_sha256(self.inception[0])
            self.features_id = features_id_of(self.weights_sha, self.inception_net.preprocess_mode)
        self.denoise = compile_velocity(model, compile_mode) if use_compile else model.denoise
        self.skips0 = cudagraph_skips()
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None

    def features_of(self, images):
        from fastrepa.eval import image_features
        return image_features(self.inception_net, images, self.a.eval_batch_size)

    def step(self, start: int, end: int):
        """Samples start..end-1 sampled, decoded and written as one shard (with PNGs and features as asked)."""
        from fastrepa.generation import sample_batch, write_pngs, write_shard
        a = self.a
        images = sample_batch(self.model, self.vae, start, end, batch_size=a.per_proc_batch_size, mode=self.mode,
                              num_steps=self.num_steps, cfg_scale=a.cfg_scale, guidance_low=a.guidance_low,
                              guidance_high=a.guidance_high, heun=a.heun, path_type=self.path_type,
                              seed=a.global_seed, latents_scale=self.latents_scale, latents_bias=self.latents_bias,
                              device=self.device, velocity=self.denoise, autocast_dtype=self.autocast_dtype,
                              guided_channels=self.guided_channels, cls_cfg_scale=a.cls_cfg_scale).numpy()
        if a.png:
            write_pngs(images, start, self.png_dir)
        feats = self.features_of(images) if self.stream else None
        write_shard(self.shard_dir, start, end, images, feats, self.features_id)  # images and features: one file

    def backfill(self, mine, done) -> int | None:
        """Shards made by an earlier run without --png or --ref (or with another Inception or preprocessing):
        add what is missing from the images on disk; features are added by rewriting the shard atomically.
        Returns how many shards got features, or None after printing an error (a damaged shard)."""
        from fastrepa.generation import read_shard, shard_features_id, write_pngs, write_shard
        a, backfilled = self.a, 0
        for start, end in mine:
            if (start, end) not in done:
                continue
            path = done[(start, end)]
            need_png = a.png and not all(os.path.isfile(os.path.join(self.png_dir, f"{i:06d}.png"))
                                         for i in range(start, end))
            need_features = self.stream and shard_features_id(path) != self.features_id
            if need_png or need_features:
                try:
                    images = read_shard(path, start, end)
                except ValueError as e:
                    print(f"error: {e}", file=sys.stderr, flush=True)
                    return None
                if need_png:
                    write_pngs(images, start, self.png_dir)
                if need_features:
                    write_shard(self.shard_dir, start, end, images, self.features_of(images), self.features_id)
                    backfilled += 1
        return backfilled

    def fit(self) -> int:
        from tqdm import tqdm

        from fastrepa.generation import ProgressLog, batch_plan, list_shards, rank_batches
        a, env, shard_dir = self.a, self.env, self.shard_dir
        plan = batch_plan(a.num_fid_samples, a.per_proc_batch_size)
        done = list_shards(shard_dir)
        mine = rank_batches(plan, env.rank, env.world_size)
        todo = [b for b in mine if b not in done]
        n_done = sum(e - s for s, e in plan if (s, e) in done)
        if env.is_main and n_done:
            print(f"resuming: {n_done} of {a.num_fid_samples} samples already in {shard_dir}", flush=True)
        # rank 0 shows the bar even when stderr is not a terminal, and logs a plain line every 10% (nohup, slurm)
        bar = tqdm(total=a.num_fid_samples, initial=n_done, desc=f"sampling ({env.world_size} proc)", unit="img",
                   disable=not env.is_main, dynamic_ncols=True)
        log = ProgressLog(a.num_fid_samples, n_done)

        def show_progress(done):
            bar.n = done
            bar.refresh()
            line = log.update(done)
            if line:
                bar.write(line)

        t_sample = time.time()
        for start, end in todo:
            self.step(start, end)
            if env.is_main:  # global progress: count every process's shards on disk
                show_progress(sum(e - s for s, e in list_shards(shard_dir)))
        backfilled = self.backfill(mine, done)
        if backfilled is None:
            return 2
        sample_seconds = time.time() - t_sample
        env.barrier()
        if env.is_main:
            show_progress(a.num_fid_samples)
        bar.close()
        if not env.is_main:
            return 0
        return self.finish(plan, n_done, sample_seconds, backfilled)

    def finish(self, plan, n_done: int, sample_seconds: float, backfilled: int) -> int:
        """Rank 0: the assembled .npz, the metrics (with --ref) and generate.json."""
        import torch

        from fastrepa.generation import assemble_features, assemble_shards, cudagraph_skips, write_npz
        a, env, inception = self.a, self.env, self.inception
        try:
            arr = assemble_shards(self.shard_dir, plan)
            acts = assemble_features(self.shard_dir, plan, self.features_id) if self.stream else None
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        write_npz(arr, self.npz_path)
        report = {
            "samples": os.path.abspath(self.npz_path), "num_samples": int(arr.shape[0]),
            "image_shape": list(arr.shape[1:]), "png_dir": os.path.abspath(self.png_dir) if a.png else None,
            "settings": {**self.settings, "world_size": env.world_size, "device": str(self.device),
                         "compile_mode": self.compile_mode, "kernels_flag": a.kernels, "tf32_flag": a.tf32,
                         "stream_features": self.stream,
                         "inception_preprocess": inception[1].preprocess_mode if inception else None,
                         "vae_decode": ("bf16" if getattr(self.vae, "decode_autocast_dtype", None) == torch.bfloat16
                                        else "fp32"),
                         "torch": torch.__version__},
            # reduce-overhead: graphs rank 0 ran without CUDA graphs (0 = every graph captured)
            "cudagraph_skips_rank0": (cudagraph_skips() - self.skips0 if self.compile_mode == "reduce-overhead"
                                      else None),
            "timing": {"sample_seconds_rank0": round(sample_seconds, 3),
                       "new_samples": a.num_fid_samples - n_done, "resumed_samples": n_done,
                       "features_added_to_shards_rank0": backfilled},
        }
        print(f"wrote {arr.shape[0]} samples to {self.npz_path}" + (f" and {self.png_dir}/" if a.png else ""),
              flush=True)
        if a.ref is not None:
            from fastrepa.eval import EvalInputError, ReferenceFile
            from fastrepa.eval.cli import METRIC_KEYS, evaluate
            from fastrepa.eval.cli import main as eval_main
            try:
                if self.stream:  # the features of the shards, gathered in index order: no image is read again
                    ref = ReferenceFile(a.ref, center_crop=arr.shape[1] if a.ref_center_crop else None)
                    ev = evaluate(acts, ref, self.inception_net, inception[0], samples=self.npz_path,
                                  sample_shape=arr.shape[1:], weights_sha256=self.weights_sha,
                                  batch_size=a.eval_batch_size, device=str(self.device), fd_method=a.fd_method,
                                  sample_features=f"computed while sampling by {env.world_size} process(es), read "
                                                  f"from the shards")
                else:
                    ev = eval_main([self.npz_path, "--ref", a.ref, "--inception", inception[0], "--batch-size",
                                    str(a.eval_batch_size), "--device", str(self.device), "--fd-method", a.fd_method,
                                    "--inception-preprocess", inception[1].preprocess_mode]
                                   + (["--ref-center-crop"] if a.ref_center_crop else []))
            except EvalInputError as e:  # e.g. an unreadable image in a --ref folder; the samples are written
                print(f"error: --ref: {e}", file=sys.stderr, flush=True)
                return 2
            report["metrics"] = {k: ev[k] for k in METRIC_KEYS}
            report["eval"] = {"settings": ev["settings"], "notes": ev["notes"]}
        report["timing"]["total_seconds"] = round(time.time() - self.t0, 3)
        report_path = os.path.join(a.sample_dir, "generate.json")
        write_json(report_path, report, indent=2)
        print(f"wrote {report_path}", flush=True)
        return 0


if __name__ == "__main__":
    from fastrepa.distributed import exit_process
    exit_process(main())
