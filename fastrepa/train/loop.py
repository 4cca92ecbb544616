"""The training loop: one process, DDP or FSDP2 under torchrun; REPA objective, AdamW, EMA, DCP checkpoints.

Progress is counted in steps of the global batch (images = step x --batch-size). Rank r reads its slice of
the global batch (StepSampler) and every random draw of a sample comes from a generator seeded by
(seed, step, index of the sample in the global batch) (fastrepa.train.rng), so the loss sequence does not
depend on the number of processes, and a run resumed from a checkpoint repeats the uninterrupted run bit
for bit. Checkpoints are DCP directories (fastrepa.train.checkpointing) under OUTPUT_DIR/EXP_NAME/
checkpoints/; a run started where one exists continues from the newest complete one. At the end the
official REPA `.pt` and the EMA safetensors are exported beside them.

One host sync per step: the loss statistics and the stop request (SIGTERM / SIGINT) go through one
all-reduce, the grad norm is global (fastrepa.train.parallel.clip_grad_norm), and a single `.tolist()`
decides, identically on every rank, whether the step is finite and whether to stop after it.
"""
import json
import os
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm

from fastrepa.attention import check_backend
from fastrepa.config import TrainConfig, to_flat
from fastrepa.data import REPAFolderDataset, StepSampler, build_loader
from fastrepa.distributed import setup
from fastrepa.encoders import load_encoder
from fastrepa.kernels import check_impl
from fastrepa.models import build_model, model_kwargs
from fastrepa.objectives import repa_loss, total_loss
from fastrepa.objectives.repa import label_dropout_prob
from fastrepa.sampling import euler_sampler
from fastrepa.train import checkpointing as C
from fastrepa.train.ema import make_ema, update_ema
from fastrepa.train.parallel import all_reduce_sum, clip_grad_norm, resolve_mode, wrap
from fastrepa.train.report import MetricsLog, dry_run, write_report
from fastrepa.train.rng import draw_step
from fastrepa.train.signals import StopRequest
from fastrepa.vae import decode_to_uint8, load_vae, save_grid

AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
TEST_EXIT_ENV = "FASTREPA_TEST_EXIT_AFTER_STEP"  # test hook: os._exit(3) on every rank after step k
TEST_SIGNAL_ENV = "FASTREPA_TEST_SIGTERM_AT_STEP"  # test hook: rank 0 sends itself SIGTERM during step k+1


class NonFiniteError(RuntimeError):
    pass


def checkpoint_path(cfg: TrainConfig, step: int) -> str:
    """The official REPA .pt exported at the end of training."""
    return os.path.join(cfg.output_dir, cfg.exp_name, "checkpoints", f"{step:07d}.pt")


def check_data_matches(dataset, model, encoders, cfg: TrainConfig) -> None:
    """Fail before training when the latents or images do not fit the model or the encoders."""
    image, moments, _ = dataset[0]
    want = (2 * model.in_channels, model.x_embedder.grid_size * model.patch_size)
    if moments.shape[0] != want[0] or moments.shape[-1] != want[1] or moments.shape[-2] != want[1]:
        raise ValueError(
            f"latent file {dataset.feature_fnames[0]} in {dataset.features_dir} has shape {tuple(moments.shape)}; "
            f"the model expects moments [{want[0]}, {want[1]}, {want[1]}] (2 x --in-channels, --input-size)")
    if encoders and tuple(image.shape[-2:]) != (cfg.data.resolution, cfg.data.resolution):
        raise ValueError(f"image {dataset.image_fnames[0]} in {dataset.images_dir} is {tuple(image.shape[-2:])}; "
                         f"--resolution is {cfg.data.resolution}")


def sample_grid(ema, vae, cfg: TrainConfig, device, path: str | None, n: int = 16) -> None:
    """A grid from the EMA model in eval mode with a fixed generator (the same noise every time).
    Under FSDP2 every rank runs the sampler (the EMA is sharded); only the caller with a `path` writes."""
    g = torch.Generator().manual_seed(cfg.seed)
    size, ch = ema.x_embedder.grid_size * ema.patch_size, ema.in_channels
    z = torch.randn(n, ch, size, size, generator=g).to(device)
    y = (torch.arange(n) % ema.num_classes).to(device)
    x = euler_sampler(ema.velocity, z, y, num_steps=cfg.sample_num_steps, cfg_scale=cfg.sample_cfg_scale,
                      path_type=cfg.objective.path_type, null_class=ema.num_classes)
    if path is not None:
        save_grid(decode_to_uint8(vae, x.float(), cfg.data.latents_scale, cfg.data.latents_bias), path,
                  nrow=min(n, ema.num_classes))


