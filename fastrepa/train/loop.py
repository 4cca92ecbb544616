"""The training loop: one process, DDP or FSDP2 under torchrun; REPA objective, AdamW, EMA, DCP checkpoints.

Progress is counted in images (step x --batch-size; the bar, the metrics and the checkpoints say how many
were seen), in steps of the global batch. Rank r reads its slice of
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
import sys
import time

import torch
from tqdm import tqdm

from fastrepa.attention import check_backend
from fastrepa.config import TrainConfig, to_flat
from fastrepa.data import PackedDataset, StepSampler, build_loader, check_labels, open_dataset
from fastrepa.distributed import setup
from fastrepa.encoders import load_encoders
from fastrepa.kernels import check_impl
from fastrepa.models import build_model, model_kwargs
from fastrepa.objectives.repa import label_dropout_prob
from fastrepa.sampling import euler_sampler
from fastrepa.train import checkpointing as C
from fastrepa.train.ema import make_ema
from fastrepa.train.flops import peak_tflops, train_flops_per_image
from fastrepa.train.parallel import resolve_mode, wrap
from fastrepa.train.report import MetricsLog, dry_run, metrics_line, write_report
from fastrepa.train.rng import draw_step
from fastrepa.train.schedule import lr_at
from fastrepa.train.signals import StopRequest
from fastrepa.train.sinks import check_report_to, open_sinks
from fastrepa.train.step import TEST_NAN_ENV, TrainStep, hook_step
from fastrepa.vae import decode_to_uint8, load_vae, save_grid

TEST_EXIT_ENV = "FASTREPA_TEST_EXIT_AFTER_STEP"  # test hook "k" / "k:r": os._exit(3) after step k (on rank r)
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
            f"latents {dataset.describe(0, 'moments')} have shape {tuple(moments.shape)}; "
            f"the model expects moments [{want[0]}, {want[1]}, {want[1]}] (2 x --in-channels, --input-size)")
    if encoders and tuple(image.shape[-2:]) != (cfg.data.resolution, cfg.data.resolution):
        raise ValueError(f"image {dataset.describe(0, 'image')} is {tuple(image.shape[-2:])}; "
                         f"--resolution is {cfg.data.resolution}")


def check_resume_matches(extra: dict, cfg: TrainConfig, num_items: int, path: str) -> None:
    """A checkpoint resumes exactly only with the same data order and draws: the same --seed, --batch-size
    and dataset size. Anything else is refused (naming the flag) instead of silently continuing another run."""
    saved = {"seed": extra.get("seed"), "num_items": extra.get("num_items"),
             "batch_size": extra.get("batch_size", (extra.get("config") or {}).get("batch_size"))}
    now = {"seed": cfg.seed, "batch_size": cfg.batch_size, "num_items": num_items}
    what = {"seed": "--seed", "batch_size": "--batch-size",
            "num_items": f"the number of samples in --data-dir {cfg.data.data_dir}"}
    for key, value in saved.items():
        if value is not None and value != now[key]:
            raise ValueError(f"cannot resume {path}: it was trained with {what[key]} = {value}, this run has "
                             f"{now[key]}; the data order and random draws would not continue that run. Use the same "
                             f"value, or a new --exp-name / --output-dir to start afresh")


def load_grid_vae(cfg: TrainConfig, latent_channels: int, device: torch.device):
    """The VAE that decodes the sample grids, loaded on rank 0 (the only rank that decodes); a VAE that is
    missing or does not fit the latents fails on every rank at once, before training."""
    box = {}

    def load():
        vae = load_vae(cfg.data.vae)
        channels = getattr(vae, "latent_channels", None)
        if channels is not None and channels != latent_channels:
            raise ValueError(f"--vae {cfg.data.vae} decodes {channels}-channel latents; the latents in --data-dir "
                             f"{cfg.data.data_dir} (and the model) have {latent_channels}")
        box["vae"] = vae.to(device)
    C.on_rank0(load, f"loading --vae {cfg.data.vae}")
    return box.get("vae")


def loader_backend(choice: str, dataset, device: torch.device, data_dir: str = "") -> str:
    """The data loader to use: --data-loader, with auto resolved (DALI only where it pays and exists)."""
    import importlib.util
    packed = isinstance(dataset, PackedDataset)
    if choice == "dali" and not packed:
        raise ValueError(f"--data-loader dali reads packed datasets only; --data-dir {data_dir} is the official "
                         f"layout: pack it with python -m fastrepa.data.pack, or use --data-loader torch")
    if choice == "auto":
        dali = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
        return "dali" if packed and device.type == "cuda" and dali else "torch"
    return choice


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
    env = setup(timeout_s=cfg.dist_timeout)
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
    if device.type == "cuda" and cfg.mixed_precision == "fp16" and mode == "fsdp":
        raise ValueError("--mixed-precision fp16 with --parallel fsdp is not supported: use bf16 (or --parallel ddp)")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank

    # Everything that can be wrong with the inputs is checked before any heavy work.
    check_backend(cfg.model.backend())
    check_impl(cfg.model.kernels, device)
    check_report_to(cfg.report_to)  # every rank: one failing alone would leave the others waiting
    dataset = open_dataset(cfg.data.data_dir)
    check_labels(dataset, cfg.model.num_classes)
    backend = loader_backend(cfg.data.data_loader, dataset, device, cfg.data.data_dir)
    overrides = cfg.model_overrides()
    grid = overrides["input_size"] // model_kwargs(cfg.model.model, **overrides)["patch_size"]
    encoders = ([e.to(device) for e in load_encoders(cfg.objective.enc_type, cfg.objective.enc_path or None,
                                                      resolution=cfg.data.resolution, grid=grid)]
                if cfg.objective.encoders else [])
    model = build_model(cfg.model.model, z_dims=[e.embed_dim for e in encoders], **overrides).to(device)
    check_data_matches(dataset, model, encoders, cfg)
    steps_per_epoch = len(dataset) // cfg.batch_size
    max_steps = min(cfg.max_train_steps, cfg.epochs * max(steps_per_epoch, 1))
    vae = load_grid_vae(cfg, model.in_channels, device)
    drop_prob = label_dropout_prob(model)
    n_params = sum(p.numel() for p in model.parameters())
    flops_per_image = train_flops_per_image(model, cfg.objective.encoders, cfg.data.resolution)
    peak = peak_tflops(device, cfg.peak_tflops)
    if cfg.compile:  # the frozen encoders too (they run every step); in place, keys unchanged
        for enc in encoders:
            enc.compile()

    ema = make_ema(model)
    model, ema = wrap(model, ema, mode, device, bf16=cfg.mixed_precision == "bf16", compile=cfg.compile,
                      activation_checkpointing=cfg.activation_checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.learning_rate,
                            betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2),
                            weight_decay=cfg.optim.adam_weight_decay, eps=cfg.optim.adam_epsilon,
                            fused=device.type == "cuda")
    flat = to_flat(cfg)
    step = skipped = 0
    found = C.resume_point(ckpt_root, cfg.resume_step or None)
    if found is not None:
        extra = C.load(found[1], model=model, ema=ema, optimizer=opt)
        check_resume_matches(extra, cfg, len(dataset), found[1])
        step = int(extra["step"])
        skipped = int(extra.get("nonfinite_skipped", 0))
        if rank0:
            print(f"resuming from {found[1]} (step {step}, {extra.get('images', '?')} images seen)", flush=True)

    if rank0:
        os.makedirs(ckpt_root, exist_ok=True)
        os.makedirs(os.path.join(exp_dir, "samples"), exist_ok=True)
        with open(os.path.join(exp_dir, "config.json"), "w") as f:
            json.dump(flat, f, indent=2)
    log = (MetricsLog(os.path.join(exp_dir, "metrics.jsonl"), resume_step=step, flops_per_image=flops_per_image,
                      peak_flops=peak * 1e12 * world if peak else None, device=device,
                      window=extra.get("metrics_window") if found else None) if rank0 else None)
    sinks = open_sinks(cfg.report_to, exp_dir, flat, cfg.exp_name, cfg.wandb_project, step) if rank0 else None
    env.barrier()

    sampler = StepSampler(len(dataset), cfg.batch_size, cfg.seed, env.rank, world, start_step=step,
                          num_steps=max(max_steps - step, 0))
    local_batch, first = cfg.batch_size // world, env.rank * (cfg.batch_size // world)
    step_fn = TrainStep(model, ema, opt, encoders, objective=cfg.objective, data=cfg.data, device=device,
                        world_size=world, grad_accum=cfg.gradient_accumulation_steps,
                        max_grad_norm=cfg.optim.max_grad_norm, ema_decay=cfg.optim.ema_decay,
                        mixed_precision=cfg.mixed_precision, drop_prob=drop_prob)
    if found is not None and extra.get("grad_scaler"):
        step_fn.scaler.load_state_dict(extra["grad_scaler"])
    loader = build_loader(dataset, sampler, cfg.data.num_workers, pin_memory=device.type == "cuda", backend=backend,
                          device=device)
    last_ckpt, last_grid, stopped = (found[1] if found else None), None, None
    saved_step = found[0] if found else None
    exit_after = hook_step(TEST_EXIT_ENV, env.rank)
    signal_at = int(os.environ.get(TEST_SIGNAL_ENV, "-1"))
    nan_at = hook_step(TEST_NAN_ENV, env.rank)
    start_step = step

    def save(step_now: int) -> str:
        nonlocal saved_step
        saved_step = step_now
        return C.save(ckpt_root, step_now, model=model, ema=ema, optimizer=opt, keep_last=cfg.keep_last,
                      extra={"step": step_now, "images": step_now * cfg.batch_size, "seed": cfg.seed,
                             "batch_size": cfg.batch_size, "num_items": len(dataset),
                             "data": dict(zip(("epoch", "batch_in_epoch"), divmod(step_now, sampler.steps_per_epoch))),
                             "lr": lr(step_now), "world_size": world, "nonfinite_skipped": skipped,
                             "metrics_window": log.window_state() if rank0 else {},
                             "grad_scaler": step_fn.scaler.state_dict(), "config": flat})

    def grid(step_now: int):
        path = os.path.join(exp_dir, "samples", f"{step_now:07d}.png") if rank0 else None
        if rank0 or mode == "fsdp":
            sample_grid(ema, vae, cfg, device, path)
        return path

    def draw(s, latent_shape):  # on the device, copied asynchronously
        return step_fn.to_device(draw_step(cfg.seed, s, first, local_batch, latent_shape,
                                           weighting=cfg.objective.weighting, path_type=cfg.objective.path_type,
                                           drop_prob=drop_prob))

    def lr(s):
        return lr_at(s, cfg.optim.learning_rate, cfg.optim.lr_schedule, cfg.optim.lr_warmup_steps, max_steps)

    pending = {}  # step -> its random draws, made one step ahead
    model.train()
    # in images; on rank 0 also when stderr is a log file (then redrawn once a minute, not 10 times a second)
    bar = tqdm(total=max_steps * cfg.batch_size, initial=step * cfg.batch_size, desc=cfg.exp_name, unit="img",
               unit_scale=True, dynamic_ncols=True, disable=not rank0,
               mininterval=0.1 if sys.stderr.isatty() else 60.0)
    t_train = time.time()
    with StopRequest() as stop:
        for raw, moments, labels in loader:
            if step >= max_steps:
                break
            if rank0 and step == signal_at:
                os.kill(os.getpid(), StopRequest.SIGNALS[0])
            raw, moments, labels = (t.to(device, non_blocking=True) for t in (raw, moments, labels))
            latent_shape = (moments.shape[1] // 2, *moments.shape[2:])
            draws = pending.pop(step, None) or draw(step, latent_shape)

            def draw_next(s=step + 1):
                # The next step's draws (CPU work: ~3 ms for 32 samples at 256px here) are made while the
                # device still runs this step, instead of after the sync where the device would wait.
                pending[s] = draw(s, latent_shape)

            res = step_fn(raw, moments, labels, draws, lr=lr(step), stop_flag=stop.flag, poison=step == nan_at,
                          before_sync=draw_next)
            if not res.finite:
                what = (f"step {step}: loss {float(res.losses[0])} / grad norm {float(res.grad_norm)} is not "
                        f"finite; the weights were not updated")
                if cfg.on_nonfinite == "stop":
                    # The weights, optimizer state and EMA are those after step-1 steps: good ones, saved
                    # (unless that step is saved already) so a fixed rerun resumes right here.
                    if saved_step != step:
                        last_ckpt = save(step)
                    raise NonFiniteError(f"{what}; stopping (--on-nonfinite stop). Last good checkpoint: "
                                         f"{last_ckpt}")
                skipped += 1
                if rank0:
                    tqdm.write(f"{what}; skipped ({skipped} so far, --on-nonfinite skip)")
            step += 1

            if rank0:
                bar.update(cfg.batch_size)
                row = log.add(step, cfg.batch_size, res.losses[1], res.losses[2], res.grad_norm,
                              opt.param_groups[0]["lr"], finite=res.finite,
                              write=step % cfg.log_every == 0 or step == max_steps)
                if row is not None:
                    sinks.log(row)
                    tqdm.write(metrics_line(row), file=sys.stdout)
                    if row["loss"] is not None:
                        bar.set_postfix(loss=f"{row['loss']:.4f}", proj=f"{row['proj_loss']:.4f}")
            if step % cfg.checkpointing_steps == 0 or step == max_steps or res.stop:
                last_ckpt = save(step)
            if res.stop:
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
        "exp_dir": exp_dir, "device": str(device), "world_size": world, "parallel": mode, "data_loader": backend, "model": cfg.model.model,
        "params": n_params, "encoders": cfg.objective.encoders, "resumed_from": found[0] if found else None,
        "steps": step, "batch_size": cfg.batch_size, "images_trained": images_trained,
        "train_seconds": round(train_time, 2), "wall_seconds": round(time.time() - t_start, 2),
        "images_per_s": round(images_trained / max(train_time, 1e-9), 2), "stopped_by": stopped,
        "nonfinite_skipped": skipped, "train_flop_per_image": int(flops_per_image),
        "peak_tflops_per_device": peak,
        "mfu": (float(f"{images_trained / max(train_time, 1e-9) * flops_per_image / (peak * 1e12 * world):.4g}")
                if peak else None), "metrics_sinks": sinks.names if rank0 else None,
        **(log.summary() if rank0 else {}), "checkpoint": checkpoint, "sample_grid": last_grid,
    }
    if rank0:
        log.close()
        sinks.close()
        write_report(report, exp_dir)
    env.barrier()
    return report
