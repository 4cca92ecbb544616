"""Training checkpoints on torch.distributed.checkpoint (DCP): sharded, resharding, crash-safe.

The layout, the save protocol and what makes a checkpoint complete: docs/design.md, "Checkpoints and
resume". One plain process, DDP and FSDP2 alike; keys are the canonical parameter names, and a checkpoint
loads onto any number of processes and any wrapping.

    path = save(root, step, model=model, ema=ema, optimizer=opt, extra={"step": step, "config": flat, ...})
    found = resume_point(root, resume_step=None)         # a StepCheckpoint agreed by all ranks, or None
    extra = load(found.path, model=model, ema=ema, optimizer=opt)
    export_official_pt(model=model, ema=ema, optimizer=opt, out_file=..., args=flat, steps=step)
    export_ema_safetensors(ema, out_file, config=flat)

Every function that touches modules is a collective: call it on every rank. `extra` is stored as JSON
(tuples come back as lists, dict keys as strings; tensors are refused); no object of this package is
pickled (DCP stores plain optimizer values such as lr and betas as small pickled entries).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as torch_dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from fastrepa.official_ckpt import CheckpointError, raise_on_mismatch, save_checkpoint_file
from fastrepa.distributed import barrier, is_distributed, rank, world_size
from fastrepa.io import TEMP_MARK, atomic_path, fsync_dir, write_json, write_text

FORMAT = "fastrepa-dcp-1"
MARKER = "COMMITTED"
STATE_FILE = "train_state.json"
COMPONENTS = ("model", "ema", "optim")
PARTIAL, OLD = ".partial", ".old"
_NAME = re.compile(r"^step-(\d{9})(\.partial|\.old)?$")


def step_dir_name(step: int) -> str:
    return f"step-{int(step):09d}"


# ----------------------------------------------------------------------------------------------------
# process group helpers: everything works with no process group (one process)

def on_rank0(fn, what: str):
    """Run fn on rank 0 only; every rank returns its result, or every rank raises if it failed."""
    result, err, exc = None, None, None
    if rank() == 0:
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 -- reported to all ranks, then re-raised
            err, exc = f"{type(e).__name__}: {e}", e
    if is_distributed():
        box = [(result, err)]
        dist.broadcast_object_list(box, src=0)
        result, err = box[0]
    if exc is not None:
        raise exc
    if err is not None:
        raise CheckpointError(f"{what} failed on rank 0: {err}")
    return result


@contextmanager
def _dcp_quiet():
    """DCP warns on every call that it runs in a single process when no process group exists; that is
    the intended mode here, not news."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


# ----------------------------------------------------------------------------------------------------
# small file helpers

def _list_files(path: str) -> dict:
    out = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            if name == MARKER or TEMP_MARK in name:
                continue
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, path)] = os.path.getsize(full)
    return dict(sorted(out.items()))


def _read_marker(path: str) -> dict | None:
    try:
        with open(os.path.join(path, MARKER)) as f:
            marker = json.load(f)
        return marker if isinstance(marker, dict) else None
    except (OSError, ValueError):
        return None


def check_complete(path: str, step: int | None = None) -> str | None:
    """None when `path` is a complete checkpoint (of `step`, if given), else why it is not."""
    if not os.path.isdir(path):
        return "it does not exist"
    m = _NAME.match(os.path.basename(os.path.normpath(path)))
    if m and m.group(2) == PARTIAL:
        return f"its name ends in {PARTIAL}: a save that is in progress or did not finish"
    if m and step is None:
        step = int(m.group(1))
    marker = _read_marker(path)
    if marker is None:
        return f"it has no readable {MARKER} marker (the save did not finish)"
    if marker.get("format") != FORMAT:
        return f"its marker has format {marker.get('format')!r}, expected {FORMAT!r}"
    if step is not None and marker.get("step") != step:
        return f"its marker is of step {marker.get('step')}, not {step}"
    for rel, size in marker.get("files", {}).items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"file {rel} listed in {MARKER} is missing"
        if os.path.getsize(full) != size:
            return f"file {rel} has {os.path.getsize(full)} bytes, {MARKER} says {size}"
    return None


# ----------------------------------------------------------------------------------------------------
# listing

