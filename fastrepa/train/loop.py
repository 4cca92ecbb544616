"""The single-process training loop: REPA objective, AdamW, EMA, grad clipping, official checkpoints.

Progress is counted in steps of the global batch; every random draw of a step comes from a
generator seeded by (seed, rank, step) and the data order is a pure function of (seed, step), so
`--resume-step S` continues exactly where the run that wrote step S was.
"""
import json
import os
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm

from fastrepa.attention import check_backend
from fastrepa.checkpoint import cpu_state_dict, load_checkpoint_file, load_weights, save_checkpoint_file
from fastrepa.config import TrainConfig, to_flat
from fastrepa.data import REPAFolderDataset, StepSampler, build_loader
from fastrepa.encoders import load_encoder
from fastrepa.kernels import check_impl
from fastrepa.models import build_model, model_kwargs
from fastrepa.objectives import repa_loss, total_loss
from fastrepa.sampling import euler_sampler
from fastrepa.train.ema import make_ema, update_ema
from fastrepa.train.rng import step_generator
from fastrepa.vae import decode_to_uint8, load_vae, save_grid

AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteError(RuntimeError):
    pass


def checkpoint_path(cfg: TrainConfig, step: int) -> str:
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


def sample_grid(ema, vae, cfg: TrainConfig, device, path: str, n: int = 16) -> None:
    """A grid from the EMA model in eval mode with a fixed generator (the same noise every time)."""
    g = torch.Generator().manual_seed(cfg.seed)
    size, ch = ema.x_embedder.grid_size * ema.patch_size, ema.in_channels
    z = torch.randn(n, ch, size, size, generator=g).to(device)
    y = (torch.arange(n) % ema.num_classes).to(device)
    x = euler_sampler(ema.velocity, z, y, num_steps=cfg.sample_num_steps, cfg_scale=cfg.sample_cfg_scale,
                      path_type=cfg.objective.path_type, null_class=ema.num_classes)
    save_grid(decode_to_uint8(vae, x.float(), cfg.data.latents_scale, cfg.data.latents_bias), path,
              nrow=min(n, ema.num_classes))