def train(cfg: TrainConfig) -> dict:
    """Train as configured; returns (and, on rank 0, writes) the run report. Under torchrun every rank
    calls it; the process group is created here (fastrepa.distributed.setup) when it does not exist."""
    if cfg.dry_run:
        return dry_run(cfg)
    t_start = time.time()
    env = setup()
    rank0, world = env.is_main, env.world_size
    mode = resolve_mode(cfg.parallel, world)
    exp_dir = os.path.join(cfg.output_dir, cfg.exp_name)
    ckpt_root = os.path.join(exp_dir, "checkpoints")
    device = env.device
    if device.type == "cuda" and cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.batch_size % (world * cfg.gradient_accumulation_steps):
        raise ValueError(f"--batch-size={cfg.batch_size}: expected a multiple of the {world} processes x "
                         f"--gradient-accumulation-steps={cfg.gradient_accumulation_steps}")
    use_amp = device.type == "cuda" and cfg.mixed_precision in AUTOCAST
    if use_amp and cfg.mixed_precision == "fp16" and mode == "fsdp":
        raise ValueError("--mixed-precision fp16 with --parallel fsdp is not supported: use bf16 (or --parallel ddp)")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank

    # Everything that can be wrong with the inputs is checked before any heavy work.
    check_backend(cfg.model.backend())
    check_impl(cfg.model.kernels, device)
    dataset = REPAFolderDataset(cfg.data.data_dir)
    overrides = cfg.model_overrides()
    grid = overrides["input_size"] // model_kwargs(cfg.model.model, **overrides)["patch_size"]
    encoders = [load_encoder(e, resolution=cfg.data.resolution, grid=grid).to(device)
                for e in cfg.objective.encoders]
    model = build_model(cfg.model.model, z_dims=[e.embed_dim for e in encoders], **overrides).to(device)
    check_data_matches(dataset, model, encoders, cfg)
    steps_per_epoch = len(dataset) // cfg.batch_size
    max_steps = min(cfg.max_train_steps, cfg.epochs * max(steps_per_epoch, 1))
    vae = load_vae(cfg.data.vae).to(device) if rank0 else None
    drop_prob = label_dropout_prob(model)
    n_params = sum(p.numel() for p in model.parameters())

    ema = make_ema(model)
    model, ema = wrap(model, ema, mode, device, bf16=cfg.mixed_precision == "bf16", compile=cfg.compile,
                      activation_checkpointing=cfg.activation_checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.learning_rate,
                            betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2),
                            weight_decay=cfg.optim.adam_weight_decay, eps=cfg.optim.adam_epsilon,
                            fused=device.type == "cuda")
    flat = to_flat(cfg)
    step = 0
    found = C.resume_point(ckpt_root, cfg.resume_step or None)
    if found is not None:
        extra = C.load(found[1], model=model, ema=ema, optimizer=opt)
        step = int(extra["step"])
        if rank0:
            print(f"resuming from {found[1]} (step {step}, {extra.get('images', '?')} images seen)", flush=True)

    if rank0:
        os.makedirs(ckpt_root, exist_ok=True)
        os.makedirs(os.path.join(exp_dir, "samples"), exist_ok=True)
        with open(os.path.join(exp_dir, "config.json"), "w") as f:
            json.dump(flat, f, indent=2)
    log = MetricsLog(os.path.join(exp_dir, "metrics.jsonl"), resume_step=step) if rank0 else None
    env.barrier()

    sampler = StepSampler(len(dataset), cfg.batch_size, cfg.seed, env.rank, world, start_step=step,
                          num_steps=max(max_steps - step, 0))
    local_batch, first = cfg.batch_size // world, env.rank * (cfg.batch_size // world)
    autocast = (torch.autocast("cuda", dtype=AUTOCAST[cfg.mixed_precision]) if use_amp else nullcontext())
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and cfg.mixed_precision == "fp16")
    accum = cfg.gradient_accumulation_steps
    params = [p for p in model.parameters() if p.requires_grad]
    loader = build_loader(dataset, sampler, cfg.data.num_workers, pin_memory=device.type == "cuda")
    last_ckpt, last_grid, stopped = (found[1] if found else None), None, None
    exit_after = int(os.environ.get(TEST_EXIT_ENV, "-1"))
    signal_at = int(os.environ.get(TEST_SIGNAL_ENV, "-1"))
    start_step = step

    def save(step_now: int) -> str:
        return C.save(ckpt_root, step_now, model=model, ema=ema, optimizer=opt, keep_last=cfg.keep_last,
                      extra={"step": step_now, "images": step_now * cfg.batch_size, "seed": cfg.seed,
                             "world_size": world, "config": flat})

    def grid(step_now: int):
        path = os.path.join(exp_dir, "samples", f"{step_now:07d}.png") if rank0 else None
        if rank0 or mode == "fsdp":
            sample_grid(ema, vae, cfg, device, path)
        return path

    def draw(s, latent_shape):
        return draw_step(cfg.seed, s, first, local_batch, latent_shape, weighting=cfg.objective.weighting,
                         path_type=cfg.objective.path_type, drop_prob=drop_prob)

    pending = {}  # step -> its random draws, made one step ahead
    model.train()
    bar = tqdm(total=max_steps, initial=step, desc=cfg.exp_name, dynamic_ncols=True, disable=None if rank0 else True)
    t_train = time.time()
    with StopRequest() as stop:
        for raw, moments, labels in loader:
            if step >= max_steps:
                break
            if rank0 and step == signal_at:
                os.kill(os.getpid(), StopRequest.SIGNALS[0])
            raw, moments, labels = (t.to(device, non_blocking=True) for t in (raw, moments, labels))
            with torch.no_grad():
                zs_all = [enc(raw) for enc in encoders]
            mean, std = moments.chunk(2, dim=1)
            latent_shape = tuple(mean.shape[1:])
            eps, t_all, noise_all, drop_all = pending.pop(step, None) or draw(step, latent_shape)
            x_all = (mean + std * eps.to(device, mean.dtype)) * cfg.data.latents_scale + cfg.data.latents_bias
            loss_sum = denoise_sum = proj_sum = torch.zeros((), device=device)
            for k in range(accum):
                part = slice(k * local_batch // accum, (k + 1) * local_batch // accum)
                with autocast:
                    denoise, proj = repa_loss(
                        model, x_all[part], labels[part], [z[part] for z in zs_all], time=t_all[part],
                        noise=noise_all[part], force_drop_ids=drop_all[part].to(device) if drop_prob > 0 else None,
                        path_type=cfg.objective.path_type, prediction=cfg.objective.prediction,
                        weighting=cfg.objective.weighting)
                    loss = total_loss(denoise, proj, cfg.objective.proj_coeff)
                scaler.scale(loss / accum).backward()
                loss_sum = loss_sum + loss.detach() / accum
                denoise_sum = denoise_sum + denoise.detach().mean() / accum
                proj_sum = proj_sum + proj.detach() / accum
            # One all-reduce: the mean losses over the ranks and the stop request (any rank's signal).
            stats = torch.stack([loss_sum, denoise_sum, proj_sum,
                                 torch.tensor(float(stop.flag), device=device)]).float()
            stats = all_reduce_sum(stats)
            losses = stats[:3] / world
            scaler.unscale_(opt)
            grad_norm = clip_grad_norm(params, cfg.optim.max_grad_norm)
            # The next step's draws (CPU work: ~3 ms for 32 samples at 256px here) are made now, while
            # the device still runs this step, instead of after the sync where the device would wait.
            pending[step + 1] = draw(step + 1, latent_shape)
            # The one host sync: the same two booleans on every rank.
            ok, stop_now = torch.stack([torch.isfinite(losses[0]) & torch.isfinite(grad_norm),
                                        stats[3] > 0]).tolist()
            if not ok:
                raise NonFiniteError(f"step {step}: loss {float(losses[0])} / grad norm {float(grad_norm)} is not "
                                     f"finite; the weights were not updated (last checkpoint: {last_ckpt})")
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            update_ema(ema, model, cfg.optim.ema_decay)
            step += 1

            if rank0:
                bar.update(1)
                row = log.add(step, cfg.batch_size, losses[1], losses[2], grad_norm, opt.param_groups[0]["lr"],
                              write=step % cfg.log_every == 0 or step == max_steps or stop_now)
                if row is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", proj=f"{row['proj_loss']:.4f}",
                                    img_s=f"{row['images_per_s']:.0f}")
            if step % cfg.checkpointing_steps == 0 or step == max_steps or stop_now:
                last_ckpt = save(step)
            if stop_now:
                stopped = stop.name
                if rank0:
                    print(f"\n{stopped}: stopped after step {step}; checkpoint {last_ckpt}", flush=True)
                break
            if step % cfg.sampling_steps == 0 or step == max_steps:
                last_grid = grid(step)
            if step == exit_after:
                os._exit(3)
    bar.close()
    train_time = time.time() - t_train

    checkpoint = last_ckpt
    if stopped is None:  # the end of training: the official .pt and the EMA safetensors
        checkpoint = C.export_official_pt(model=model, ema=ema, optimizer=opt, out_file=checkpoint_path(cfg, step),
                                          args=flat, steps=step)
        C.export_ema_safetensors(ema, os.path.join(ckpt_root, f"ema-{step:07d}.safetensors"), config=flat)
    images_trained = (step - start_step) * cfg.batch_size
    report = {
        "exp_dir": exp_dir, "device": str(device), "world_size": world, "parallel": mode, "model": cfg.model.model,
        "params": n_params, "encoders": cfg.objective.encoders, "resumed_from": found[0] if found else None,
        "steps": step, "batch_size": cfg.batch_size, "images_trained": images_trained,
        "train_seconds": round(train_time, 2), "wall_seconds": round(time.time() - t_start, 2),
        "images_per_s": round(images_trained / max(train_time, 1e-9), 2), "stopped_by": stopped,
        **(log.summary() if rank0 else {}), "checkpoint": checkpoint, "sample_grid": last_grid,
    }
    if rank0:
        log.close()
        write_report(report, exp_dir)
    env.barrier()
    return report