def _scan(root: str) -> tuple[dict, list]:
    """({step: path} of complete checkpoints, [paths of every other step-* directory])."""
    complete, other, olds = {}, [], {}
    if not os.path.isdir(root):
        return complete, other
    for name in sorted(os.listdir(root)):
        m = _NAME.match(name)
        path = os.path.join(root, name)
        if not m or not os.path.isdir(path):
            continue
        step, suffix = int(m.group(1)), m.group(2)
        if suffix is None and check_complete(path, step) is None:
            complete[step] = path
        elif suffix == OLD and check_complete(path, step) is None:
            olds[step] = path
        else:
            other.append(path)
    for step, path in olds.items():  # a crash between the two renames of a re-save of the same step
        if step in complete:
            other.append(path)
        else:
            complete[step] = path
    return dict(sorted(complete.items())), other


class StepCheckpoint(NamedTuple):
    """A complete checkpoint directory and the step it holds."""
    step: int
    path: str


def list_complete(ckpt_root: str) -> list[StepCheckpoint]:
    """Every complete checkpoint under `ckpt_root`, oldest first."""
    return [StepCheckpoint(s, p) for s, p in _scan(ckpt_root)[0].items()]


def latest(ckpt_root: str) -> StepCheckpoint | None:
    """The newest complete checkpoint, or None when there is none."""
    found = list_complete(ckpt_root)
    return found[-1] if found else None


def find(ckpt_root: str, step: int) -> str:
    """The path of the complete checkpoint of `step` (for --resume-step); a clear error otherwise."""
    complete, _ = _scan(ckpt_root)
    if step in complete:
        return complete[step]
    path = os.path.join(ckpt_root, step_dir_name(step))
    why = check_complete(path, step)
    if os.path.isdir(path + PARTIAL) and why == "it does not exist":
        why = f"only {path + PARTIAL} exists (a save that did not finish)"
    have = sorted(complete)
    raise CheckpointError(f"no complete checkpoint of step {step} in {ckpt_root}: {path} is not usable ({why}); "
                          f"complete steps available: {have if have else 'none'}")


def resume_point(ckpt_root: str, resume_step: int | None = None) -> StepCheckpoint | None:
    """Where to resume: `find(resume_step)` when given (non-zero), else `latest` (None: start fresh).

    Decided by rank 0 and broadcast, so all ranks agree; errors are raised on every rank."""
    def decide():
        if resume_step:
            return StepCheckpoint(int(resume_step), find(ckpt_root, int(resume_step)))
        return latest(ckpt_root)
    return on_rank0(decide, f"finding the checkpoint to resume in {ckpt_root}")


# ----------------------------------------------------------------------------------------------------
# save

def _state_dicts(model, ema, optimizer) -> dict:
    sds = {"model": get_model_state_dict(model)}
    if ema is not None:
        sds["ema"] = get_model_state_dict(ema)
    if optimizer is not None:
        sds["optim"] = get_optimizer_state_dict(model, optimizer)
    return sds


