"""The training loop: one process, DDP or FSDP2 under torchrun; any method (fastrepa.objectives) on any
backbone family (fastrepa.models), AdamW, EMA, DCP checkpoints.

    report = Trainer(cfg).fit()          # = train(cfg); Trainer(cfg).build() sets everything up

`Trainer.build` checks the inputs and builds the data, encoders, model, objective, EMA, wrapping, optimizer,
and resumes; `Trainer.step(batch)` runs one optimizer step with its bookkeeping (draws, non-finite policy,
metrics, checkpoints, grids); `Trainer.fit` loops over the data and writes the exports and the report. The
checkpoint state is one dict of named parts (`Trainer.state`): the modules and the optimizer (DCP) and
plain-JSON train and objective state, so a method that adds state adds a key.

Progress is counted in images (step x --batch-size; the bar, the metrics and the checkpoints say how many
were seen), in steps of the global batch. Rank r reads its slice of
the global batch (StepSampler) and every random draw of a sample comes from a generator seeded by
(seed, step, index of the sample in the global batch) (fastrepa.rng), so the loss sequence does not
depend on the number of processes, and a run resumed from a checkpoint repeats the uninterrupted run bit
for bit. Checkpoints are DCP directories (fastrepa.train.dcp) under OUTPUT_DIR/EXP_NAME/
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
from fastrepa.data import PackedDataset, StepSampler, build_loader, open_training_data
from fastrepa.distributed import setup
from fastrepa.encoders import load_encoders
from fastrepa.kernels import check_impl
from fastrepa.models import build_model, model_kwargs
from fastrepa.objectives import StepContext, build_objective, method_model_options
from fastrepa.train import dcp
from fastrepa.train.ema import make_ema, reset_ema
from fastrepa.train.flops import peak_tflops
from fastrepa.train.parallel import reshard, resolve_mode, wrap
from fastrepa.train.report import MetricsLog, dry_run, metrics_line, write_report
from fastrepa.rng import draw_step
from fastrepa.train.schedule import lr_at
from fastrepa.train.signals import StopRequest
from fastrepa.train.sinks import check_report_to, open_sinks
from fastrepa.train.step import TrainStep
from fastrepa.vae import decode_to_uint8, load_vae, save_grid



class NonFiniteError(RuntimeError):
    pass


def checkpoint_path(cfg: TrainConfig, step: int) -> str:
    """The official REPA .pt exported at the end of training."""
    return os.path.join(cfg.output_dir, cfg.exp_name, "checkpoints", f"{step:07d}.pt")


def check_data_matches(dataset, model, encoders, cfg: TrainConfig) -> None:
    """Fail before training when the latents, images or fields do not fit the model or the encoders."""
    item = dataset[0]
    if isinstance(item, dict):  # PDE windows: condition and target frames [F, C, H, W]
        if tuple(item["target"].shape) != tuple(model.latent_shape):
            raise ValueError(f"--data-dir {cfg.data.data_dir} gives windows of {tuple(item['target'].shape)} "
                             f"[frames, variables, H, W] (after --pde-reduce {cfg.data.pde_reduce}); the model takes "
                             f"{tuple(model.latent_shape)}: set --input-size {item['target'].shape[-1]} (or another "
                             f"--pde-reduce) and --num-frames")
        return
    image, moments, _ = item
    channels, size, _ = model.latent_shape
    want = (2 * channels, size)
    if moments.shape[0] != want[0] or moments.shape[-1] != want[1] or moments.shape[-2] != want[1]:
        raise ValueError(
            f"latents {dataset.describe(0, 'moments')} have shape {tuple(moments.shape)}; "
            f"the model expects moments [{want[0]}, {want[1]}, {want[1]}] (2 x --in-channels, --input-size)")
    if encoders and tuple(image.shape[-2:]) != (cfg.data.resolution, cfg.data.resolution):
        raise ValueError(f"image {dataset.describe(0, 'image')} is {tuple(image.shape[-2:])}; "
                         f"--resolution is {cfg.data.resolution}")


def check_resume_matches(extra: dict, cfg: TrainConfig, num_items: int, path: str) -> None:
    """A checkpoint resumes exactly only with the same data order, draws and method: the same --seed,
    --batch-size, dataset size and --method. Anything else is refused (naming the flag) instead of silently
    continuing another run."""
    config = extra.get("config") or {}
    saved = {"seed": extra.get("seed"), "num_items": extra.get("num_items"),
             "batch_size": extra.get("batch_size", config.get("batch_size")),
             "method": extra.get("method", config.get("method", "repa"))}
    now = {"seed": cfg.seed, "batch_size": cfg.batch_size, "num_items": num_items, "method": cfg.objective.method}
    what = {"seed": "--seed", "batch_size": "--batch-size", "method": "--method",
            "num_items": f"the number of samples in --data-dir {cfg.data.data_dir}"}
    for key, value in saved.items():
        if value is not None and value != now[key]:
            raise ValueError(f"cannot resume {path}: it was trained with {what[key]} = {value}, this run has "
                             f"{now[key]}; the data order and random draws would not continue that run. Use the same "
                             f"value, or a new --exp-name / --output-dir to start afresh")


def load_grid_vae(cfg: TrainConfig, latent_channels: int, device: torch.device):
    """The VAE that decodes the sample grids, loaded on rank 0 (the only rank that decodes); a VAE that is
    missing or does not fit the latents fails on every rank at once, before training. None for a model of
    fields (PDE-DiT: its grids are forecast plots)."""
    box = {}
    if is_fields(cfg):
        return None

    def load():
        vae = load_vae(cfg.data.vae)
        channels = getattr(vae, "latent_channels", None)
        if channels is not None and channels != latent_channels:
            raise ValueError(f"--vae {cfg.data.vae} decodes {channels}-channel latents; the latents in --data-dir "
                             f"{cfg.data.data_dir} (and the model) have {latent_channels}")
        box["vae"] = vae.to(device)
    dcp.on_rank0(load, f"loading --vae {cfg.data.vae}")
    return box.get("vae")


def loader_backend(choice: str, dataset, device: torch.device, data_dir: str = "") -> str:
    """The data loader to use: --data-loader, with auto resolved (DALI only where it pays and exists)."""
    packed = isinstance(dataset, PackedDataset)
    if choice == "dali" and not packed:
        raise ValueError(f"--data-loader dali reads packed datasets only; --data-dir {data_dir} is the official "
                         f"layout: pack it with python -m fastrepa.data.pack, or use --data-loader torch")
    if choice == "auto":
        from fastrepa.data.dali import dali_available
        return "dali" if packed and device.type == "cuda" and dali_available() else "torch"
    return choice


def is_fields(cfg: TrainConfig) -> bool:
    return cfg.model.pde


def forecast_grid(ema, dataset, cfg: TrainConfig, device, path: str | None) -> None:
    """The PDE counterpart of a sample grid: the EMA's forecast (--sample-num-steps Euler steps, fixed noise)
    of the first train window, plotted against its truth per variable (fastrepa.eval.pde_forecast)."""
    from fastrepa.eval.pde_forecast import forecast, plot_fields, window_noise
    item = dataset[0]
    cond = item["cond"][None].to(device)
    noise = window_noise(cond.shape[1:], cfg.seed, [0], 0, device)
    pred = forecast(ema, cond, cfg.sample_num_steps, noise)
    if path is not None:
        plot_fields(pred.float().cpu(), item["target"][None], path)


def sample_grid(ema, vae, cfg: TrainConfig, device, path: str | None, n: int = 16) -> None:
    """A grid from the EMA model in eval mode with a fixed generator (the same noise every time), sampled as
    generate.py samples that backbone (SiT: Euler ODE; DiT: DDPM respaced to --sample-num-steps), with CFG
    --sample-cfg-scale. Under FSDP2 every rank runs the sampler (the EMA is sharded); only the caller with a
    `path` writes."""
    from fastrepa.generation import default_mode, initial_noise, sample_latents
    noise = initial_noise(ema, n, torch.Generator().manual_seed(cfg.seed), device)
    y = (torch.arange(n) % ema.num_classes).to(device)
    x = sample_latents(ema, y=y, mode=default_mode(ema), num_steps=cfg.sample_num_steps,
                       cfg_scale=cfg.sample_cfg_scale, path_type=cfg.objective.path_type, **noise)
    if path is not None:
        save_grid(decode_to_uint8(vae, x.float(), cfg.data.latents_scale, cfg.data.latents_bias), path,
                  nrow=min(n, ema.num_classes))


class Trainer:
    """build / step / fit of one training run (see the module docstring). Under torchrun every rank builds
    and fits; the process group is created in `build` (fastrepa.distributed.setup) when it does not exist."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.built = False

    # ------------------------------------------------------------------------------------------ build

    def build(self) -> "Trainer":
        cfg = self.cfg
        self.t_start = time.time()
        env = self.env = setup(timeout_s=cfg.dist_timeout)
        self.rank0, world = env.is_main, env.world_size
        self.mode = resolve_mode(cfg.parallel, world)
        self.exp_dir = os.path.join(cfg.output_dir, cfg.exp_name)
        self.ckpt_root = os.path.join(self.exp_dir, "checkpoints")
        device = self.device = env.device
        if device.type == "cuda" and cfg.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if cfg.batch_size % (world * cfg.gradient_accumulation_steps):
            raise ValueError(f"--batch-size={cfg.batch_size}: expected a multiple of the {world} processes x "
                             f"--gradient-accumulation-steps={cfg.gradient_accumulation_steps}")
        if device.type == "cuda" and cfg.mixed_precision == "fp16" and self.mode == "fsdp":
            raise ValueError("--mixed-precision fp16 with --parallel fsdp is not supported: use bf16 (or --parallel ddp)")
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank

        # Everything that can be wrong with the inputs is checked before any heavy work.
        check_backend(cfg.model.backend())
        check_impl(cfg.model.kernels, device)
        check_report_to(cfg.report_to)  # every rank: one failing alone would leave the others waiting
        dataset = self.dataset = open_training_data(cfg)
        self.loader_backend = loader_backend(cfg.data.data_loader, dataset, device, cfg.data.data_dir)
        overrides = cfg.model_overrides()
        kw = model_kwargs(cfg.model.model, **overrides, z_dims=[])
        grid = kw["input_size"] // kw["patch_size"]
        if getattr(dataset, "features", None) is not None:  # --feature-cache: the encoder is not loaded
            encoders = [dataset.features.encoder()]
        else:  # building an encoder draws no numbers from the model's init stream (official REPA loads it after)
            with torch.random.fork_rng(devices=[]):
                encoders = ([e.to(device) for e in load_encoders(cfg.objective.enc_type, cfg.objective.enc_path or None,
                                                                  resolution=cfg.data.resolution, grid=grid)]
                            if cfg.objective.encoders else [])
        model = build_model(cfg.model.model, **overrides,
                            **method_model_options(cfg, [e.embed_dim for e in encoders])).to(device)
        check_data_matches(dataset, model, encoders, cfg)
        self.steps_per_epoch = len(dataset) // cfg.batch_size
        self.max_steps = min(cfg.max_train_steps, cfg.epochs * max(self.steps_per_epoch, 1))
        self.vae = load_grid_vae(cfg, model.in_channels, device)
        self.objective = build_objective(cfg, model, encoders)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.flops_per_image = self.objective.train_flops(model)
        self.peak = peak_tflops(device, cfg.peak_tflops)
        if cfg.compile:  # the frozen encoders too (they run every step); in place, keys unchanged
            for enc in encoders:
                if not getattr(enc, "cached", False):
                    enc.compile()

        ema = make_ema(model)
        self.model, self.ema = wrap(model, ema, self.mode, device, bf16=cfg.mixed_precision == "bf16",
                                    compile=cfg.compile, activation_checkpointing=cfg.activation_checkpointing,
                                    compile_ema=self.objective.uses_teacher)
        self.opt = self.new_optimizer()
        self.step_fn = TrainStep(self.model, self.ema, self.opt, self.objective, device=device, world_size=world,
                                 grad_accum=cfg.gradient_accumulation_steps, max_grad_norm=cfg.optim.max_grad_norm,
                                 ema_decay=cfg.optim.ema_decay, mixed_precision=cfg.mixed_precision)
        self.flat = to_flat(cfg)
        self.step_now = self.skipped = 0
        self.resumed, window = self.resume()

        if self.rank0:
            os.makedirs(self.ckpt_root, exist_ok=True)
            os.makedirs(os.path.join(self.exp_dir, "samples"), exist_ok=True)
            with open(os.path.join(self.exp_dir, "config.json"), "w") as f:
                json.dump(self.flat, f, indent=2)
        self.log = (MetricsLog(os.path.join(self.exp_dir, "metrics.jsonl"), resume_step=self.step_now,
                               flops_per_image=self.flops_per_image,
                               peak_flops=self.peak * 1e12 * world if self.peak else None, device=device,
                               window=window, terms=self.objective.terms) if self.rank0 else None)
        self.sinks = (open_sinks(cfg.report_to, self.exp_dir, self.flat, cfg.exp_name, cfg.wandb_project,
                                 self.step_now) if self.rank0 else None)
        env.barrier()

        self.sampler = StepSampler(len(dataset), cfg.batch_size, cfg.seed, env.rank, world, start_step=self.step_now,
                                   num_steps=max(self.max_steps - self.step_now, 0))
        self.local_batch = cfg.batch_size // world
        self.first = env.rank * self.local_batch
        self.loader = build_loader(dataset, self.sampler, cfg.data.num_workers, pin_memory=device.type == "cuda",
                                   backend=self.loader_backend, device=device)
        self.last_ckpt = self.resumed.path if self.resumed else None
        self.saved_step = self.resumed.step if self.resumed else None
        self.last_grid = self.stopped = None
        self.pending = {}  # step -> its random draws, made one step ahead
        self.bar = None  # the progress bar of fit (rank 0)
        self.built = True
        return self

    def new_optimizer(self) -> torch.optim.AdamW:
        o = self.cfg.optim
        return torch.optim.AdamW(self.model.parameters(), lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2),
                                 weight_decay=o.adam_weight_decay, eps=o.adam_epsilon,
                                 fused=self.device.type == "cuda")

    def restart(self) -> None:
        """A method's restart (objective.restart_steps; ERW's end of warmup): a fresh optimizer, EMA = model."""
        self.opt = self.step_fn.optimizer = self.new_optimizer()
        reset_ema(self.ema, self.model)
        if self.rank0:
            tqdm.write(f"step {self.step_now}: {self.objective.name} restarts the optimizer and sets the EMA "
                       f"from the model")

    # ------------------------------------------------------------------------------------------ state

    def train_state(self) -> dict:
        """The plain-JSON train state of the current step (a host sync for the metrics window)."""
        s, cfg = self.step_now, self.cfg
        return {"step": s, "images": s * cfg.batch_size, "seed": cfg.seed, "batch_size": cfg.batch_size,
                "num_items": len(self.dataset), "method": cfg.objective.method,
                "data": dict(zip(("epoch", "batch_in_epoch"), divmod(s, self.sampler.steps_per_epoch))),
                "lr": self.lr(s), "world_size": self.env.world_size, "nonfinite_skipped": self.skipped,
                "metrics_window": self.log.window_state() if self.rank0 else {},
                "grad_scaler": self.step_fn.scaler.state_dict(), "config": self.flat,
                **({"dataset": self.dataset.state_dict()} if hasattr(self.dataset, "state_dict") else {})}

    def state(self) -> dict:
        """The checkpoint state as named parts: modules and optimizer (DCP components), then the plain-JSON
        parts ("objective": the method's own state; "train": the step, data position, metrics window...)."""
        return {"model": self.model, "ema": self.ema, "optim": self.opt,
                "objective": self.objective.state_dict(), "train": self.train_state()}

    def save(self) -> str:
        parts = self.state()
        self.saved_step = self.step_now
        # train_state.json: the train state's keys at its top level, the objective's state under "objective"
        extra = {**parts.pop("train"), "objective": parts.pop("objective")}
        return dcp.save(self.ckpt_root, self.step_now, model=parts.pop("model"), ema=parts.pop("ema"),
                      optimizer=parts.pop("optim"), extra=extra, keep_last=self.cfg.keep_last)

    def resume(self):
        """Load the newest complete checkpoint (or --resume-step's) into every part; returns (the
        dcp.StepCheckpoint or None, the saved metrics window or None)."""
        found = dcp.resume_point(self.ckpt_root, self.cfg.resume_step or None)
        if found is None:
            return None, None
        # the run's identity first (seed, batch, data, method), then the tensors
        meta = dcp.on_rank0(lambda: dcp.read_extra(found.path), f"reading {found.path}")
        if meta.get("dataset") and hasattr(self.dataset, "check_state"):
            self.dataset.check_state(meta["dataset"], found.path)  # a PDE file's split and normaliser, by flag
        check_resume_matches(meta, self.cfg, len(self.dataset), found.path)
        self.objective.load_state_dict(meta.get("objective") or {})  # the method's settings, before any tensor
        extra = dcp.load(found.path, model=self.model, ema=self.ema, optimizer=self.opt)
        self.step_now = int(extra["step"])
        self.skipped = int(extra.get("nonfinite_skipped", 0))
        if extra.get("grad_scaler"):
            self.step_fn.scaler.load_state_dict(extra["grad_scaler"])
        if self.rank0:
            print(f"resuming from {found.path} (step {self.step_now}, {extra.get('images', '?')} images seen)",
                  flush=True)
        return found, extra.get("metrics_window")

    # ------------------------------------------------------------------------------------------ step

    def lr(self, s: int) -> float:
        o = self.cfg.optim
        return lr_at(s, o.learning_rate, o.lr_schedule, o.lr_warmup_steps, self.max_steps)

    def draw(self, s: int) -> dict:
        """Step s's random draws of this rank's samples, on the device (copied asynchronously)."""
        return self.step_fn.to_device(draw_step(self.cfg.seed, s, self.first, self.local_batch, self.objective.draw))

    def step(self, batch: dict, stop_flag: bool = False):
        """One optimizer step on this rank's `batch`, then its bookkeeping: the non-finite policy, the
        metrics row, the checkpoint and the sample grid when due. Returns the StepResult."""
        cfg, s = self.cfg, self.step_now
        batch = {k: t.to(self.device, non_blocking=True) for k, t in batch.items()}
        draws = self.pending.pop(s, None) or self.draw(s)
        if s in self.objective.restart_steps:
            self.restart()

        def draw_next():
            # The next step's draws (CPU work: ~3 ms for 32 samples at 256px here) are made while the
            # device still runs this step, instead of after the sync where the device would wait.
            self.pending[s + 1] = self.draw(s + 1)

        ctx = StepContext(step=s, epoch=s // max(self.steps_per_epoch, 1))
        res = self.step_fn(batch, draws, lr=self.lr(s), ctx=ctx, stop_flag=stop_flag,
                           before_sync=draw_next)
        if not res.finite:
            what = (f"step {s}: loss {float(res.total)} / grad norm {float(res.grad_norm)} is not finite; the "
                    f"weights were not updated")
            if cfg.on_nonfinite == "stop":
                # The weights, optimizer state and EMA are those after s steps: good ones, saved (unless
                # that step is saved already) so a fixed rerun resumes right here.
                if self.saved_step != s:
                    self.last_ckpt = self.save()
                raise NonFiniteError(f"{what}; stopping (--on-nonfinite stop). Last good checkpoint: {self.last_ckpt}")
            self.skipped += 1
            if self.rank0:
                tqdm.write(f"{what}; skipped ({self.skipped} so far, --on-nonfinite skip)")
        self.step_now = s = s + 1

        if self.rank0:
            if self.bar is not None:
                self.bar.update(cfg.batch_size)
            row = self.log.add(s, cfg.batch_size, res.terms, res.grad_norm, self.opt.param_groups[0]["lr"],
                               finite=res.finite, write=s % cfg.log_every == 0 or s == self.max_steps)
            if row is not None:
                self.sinks.log(row)
                tqdm.write(metrics_line(row), file=sys.stdout)
                first = self.objective.terms[0]
                if row[first] is not None and self.bar is not None:
                    self.bar.set_postfix({k: f"{row[k]:.4f}" for k in self.objective.terms[:2]})
        if s % cfg.checkpointing_steps == 0 or s == self.max_steps or res.stop:
            self.last_ckpt = self.save()
        if not res.stop and (s % cfg.sampling_steps == 0 or s == self.max_steps):
            self.last_grid = self.grid()
        return res

    def grid(self):
        path = os.path.join(self.exp_dir, "samples", f"{self.step_now:07d}.png") if self.rank0 else None
        if self.rank0 or self.mode == "fsdp":
            if is_fields(self.cfg):
                forecast_grid(self.ema, self.dataset, self.cfg, self.device, path)
            else:
                sample_grid(self.ema, self.vae, self.cfg, self.device, path)
            reshard(self.ema)  # FSDP2 keeps a root unsharded after a forward: back to the EMA's shards
        return path

    # ------------------------------------------------------------------------------------------ fit

    def fit(self) -> dict:
        """Train to --max-train-steps (or a stop request); returns (and, on rank 0, writes) the run report."""
        if not self.built:
            self.build()
        cfg = self.cfg
        start_step = self.step_now
        self.model.train()
        # in images; on rank 0 also when stderr is a log file (then redrawn once a minute, not 10 times a second)
        self.bar = tqdm(total=self.max_steps * cfg.batch_size, initial=self.step_now * cfg.batch_size,
                        desc=cfg.exp_name, unit="img", unit_scale=True, dynamic_ncols=True, disable=not self.rank0,
                        mininterval=0.1 if sys.stderr.isatty() else 60.0)
        t_train = time.time()
        with StopRequest() as stop:
            for batch in self.loader:
                if self.step_now >= self.max_steps:
                    break
                res = self.step(batch, stop_flag=stop.flag)
                if res.stop:
                    self.stopped = stop.name
                    if self.rank0:
                        print(f"\n{self.stopped}: stopped after step {self.step_now}; checkpoint {self.last_ckpt}",
                              flush=True)
                    break
        self.bar.close()
        train_time = time.time() - t_train
        return self.finish(start_step, train_time)

    def finish(self, start_step: int, train_time: float) -> dict:
        """The exports (at the end of training, not after a stop request) and the report."""
        cfg, step, world = self.cfg, self.step_now, self.env.world_size
        checkpoint = self.last_ckpt
        if self.stopped is None:  # the end of training: the official .pt and the EMA safetensors
            checkpoint = dcp.export_official_pt(model=self.model, ema=self.ema, optimizer=self.opt,
                                              out_file=checkpoint_path(cfg, step), args=self.flat, steps=step,
                                              data=getattr(self.dataset, "state_dict", lambda: None)())
            dcp.export_ema_safetensors(self.ema, os.path.join(self.ckpt_root, f"ema-{step:07d}.safetensors"),
                                     config=self.flat)
        images_trained = (step - start_step) * cfg.batch_size
        rate = images_trained / max(train_time, 1e-9)
        report = {
            "exp_dir": self.exp_dir, "device": str(self.device), "world_size": world, "parallel": self.mode,
            "data_loader": self.loader_backend, "model": cfg.model.model, "method": cfg.objective.method,
            "params": self.n_params, "encoders": cfg.objective.encoders,
            "resumed_from": self.resumed.step if self.resumed else None, "steps": step, "batch_size": cfg.batch_size,
            "images_trained": images_trained, "train_seconds": round(train_time, 2),
            "wall_seconds": round(time.time() - self.t_start, 2), "images_per_s": round(rate, 2),
            "stopped_by": self.stopped, "nonfinite_skipped": self.skipped,
            "train_flop_per_image": int(self.flops_per_image), "peak_tflops_per_device": self.peak,
            "mfu": (float(f"{rate * self.flops_per_image / (self.peak * 1e12 * world):.4g}") if self.peak else None),
            "metrics_sinks": self.sinks.names if self.rank0 else None,
            **(self.log.summary() if self.rank0 else {}), "checkpoint": checkpoint, "sample_grid": self.last_grid,
        }
        if self.rank0:
            self.log.close()
            self.sinks.close()
            write_report(report, self.exp_dir)
        self.env.barrier()
        return report


def train(cfg: TrainConfig) -> dict:
    """Train as configured (`Trainer(cfg).fit()`); --dry-run prints the config and the counts instead."""
    if cfg.dry_run:
        return dry_run(cfg)
    return Trainer(cfg).fit()