def train(cfg: TrainConfig) -> dict:
    """Train as configured; returns (and writes) the run report."""
    t_start = time.time()
    exp_dir = os.path.join(cfg.output_dir, cfg.exp_name)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)

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
    sampler = StepSampler(len(dataset), cfg.batch_size, cfg.seed, start_step=cfg.resume_step,
                          num_steps=max(cfg.max_train_steps - cfg.resume_step, 0))
    vae = load_vae(cfg.data.vae).to(device)

    ema = make_ema(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.learning_rate,
                            betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2),
                            weight_decay=cfg.optim.adam_weight_decay, eps=cfg.optim.adam_epsilon,
                            fused=device.type == "cuda")
    step = 0
    if cfg.resume_step:
        path = checkpoint_path(cfg, cfg.resume_step)
        ckpt = load_checkpoint_file(path)
        load_weights(model, ckpt["model"], source=f"{path} [model]")
        load_weights(ema, ckpt["ema"], source=f"{path} [ema]")
        opt.load_state_dict(ckpt["opt"])
        step = int(ckpt["steps"])
        if step != cfg.resume_step:
            raise ValueError(f"checkpoint {path} is of step {step}, not --resume-step={cfg.resume_step}")
    steps_per_epoch = sampler.steps_per_epoch
    max_steps = min(cfg.max_train_steps, cfg.epochs * steps_per_epoch)

    os.makedirs(os.path.join(exp_dir, "checkpoints"), exist_ok=True)
    os.makedirs(os.path.join(exp_dir, "samples"), exist_ok=True)
    with open(os.path.join(exp_dir, "config.json"), "w") as f:
        json.dump(to_flat(cfg), f, indent=2)

    use_amp = device.type == "cuda" and cfg.mixed_precision in AUTOCAST
    autocast = (torch.autocast("cuda", dtype=AUTOCAST[cfg.mixed_precision]) if use_amp else nullcontext())
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and cfg.mixed_precision == "fp16")
    accum = cfg.gradient_accumulation_steps
    params = [p for p in model.parameters() if p.requires_grad]
    loader = build_loader(dataset, sampler, cfg.data.num_workers, pin_memory=device.type == "cuda")
    metrics_file = open(os.path.join(exp_dir, "metrics.jsonl"), "a")
    history, last_ckpt, last_grid = [], None, None
    def new_window():
        return {"loss": 0.0, "proj_loss": 0.0, "grad_norm": 0.0, "n": 0, "t": time.time(), "images": 0}

    window = new_window()

    def save(step_now: int):
        path = checkpoint_path(cfg, step_now)
        save_checkpoint_file(path, {"model": cpu_state_dict(model), "ema": cpu_state_dict(ema),
                                    "opt": opt.state_dict(), "args": to_flat(cfg), "steps": step_now})
        return path

    def grid(step_now: int):
        path = os.path.join(exp_dir, "samples", f"{step_now:07d}.png")
        sample_grid(ema, vae, cfg, device, path)
        return path

    model.train()
    bar = tqdm(total=max_steps, initial=step, desc=cfg.exp_name, dynamic_ncols=True, disable=None)
    t_train = time.time()
    images_trained = 0
    for raw, moments, labels in loader:
        if step >= max_steps:
            break
        g = step_generator(cfg.seed, 0, step)
        raw, moments, labels = (t.to(device, non_blocking=True) for t in (raw, moments, labels))
        with torch.no_grad():
            zs_all = [enc(raw) for enc in encoders]
        mean, std = moments.chunk(2, dim=1)
        x_all = (mean + std * torch.randn(mean.shape, generator=g).to(device)) * cfg.data.latents_scale \
            + cfg.data.latents_bias
        loss_sum = denoise_sum = proj_sum = torch.zeros((), device=device)
        for k in range(accum):
            part = slice(k * x_all.shape[0] // accum, (k + 1) * x_all.shape[0] // accum)
            with autocast:
                denoise, proj = repa_loss(model, x_all[part], labels[part], [z[part] for z in zs_all],
                                          path_type=cfg.objective.path_type, prediction=cfg.objective.prediction,
                                          weighting=cfg.objective.weighting, generator=g)
                loss = total_loss(denoise, proj, cfg.objective.proj_coeff)
            scaler.scale(loss / accum).backward()
            loss_sum = loss_sum + loss.detach() / accum
            denoise_sum = denoise_sum + denoise.detach().mean() / accum
            proj_sum = proj_sum + proj.detach() / accum
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        # One host sync per step, and the optimizer never sees a non-finite step.
        if not bool(torch.isfinite(loss_sum) & torch.isfinite(grad_norm)):
            raise NonFiniteError(f"step {step}: loss {float(loss_sum)} / grad norm {float(grad_norm)} is not finite; "
                                 f"the weights were not updated (last checkpoint: {last_ckpt})")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        update_ema(ema, model, cfg.optim.ema_decay)
        step += 1
        images_trained += cfg.batch_size

        window["loss"] += denoise_sum  # as official REPA logs it: the denoising loss alone
        window["proj_loss"] += proj_sum
        window["grad_norm"] += grad_norm.detach()
        window["n"] += 1
        window["images"] += cfg.batch_size
        bar.update(1)
        if step % cfg.log_every == 0 or step == max_steps:
            dt = time.time() - window["t"]
            row = {"step": step, "images": step * cfg.batch_size, "loss": float(window["loss"]) / window["n"],
                   "proj_loss": float(window["proj_loss"]) / window["n"],
                   "grad_norm": float(window["grad_norm"]) / window["n"],
                   "lr": opt.param_groups[0]["lr"], "images_per_s": window["images"] / max(dt, 1e-9)}
            history.append(row)
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            bar.set_postfix(loss=f"{row['loss']:.4f}", proj=f"{row['proj_loss']:.4f}",
                            img_s=f"{row['images_per_s']:.0f}")
            window = new_window()
        if step % cfg.checkpointing_steps == 0 or step == max_steps:
            last_ckpt = save(step)
        if step % cfg.sampling_steps == 0 or step == max_steps:
            last_grid = grid(step)
    bar.close()
    metrics_file.close()
    train_time = time.time() - t_train

    report = {
        "exp_dir": exp_dir, "device": str(device), "model": cfg.model.model,
        "params": sum(p.numel() for p in model.parameters()), "encoders": cfg.objective.encoders,
        "steps": step, "batch_size": cfg.batch_size, "images_trained": images_trained,
        "train_seconds": round(train_time, 2), "wall_seconds": round(time.time() - t_start, 2),
        "images_per_s": round(images_trained / max(train_time, 1e-9), 2),
        "first_loss": history[0]["loss"] if history else None, "last_loss": history[-1]["loss"] if history else None,
        "first_proj_loss": history[0]["proj_loss"] if history else None,
        "last_proj_loss": history[-1]["proj_loss"] if history else None,
        "checkpoint": last_ckpt, "sample_grid": last_grid,
    }
    write_report(report, exp_dir)
    return report


def write_report(report: dict, exp_dir: str) -> None:
    with open(os.path.join(exp_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = ["# fastrepa training report", ""] + [f"- {k}: {v}" for k, v in report.items()]
    with open(os.path.join(exp_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