def _cleanup(root: str, keep_last: int | None, keep: str) -> list[str]:
    complete, other = _scan(root)
    doomed = [p for p in other if os.path.abspath(p) != os.path.abspath(keep)]
    if keep_last is not None:
        newest = set(list(complete.values())[-keep_last:]) | {keep}
        doomed += [p for p in complete.values() if p not in newest and os.path.abspath(p) != os.path.abspath(keep)]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def save(ckpt_root: str, step: int, *, model: torch.nn.Module, ema: torch.nn.Module | None = None,
         optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None,
         keep_last: int | None = None) -> str:
    """Write `ckpt_root/step-{step:09d}/` (see the module docstring); returns its path. Collective.

    extra: plain-JSON train state (step, images seen, data position, scheduler state, flat config ...).
    keep_last: after the save is complete, keep only the K newest complete checkpoints (None: all)."""
    if keep_last is not None and int(keep_last) < 1:
        raise ValueError(f"keep_last={keep_last}: expected None (keep all) or an integer >= 1")
    if int(step) < 0:
        raise ValueError(f"step={step}: expected >= 0")
    extra = {} if extra is None else extra
    try:  # checked on every rank before any collective, so a bad value cannot hang the others
        state_json = json.dumps(extra, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint extra (train state) must be plain JSON (numbers, strings, lists, "
                              f"dicts; no tensors or objects): {e}") from None
    root = os.path.abspath(ckpt_root)
    final = os.path.join(root, step_dir_name(step))
    partial = final + PARTIAL

    def prepare():
        os.makedirs(root, exist_ok=True)
        if os.path.exists(partial):
            shutil.rmtree(partial)
        os.makedirs(partial)
    on_rank0(prepare, f"preparing {partial}")

    sds = _state_dicts(model, ema, optimizer)
    world = world_size()
    for name, sd in sds.items():
        with _dcp_quiet():
            torch_dcp.save(sd, storage_writer=FileSystemWriter(os.path.join(partial, name), sync_files=True),
                     no_dist=not is_distributed())
    del sds

    on_rank0(lambda: write_text(os.path.join(partial, STATE_FILE), state_json), f"writing {STATE_FILE}")
    barrier()

    def commit():
        components = [c for c in COMPONENTS if os.path.isdir(os.path.join(partial, c))]
        for c in components:
            if not os.path.isfile(os.path.join(partial, c, ".metadata")):
                raise CheckpointError(f"{partial}/{c} has no DCP .metadata after the save")
        write_json(os.path.join(partial, MARKER),
                           {"format": FORMAT, "step": int(step), "world_size": world, "components": components,
                    "time": time.time(), "torch": torch.__version__, "files": _list_files(partial)},
                   sort_keys=True)
        fsync_dir(partial)
    on_rank0(commit, f"committing {partial}")

    def publish():
        old = final + OLD
        if os.path.exists(old):
            shutil.rmtree(old)
        replaced = os.path.exists(final)
        if replaced:
            os.replace(final, old)
        os.replace(partial, final)
        fsync_dir(root)
        if replaced:
            shutil.rmtree(old, ignore_errors=True)
        _cleanup(root, keep_last, keep=final)
    on_rank0(publish, f"publishing {final}")
    return final


# ----------------------------------------------------------------------------------------------------
# load

def _flatten(sd: dict) -> dict:
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict  # DCP's own key scheme
    return flatten_state_dict(sd)[0]


def _check_keys(path: str, sd: dict, what: str, relaxed=lambda key: False) -> None:
    """Strict key and shape check of `sd` against the DCP metadata of `path` (errors list all keys)."""
    meta = FileSystemReader(path).read_metadata().state_dict_metadata
    flat = _flatten(sd)
    missing = [k for k in flat if k not in meta and not relaxed(k)]
    unexpected = [k for k in meta if k not in flat and not relaxed(k)]
    shapes = [f"{k}: checkpoint {tuple(meta[k].size)} vs {tuple(v.shape)}" for k, v in flat.items()
              if k in meta and isinstance(v, torch.Tensor) and isinstance(meta[k], TensorStorageMetadata)
              and tuple(meta[k].size) != tuple(v.shape)]
    raise_on_mismatch(f"checkpoint {path} does not match the {what}", missing, unexpected, shapes)


def _optim_relaxed(key: str) -> bool:
    """Optimizer hyperparameter flags (foreach, fused, ...) may differ between torch versions."""
    return key.startswith("param_groups.") and not key.endswith(".params")


def _canonical(name: str) -> str:
    """A parameter name without the wrappers' prefixes (DDP's module., torch.compile's _orig_mod.)."""
    return ".".join(part for part in name.split(".") if part not in ("module", "_orig_mod"))


def _state_param(key: str) -> str | None:
    """The parameter of a flat optimizer-state key `state.<parameter name>.<field>`, else None."""
    return key[len("state."):].rsplit(".", 1)[0] if key.startswith("state.") else None


def _never_stepped(path: str, osd: dict) -> set[str]:
    """The parameters (names) with no optimizer state at all in the checkpoint `path`: they had no gradient
    before it was saved (e.g. the blocks ERW's warmup does not run), so they get no state on load either."""
    saved = {_state_param(k) for k in FileSystemReader(path).read_metadata().state_dict_metadata}
    return {name for name in osd.get("state", {}) if name not in saved}


def load(path: str, *, model: torch.nn.Module, ema: torch.nn.Module | None = None,
         optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load a complete checkpoint into model / ema / optimizer (any wrapping, any world size); returns
    its `extra` dict. Strict: missing / unexpected keys and shape mismatches are listed. Collective."""
    why = on_rank0(lambda: check_complete(path), f"checking {path}")
    if why is not None:
        parent = os.path.dirname(os.path.abspath(path))
        have = [s for s, _ in list_complete(parent)]
        raise CheckpointError(f"checkpoint {path} is not complete ({why}); complete steps in {parent}: "
                              f"{have if have else 'none'}")
    marker = _read_marker(path)
    wanted = {"model": model, "ema": ema, "optim": optimizer}
    for name, obj in wanted.items():
        if obj is not None and name not in marker["components"]:
            raise CheckpointError(f"checkpoint {path} has no {name} state (it holds {marker['components']})")
    no_dist = not is_distributed()

    for name, module in (("model", model), ("ema", ema)):
        if module is None:
            continue
        sd = get_model_state_dict(module)
        _check_keys(os.path.join(path, name), sd, f"{name} ({type(module).__name__})")
        with _dcp_quiet():
            torch_dcp.load(sd, storage_reader=FileSystemReader(os.path.join(path, name)), no_dist=no_dist)
        set_model_state_dict(module, sd)
    if optimizer is not None:
        osd = get_optimizer_state_dict(model, optimizer)
        absent = _never_stepped(os.path.join(path, "optim"), osd)
        _check_keys(os.path.join(path, "optim"), osd, "optimizer",
                    relaxed=lambda k: _optim_relaxed(k) or _state_param(k) in absent)
        with _dcp_quiet():
            torch_dcp.load(osd, storage_reader=FileSystemReader(os.path.join(path, "optim")),
                           planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=no_dist)
        in_groups = {n for g in osd["param_groups"] for n in g["params"]}  # the saved groups' (just loaded)
        strays = [n for n in osd["state"] if n in absent and n not in in_groups]  # in parameter order
        if strays:
            raise_on_mismatch(f"checkpoint {path}/optim does not match the optimizer",
                              [f"state.{n}.*" for n in strays], [], [])
        set_optimizer_state_dict(model, optimizer, osd)
        if absent:  # as in the run that saved it: no state until their first gradient
            by_name = {_canonical(n): p for n, p in model.named_parameters()}
            for name in absent:
                optimizer.state.pop(by_name[name], None)
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def read_extra(path: str) -> dict:
    """The `extra` dict of a complete checkpoint, without loading any tensor."""
    why = check_complete(path)
    if why is not None:
        raise CheckpointError(f"checkpoint {path} is not complete ({why})")
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------------
# export (plain tensors, on rank 0)

def _read_component(path: str, name: str) -> dict:
    """A whole component of a checkpoint directory as plain CPU tensors (this process only)."""
    # the same private pieces as torch's own format_utils.dcp_to_torch_save (the public dcp.load fills only
    # the keys of the dict it is given)
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
    sd: dict = {}
    with _dcp_quiet():
        _load_state_dict(sd, storage_reader=FileSystemReader(os.path.join(path, name)),
                         planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    if not sd:
        raise CheckpointError(f"{os.path.join(path, name)} holds no state")
    return sd


def _full_model_sd(module) -> dict | None:
    """The full (unsharded) state dict on rank 0 as CPU tensors; None on the other ranks. Collective."""
    if is_distributed():
        sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if rank() == 0 else None
    return {k: v.detach().cpu().clone() for k, v in get_model_state_dict(module).items()}


def _full_optim_sd(model, optimizer) -> dict | None:
    if is_distributed():
        osd = get_optimizer_state_dict(model, optimizer,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return osd if rank() == 0 else None
    osd = get_optimizer_state_dict(model, optimizer)
    return {"state": {k: {n: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v) for n, v in s.items()}
                      for k, s in osd["state"].items()},
            "param_groups": osd["param_groups"]}


def official_optimizer_state(osd: dict) -> dict:
    """Name-keyed optimizer state (get_optimizer_state_dict) -> torch's `optimizer.state_dict()` layout with
    integer ids in parameter order, which `optimizer.load_state_dict` of the official trainer accepts."""
    ids, groups = {}, []
    for g in osd["param_groups"]:
        group = {k: (tuple(v) if k == "betas" else v) for k, v in g.items() if k != "params"}
        group["params"] = []
        for name in g["params"]:
            ids[name] = len(ids)
            group["params"].append(ids[name])
        groups.append(group)
    state = {}
    for name, s in osd["state"].items():
        if name not in ids:
            raise CheckpointError(f"optimizer state of {name} has no parameter in any param group")
        state[ids[name]] = {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def _plain(sd: dict) -> dict:
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}


def export_official_pt(source: str | None = None, out_file: str | None = None, *, model=None, ema=None,
                       optimizer=None, args: dict | None = None, steps: int | None = None,
                       data: dict | None = None) -> str:
    """Write the official REPA `.pt` {model, ema, opt, args (plain dict), steps} with plain tensors, atomically;
    `data` (a PDE run's split and normaliser, plain JSON; from a directory: its train state's "dataset") is
    added as key "data" when given.

    source: a complete checkpoint directory (read by this process alone: call it on one rank, or from a
    command), or None to export the live `model` / `ema` / `optimizer` (a collective: every rank calls it,
    rank 0 gathers full state dicts on the CPU and writes). From a directory, `args` defaults to
    extra["config"] (or extra["args"]) and `steps` to the checkpoint's step."""
    if out_file is None:
        raise ValueError("export_official_pt: out_file is required")
    if source is not None:
        why = check_complete(source)
        if why is not None:
            raise CheckpointError(f"cannot export {source}: it is not a complete checkpoint ({why})")
        extra, marker = read_extra(source), _read_marker(source)
        args = args if args is not None else extra.get("config", extra.get("args"))
        steps = steps if steps is not None else marker["step"]
        if args is None:
            raise CheckpointError(f"{source} has no 'config' or 'args' in its train state; pass args=")
        ckpt = {"model": _plain(_read_component(source, "model"))}
        if "ema" in marker["components"]:
            ckpt["ema"] = _plain(_read_component(source, "ema"))
        if "optim" in marker["components"]:
            ckpt["opt"] = official_optimizer_state(_read_component(source, "optim"))
        ckpt.update(args=dict(args), steps=int(steps))
        data = data if data is not None else extra.get("dataset")
        if data:
            ckpt["data"] = data
        save_checkpoint_file(out_file, ckpt)
        return out_file
    if model is None or args is None or steps is None:
        raise ValueError("export_official_pt: pass a checkpoint directory, or model= (ema=, optimizer=), args= "
                         "and steps=")
    msd = _full_model_sd(model)
    esd = _full_model_sd(ema) if ema is not None else None
    osd = _full_optim_sd(model, optimizer) if optimizer is not None else None

    def write():
        ckpt = {"model": _plain(msd)}
        if esd is not None:
            ckpt["ema"] = _plain(esd)
        if osd is not None:
            ckpt["opt"] = official_optimizer_state(osd)
        ckpt.update(args=dict(args), steps=int(steps))
        if data:
            ckpt["data"] = data
        save_checkpoint_file(out_file, ckpt)
    on_rank0(write, f"writing {out_file}")
    return out_file


def export_ema_safetensors(ema: torch.nn.Module | str, out_file: str, config: dict | None = None) -> str:
    """EMA weights only as safetensors, with `config` as JSON in the metadata (key "config"), atomically.

    ema: the EMA module (a collective: every rank calls it, rank 0 writes) or a complete checkpoint
    directory (this process alone; config defaults to its extra["config"])."""
    from safetensors.torch import save_file
    if isinstance(ema, (str, os.PathLike)):
        path = str(ema)
        why = check_complete(path)
        if why is not None:
            raise CheckpointError(f"cannot export {path}: it is not a complete checkpoint ({why})")
        if "ema" not in _read_marker(path)["components"]:
            raise CheckpointError(f"checkpoint {path} has no EMA weights")
        if config is None:
            config = read_extra(path).get("config", {})
        sd = _read_component(path, "ema")
    else:
        sd = _full_model_sd(ema)
    config = {} if config is None else config
    meta = {"format": "pt", "producer": "fastrepa", "config": json.dumps(config, sort_keys=True)}

    def write():
        with atomic_path(out_file) as tmp:
            save_file(_plain(sd), tmp, metadata=meta)
    if isinstance(ema, (str, os.PathLike)):
        write()
    else:
        on_rank0(write, f"writing {out_file}")
    return out_file
