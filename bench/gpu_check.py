"""One prepared GPU check: `bash bench/gpu_check.sh [--dry-run] [--out DIR] [--budget S] [--steps a,b]`.

A GPU is lent to a task for 15 minutes of device time (the machine's start included), so this is one
command that does, in order of value, what decides the next speed work, each step in its own process
group under its own time limit, and that writes everything to one folder ($OUT when set, else
bench/results/):

    gpu-check-<device>-<date>.md        one page: device, driver, versions, every figure, each step's status
    gpu-check-<device>-<date>.json      all of it: the plan, every step (commands, exit codes, wall times,
                                        reasons) and the bench suites' own result dicts, row by row
    gpu-check-<device>-<date>-logs.tar.gz  every step's log, the bench's own .json/.md, pytest's junit XML,
                                        the torchrun run's metrics and reports

The three files are rewritten after every step, so a run cut short still leaves what it measured.

Steps (GPU run; `--list` prints them with their budgets):
  setup            nvidia-smi, an offline install of this checkout so `fastrepa.kernels` imports (already
                   importable from here, else `pip install --no-deps --no-build-isolation --no-index -e .`,
                   else a sitecustomize on PYTHONPATH that maps fastrepa.kernels to kernels/), versions and
                   which optional packages are there (diffusers, DALI, flash-attn, xformers, tensorboard)
  kernel-tests     pytest tests/test_kernel_*.py, compiled on CUDA (every failure listed, not only the first)
  train-b64-core   train suite, SiT-XL/2 + DINOv2-B, B=64: official (fp16 + GradScaler, unfused AdamW) and
                   compile+triton: the ratio the 2x target is about; sra (SRA on the compile+triton path,
                   blocks 8/20): what the EMA teacher's forward costs over REPA
  train-b64-rest   the same B=64: eager+fused-adamw; irepa (iREPA's conv projector, compile+triton); erw-warmup
                   (ERW's warmup step: blocks 1..4 and the projector, the later blocks never run)
  train-b64-family the same B=64: haste (HASTE aligning: blocks 5-8 against DINOv2 blocks 9-12),
                   haste-after-stop (past --align-stop-step: no encoder, no projector), reg (REG's class token)
  train-b32        the same at B=32: all four REPA variants
  kernels          kernel suite, SiT-XL/2 shapes, B=32 and 128, bf16, fwd+bwd: Triton vs eager vs compile
  attention        attention suite: flash / cuDNN / efficient / math SDPA (and flash-attn, xformers when
                   installed) at SiT-XL/2's 16 x 256 x 72, B=32 and 64, bf16, fwd+bwd, and which one auto runs
  pde              pde suite, PDE-DiT-XL/8 + FourierFlow's ViViT, B=8, bf16: a fourierflow step with the
                   encoder against one on cached tokens (--feature-cache), and the salient attention core as
                   two sdpa calls, materialised, and one sdpa call (compile rows left out for time)
  sample           sample suite, SiT-XL/2, REPA protocol (SDE 250 steps, CFG 1.8 on [0, 0.7]), B=256:
                   compile vs compile + CUDA graphs
  torchrun         torchrun --nproc_per_node=1 train.py, FSDP2 + compile + bf16, 2 steps on a tiny synthetic
                   pack with a DCP checkpoint each step, then the same command resumed for a third step
  sync-test        tests/test_train.py::test_a_cuda_step_syncs_the_host_once

Time: each step has a budget (seconds); its time limit is the end of its slot in the plan (the budgets of
it and every step before it, from the start), so time an early step does not use passes to later ones,
and the whole run never exceeds the sum (--budget caps it further). A step with too little time left is
skipped and says so; a step cut at its limit is marked `timeout` and keeps the rows its log had printed.
Compilation happens inside the timed steps: the first call of every compiled row (compile + warm-up) is
reported apart from its step time, with the compile caches (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR,
empty at the start, inside the work folder) counted before each step.

--dry-run: the same steps on the CPU with reduced shapes (the bench's --quick), where every step's
plumbing runs in well under a minute: no CUDA (CUDA_VISIBLE_DEVICES=""), one kernel test, no torch.compile
(a CPU compile takes minutes), and the CUDA-only rows skipped with their reasons. It installs nothing.

Nothing is downloaded: every model has random weights, the data is generated, the install is offline.
Only the standard library is imported here; torch runs in the steps' own processes.
"""
import argparse
import datetime as _dt
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fastrepa.io import atomic_path, json_safe, write_text  # noqa: E402 - standard library only, needs no install
BENCH = ROOT / "bench"
SCHEMA = "fastrepa-gpu-check/1"
DEFAULT_BUDGET = 500  # seconds: < 8.5 minutes with margin for writing the files
DRY_BUDGET = 900      # generous: a dry run on 2 loaded cores must not trip a limit
MIN_STEP_S = 15       # a step with less time than this left is skipped ("out of time")
KILL_GRACE_S = 8      # SIGTERM, then SIGKILL after this many seconds

OPTIONAL = {  # import name -> (package, what its absence means here)
    "diffusers": ("diffusers", "the SD-VAE (fastrepa.vae) and the tests that build a tiny VAE skip; nothing here needs it"),
    "nvidia.dali": ("nvidia-dali-cuda130", "the DALI loader and its GPU JPEG decode are not measured; train.py uses the torch loader"),
    "flash_attn": ("flash-attn", "--attn-backend flash_attn is not available; every row here uses sdpa"),
    "xformers": ("xformers", "--attn-backend xformers is not available; every row here uses sdpa"),
    "tensorboard": ("tensorboard", "train.py --report-to auto writes no TensorBoard events (the torchrun step uses none)"),
    "timm": ("timm", "the encoders' pos-embed resampling tests skip"),
    "xdist": ("pytest-xdist", "the kernel tests run in one process"),
}

KERNEL_OPS = ["gated_residual_layernorm_modulate", "layernorm_modulate", "qk_norm_rope", "alignment_loss", "projector"]
TRAIN_VARIANTS = {  # step -> (batch size, variants) on CUDA
    "train-b64-core": (64, ["official", "compile+triton", "sra"]),
    "train-b64-rest": (64, ["eager+fused-adamw", "irepa", "erw-warmup"]),
    "train-b64-family": (64, ["haste", "haste-after-stop", "reg"]),
    "train-b32": (32, ["official", "eager+fused-adamw", "compile", "compile+triton"]),
}
SAMPLE_VARIANTS = ["compile", "cuda-graphs"]
METHOD_TWINS = ("sra-eager", "irepa-eager", "erw-warmup-eager", "haste-eager", "haste-after-stop-eager",
                "reg-eager")  # bench/train_suite.py's CPU stand-ins
SYNC_TEST = "tests/test_train.py::test_a_cuda_step_syncs_the_host_once"
TARGETS = {"train_x_official": 2.0, "kernel_x_eager": 3.0, "kernel_x_compile": 1.2, "kernel_pct_roofline": 80.0,
           "kernel_min_batch": 32}


# ------------------------------------------------------------------------------------------ helpers

def now_utc():
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def today_utc():
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")


def count_files(path):
    n = 0
    for _, _, files in os.walk(path):
        n += len(files)
    return n


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(text, lines=15, width=300):
    return [ln[:width] for ln in text.strip().splitlines()[-lines:]] if text else []


def fmt(v, spec=".3g"):
    if v is None or v == "":
        return ""
    if isinstance(v, str):
        return v
    return format(v, spec)


def rate(v):
    """A rate for a table cell: one decimal from 10 up, three significant digits below."""
    if v is None:
        return ""
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"


def md_table(headers, rows):
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in cells[1:]])


# The sitecustomize of the fallback install: maps the package fastrepa.kernels to ROOT/kernels (what
# setup.py's package_dir does) in every Python process that inherits PYTHONPATH: the bench, pytest,
# torchrun's workers and inductor's compile workers. Another sitecustomize further down the path still runs.
SITECUSTOMIZE = '''"""Written by bench/gpu_check.py: fastrepa.kernels -> {kernels} (setup.py's package_dir), no install."""
import importlib.abc
import importlib.util
import os
import sys

_KERNELS = {kernels!r}


class _FastrepaKernels(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "fastrepa.kernels":
            return None
        return importlib.util.spec_from_file_location(fullname, os.path.join(_KERNELS, "__init__.py"),
                                                      submodule_search_locations=[_KERNELS])


sys.meta_path.insert(0, _FastrepaKernels())
_here = os.path.dirname(os.path.abspath(__file__))
for _p in list(sys.path):
    if _p and os.path.abspath(_p) != _here and os.path.isfile(os.path.join(_p, "sitecustomize.py")):
        _spec = importlib.util.spec_from_file_location("_chained_sitecustomize", os.path.join(_p, "sitecustomize.py"))
        try:
            _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
        except Exception:  # noqa: BLE001 - the chained one is not ours to fix
            pass
        break
'''

# Where fastrepa and fastrepa.kernels would come from, without importing torch (fast: run before and after
# an install); the env probe below then imports them for real.
WHERE = ("import importlib.util, os; s = importlib.util.find_spec('fastrepa.kernels'); import fastrepa; "
         "print('GPU_CHECK_WHERE', os.path.realpath(fastrepa.__file__), os.path.realpath(s.origin) if s else 'none')")

# Runs in a subprocess, from the checkout: imports fastrepa.kernels as every step will, and prints what the
# summary's header needs as one JSON line.
ENV_PROBE = r'''
import importlib, importlib.util, json, os, platform, sys
sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
out = {"python": platform.python_version(), "python_executable": sys.executable, "platform": platform.platform()}
import torch
out.update(torch=torch.__version__, cuda_build=torch.version.cuda, cuda_available=torch.cuda.is_available())
for mod in ("triton", "timm", "numpy"):
    try:
        out[mod] = importlib.import_module(mod).__version__
    except Exception as e:
        out[mod] = None
import common
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
env = common.environment(dev)
out["bench_env"] = env
out["device_slug"] = common.device_slug(env)
out["device_name"] = env["device_name"]
def present(name):
    try:
        return importlib.util.find_spec(name) is not None
    except Exception:
        return False
out["optional"] = {name: present(name) for name in NAMES}
import fastrepa, fastrepa.kernels
out["fastrepa_file"] = os.path.realpath(fastrepa.__file__)
out["kernels_file"] = os.path.realpath(fastrepa.kernels.__file__)
try:
    from fastrepa.kernels import _dispatch
    out["has_triton"] = bool(_dispatch.HAS_TRITON)
except Exception as e:
    out["has_triton"] = f"{type(e).__name__}: {e}"
print("GPU_CHECK_ENV " + json.dumps(out))
'''

# ------------------------------------------------------------------------------------------- runner

class Check:
    """The run: plan, clock, environment of the child processes, the record, the output files."""

    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.python = args.python or sys.executable
        self.out = Path(args.out or os.environ.get("OUT") or (BENCH / "results")).resolve()
        self.own_work = args.work_dir is None
        self.work = Path(args.work_dir or tempfile.mkdtemp(prefix="fastrepa-gpu-check-")).resolve()
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.budget = args.budget or (DRY_BUDGET if self.dry else DEFAULT_BUDGET)
        self.child = None  # the running Popen, for the signal handler
        self.env = self._base_env()
        self.stem = None
        self.record = {
            "schema": SCHEMA, "dry_run": self.dry, "started": now_utc(), "finished": None,
            "command": shlex.join(["bash", "bench/gpu_check.sh", *sys.argv[1:]]),
            "python_executable": self.python, "root": str(ROOT), "out": str(self.out), "work": str(self.work),
            "budget_s": self.budget, "git": self._git(), "nvidia_smi": None, "env": None, "install": None,
            "targets": TARGETS, "steps": [],
        }

    # ------------------------------------------------------------------ environment of the children
    def _base_env(self):
        env = dict(os.environ)
        env.update(PYTHONUNBUFFERED="1", OMP_WAIT_POLICY=env.get("OMP_WAIT_POLICY", "PASSIVE"),
                   TORCHINDUCTOR_CACHE_DIR=str(self.work / "cache" / "inductor"),
                   TRITON_CACHE_DIR=str(self.work / "cache" / "triton"), PYTHONWARNINGS="ignore::FutureWarning")
        env.pop("TRITON_INTERPRET", None)  # pytest's conftest sets it where there is no GPU
        if self.dry:
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    def _git(self):
        try:
            sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                 timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return {"commit": sha or None, "dirty": bool(dirty)} if sha else None
        except (OSError, subprocess.SubprocessError):
            return None

    # ------------------------------------------------------------------------------------- clock
    def elapsed(self):
        return time.monotonic() - self.t0

    def left(self):
        return self.budget - self.elapsed()

    # ------------------------------------------------------------------------------- subprocesses
    def run(self, step, argv, timeout, name=None, env=None, cwd=ROOT):
        """Run argv in its own process group, output to a log file; kill the group at the timeout."""
        k = len(step["commands"]) + 1
        log = self.logs / f"{step['name']}-{k}{'-' + name if name else ''}.log"
        timeout = max(1.0, float(timeout))
        rec = {"argv": [str(a) for a in argv], "log": log.name, "timeout_s": round(timeout, 1), "rc": None,
               "wall_s": None, "timed_out": False}
        step["commands"].append(rec)
        t = time.monotonic()
        with open(log, "w", encoding="utf-8", errors="replace") as f:
            f.write(f"$ {shlex.join(rec['argv'])}\n# cwd {cwd}, limit {timeout:.0f} s, started {now_utc()}\n")
            f.flush()
            start = f.tell()
            try:
                p = subprocess.Popen(rec["argv"], cwd=cwd, env=env or self.env, stdout=f, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as e:
                rec.update(rc=127, wall_s=0.0, error=f"{type(e).__name__}: {e}")
                f.write(f"\n# could not start: {e}\n")
                return rec, f"could not start {argv[0]}: {e}"
            self.child = p
            try:
                rec["rc"] = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rec["timed_out"] = True
                kill_group(p)
                rec["rc"] = p.returncode
            finally:
                self.child = None
            rec["wall_s"] = round(time.monotonic() - t, 2)
            f.flush()
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.write(f"\n# exit {rec['rc']}{' (killed at the time limit)' if rec['timed_out'] else ''} after "
                    f"{rec['wall_s']} s\n")
        with open(log, "rb") as f:  # the child's output alone, without the header and footer lines
            f.seek(start)
            text = f.read(end - start).decode("utf-8", errors="replace")
        return rec, text

    # ------------------------------------------------------------------------------------- files
    def write(self):
        """The summary, the JSON and the logs tarball, rewritten (atomically) after every step."""
        if self.stem is None:
            return None
        self.out.mkdir(parents=True, exist_ok=True)
        self.record["finished"] = now_utc()
        self.record["wall_s"] = round(self.elapsed(), 1)
        paths = {"md": self.out / f"{self.stem}.md", "json": self.out / f"{self.stem}.json",
                 "logs": self.out / f"{self.stem}-logs.tar.gz"}
        self.record["files"] = {k: p.name for k, p in paths.items()}
        write_text(paths["json"], json.dumps(json_safe(self.record), indent=1, allow_nan=False) + "\n")
        write_text(paths["md"], render_summary(self.record))
        with atomic_path(paths["logs"]) as tmp, tarfile.open(tmp, "w:gz") as tar:
            for sub in ("logs", "bench", "junit", "runs-meta"):
                if (self.work / sub).exists():
                    tar.add(self.work / sub, arcname=f"{self.stem}/{sub}")
        return paths

    def choose_stem(self, slug):
        base = f"gpu-check-{slug}-{today_utc()}" + ("-dry-run" if self.dry else "")
        for i in range(1, 1000):
            stem = base + ("" if i == 1 else f"-{i}")
            if not any((self.out / f"{stem}{ext}").exists() for ext in (".md", ".json", "-logs.tar.gz")):
                self.stem = stem
                return stem
        raise RuntimeError(f"no free file name for {base} in {self.out}")


def kill_group(p):
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# -------------------------------------------------------------------------------------------- steps

def step_setup(c, step, limit):
    """nvidia-smi, the offline install, the environment probe."""
    res = step["results"]
    smi = shutil.which("nvidia-smi")
    if smi and not c.dry:
        q = "name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu"
        rec, text = c.run(step, [smi, f"--query-gpu={q}", "--format=csv"], min(20, limit), "nvidia-smi")
        lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#") and not ln.startswith("$")]
        c.record["nvidia_smi"] = {"query": q, "csv": lines} if rec["rc"] == 0 else {"error": tail(text, 3)}
    else:
        c.record["nvidia_smi"] = {"skipped": "dry run (CPU)" if c.dry else "nvidia-smi not found"}

    install = {"method": None, "attempts": []}
    c.record["install"] = install

    def where(label):
        """True if fastrepa and fastrepa.kernels would both be imported from this checkout (cwd = the checkout,
        as every step runs), without importing torch."""
        rec, text = c.run(step, [c.python, "-c", WHERE], 30, f"where-{label}")
        m = re.search(r"GPU_CHECK_WHERE (\S+) (\S+)", text)
        files = list(m.groups()) if m else []
        ok = bool(m) and all(f != "none" and Path(f).is_relative_to(ROOT) for f in files)
        why = None if ok else ("fastrepa.kernels not found" if m and files[1] == "none" else
                               f"imports {', '.join(files)}, not this checkout's" if m
                               else (tail(text, 1) or ["no output"])[0])
        install["attempts"].append({"how": label, "ok": ok, "why": why, "files": files})
        return ok

    if where("as-is"):
        install["method"] = "already importable from this checkout (an editable install of it)"
    if install["method"] is None and not c.dry and c.args.install in ("auto", "pip"):
        rec, text = c.run(step, [c.python, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                                 "--no-index", "--disable-pip-version-check", "-e", str(ROOT)],
                          min(90, max(5, c.deadline(step) - time.monotonic() - 20)), "pip")
        if rec["rc"] != 0:
            install["attempts"].append({"how": "pip", "ok": False, "why": " | ".join(tail(text, 2)), "files": []})
        elif where("pip"):
            install["method"] = "pip install --no-deps --no-build-isolation --no-index -e . (offline)"
    if install["method"] is None and c.args.install in ("auto", "shim"):
        site = c.work / "pypath"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(kernels=str(ROOT / "kernels")), encoding="utf-8")
        old_path = c.env.get("PYTHONPATH")
        c.env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)] + ([old_path] if old_path else []))
        if where("sitecustomize"):
            install["method"] = (f"PYTHONPATH={site}{os.pathsep}{ROOT}: a sitecustomize maps fastrepa.kernels "
                                 "to kernels/ (no install)")
        elif old_path:
            c.env["PYTHONPATH"] = old_path
        else:
            c.env.pop("PYTHONPATH")
    if install["method"] is None:
        step["status"], step["reason"] = "failed", ("fastrepa.kernels is not importable from this checkout: "
                                                    + "; ".join(f"{a['how']}: {a['why']}" for a in install["attempts"]))
        c.fatal = step["reason"]
        return

    rec, text = c.run(step, [c.python, "-c", ENV_PROBE.replace("NAMES", repr(list(OPTIONAL)))],
                      max(5, c.deadline(step) - time.monotonic()), "env")
    m = re.search(r"^GPU_CHECK_ENV (.*)$", text, re.M)
    if not m:
        step["status"] = "timeout" if rec["timed_out"] else "failed"
        step["reason"] = "the environment probe (torch, fastrepa.kernels) failed: " + " | ".join(tail(text, 3))
        c.fatal = step["reason"]
        return
    env = json.loads(m.group(1))
    if not all(Path(env[k]).is_relative_to(ROOT) for k in ("fastrepa_file", "kernels_file")):
        step["status"] = "failed"
        step["reason"] = (f"torch's process imports {env['fastrepa_file']} and {env['kernels_file']}, not this "
                          "checkout's")
        c.fatal = step["reason"]
        return
    res["install"] = install["method"]
    c.record["env"] = env
    env["optional_missing"] = {name: {"package": OPTIONAL[name][0], "effect": OPTIONAL[name][1]}
                               for name, there in env["optional"].items() if not there}
    c.cuda = bool(env["cuda_available"])
    if not c.cuda and not c.dry:
        step["status"], step["reason"] = "failed", "no CUDA device visible to torch: run `--dry-run` on a CPU"
        c.fatal = step["reason"]
        return
    step["status"] = "ok"


def step_kernel_tests(c, step, limit):
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_kernel_*.py"))
    junit = c.work / "junit" / "kernel-tests.xml"
    junit.parent.mkdir(exist_ok=True)
    argv = [c.python, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={junit}",
            "--durations=10", "-o", "addopts="]
    env = dict(c.env)
    if c.dry:
        files = ["tests/test_kernel_adaln.py"]
        argv += ["-k", "test_layernorm_modulate and shape0"]
        step["dry_run_changes"] = "one kernel test file, -k 'test_layernorm_modulate and shape0', Triton interpreted on the CPU"
    elif c.record["env"]["optional"].get("xdist"):
        argv += ["-n", "8"]
        env["TORCHINDUCTOR_COMPILE_THREADS"] = "2"  # 8 workers x 2, not 8 x 16 compile processes
        step["notes"].append("pytest-xdist: 8 worker processes; TORCHINDUCTOR_COMPILE_THREADS=2")
    rec, text = c.run(step, argv + files, limit, env=env)
    pytest_result(step, rec, text, junit)


def pytest_result(step, rec, text, junit):
    res = step["results"]
    res.update(parse_junit(junit))
    m = re.findall(r"^=+ (.*(?:passed|failed|skipped|error|deselected|no tests ran).*) =+$", text, re.M)
    res["pytest_line"] = m[-1] if m else None
    if rec["timed_out"]:
        step["status"], step["reason"] = "timeout", f"pytest cut at {rec['timeout_s']:.0f} s"
    elif res.get("tests") is None:
        step["status"], step["reason"] = "failed", f"pytest exited {rec['rc']} without a report: " + " | ".join(tail(text, 3))
    elif res["failed"] or res["errors"]:
        step["status"] = "failed"
        step["reason"] = f"{res['failed']} failed, {res['errors']} errors: " + ", ".join(res["failures"][:5])
    elif res["tests"] and res["skipped"] == res["tests"]:
        step["status"], step["reason"] = "skipped", "; ".join(sorted(set(res["skip_reasons"])))[:300]
    elif rec["rc"] != 0:
        step["status"], step["reason"] = "failed", f"pytest exited {rec['rc']}"
    else:
        step["status"] = "ok"


def parse_junit(path):
    if not Path(path).exists():
        return {"tests": None}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"tests": None, "junit_error": str(e)}
    cases = list(root.iter("testcase"))
    out = {"tests": len(cases), "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [],
           "skip_reasons": [], "time_s": round(sum(float(tc.get("time") or 0) for tc in cases), 2), "slowest": []}
    for tc in cases:
        name = f"{tc.get('classname', '').split('.')[-1]}::{tc.get('name')}"
        kinds = {child.tag for child in tc}
        if "failure" in kinds:
            out["failed"] += 1
            msg = next(ch.get("message") or "" for ch in tc if ch.tag == "failure")
            out["failures"].append(f"{name} ({msg.splitlines()[0][:160] if msg else 'failed'})")
        elif "error" in kinds:
            out["errors"] += 1
            out["failures"].append(f"{name} (error)")
        elif "skipped" in kinds:
            out["skipped"] += 1
            out["skip_reasons"].append(next(ch.get("message") or "" for ch in tc if ch.tag == "skipped")[:200])
        else:
            out["passed"] += 1
    out["slowest"] = [f"{tc.get('name')}: {float(tc.get('time') or 0):.1f} s" for tc in
                      sorted(cases, key=lambda tc: -float(tc.get("time") or 0))[:5]]
    return out


def bench(c, step, limit, suite, args):
    """python bench/run.py --suite SUITE ARGS --out WORK/bench/STEP; the suite's result into the record."""
    out = c.work / "bench" / step["name"]
    out.mkdir(parents=True, exist_ok=True)
    argv = [c.python, str(BENCH / "run.py"), "--suite", suite, *args, "--out", str(out)]
    rec, text = c.run(step, argv, limit)
    step["progress"] = [ln for ln in text.splitlines() if ln.startswith(f"[{suite}]")][-60:]
    found = sorted(out.glob("*.json"))
    if found:
        doc = json.loads(found[-1].read_text(encoding="utf-8"))
        result = doc["suites"].get(suite)
        step["bench"] = result
        rows = result.get("rows", [])
        errors = [r for r in rows if r.get("status") == "error"]
        ran = [r for r in rows if r.get("status") == "ok"]
        skipped = [r for r in rows if r.get("status") == "skipped"]
        step["results"].update(rows_ok=len(ran), rows_skipped=len(skipped), rows_error=len(errors))
        if rec["rc"] != 0:
            step["status"], step["reason"] = "failed", f"bench exited {rec['rc']}: " + " | ".join(tail(text, 2))
        elif errors:
            step["status"] = "failed"
            step["reason"] = f"{len(errors)} row(s) failed: " + "; ".join(
                f"{r.get('variant') or r.get('op')} B={r.get('B')} {r.get('impl', '')}: {r.get('reason')}"[:200]
                for r in errors[:3])
        elif not ran:
            step["status"] = "skipped"
            step["reason"] = "every row skipped: " + "; ".join(sorted({str(r.get("reason")) for r in skipped}))[:300]
        else:
            step["status"] = "ok"
    elif rec["timed_out"]:
        step["status"] = "timeout"
        step["reason"] = (f"cut at {rec['timeout_s']:.0f} s; {len(step['progress'])} row line(s) had been printed "
                          "(kept under 'progress')")
    else:
        step["status"], step["reason"] = "failed", f"bench exited {rec['rc']} without results: " + " | ".join(tail(text, 3))


def train_args(name, dry):
    """(bench/run.py arguments, what the dry run changes or None) of a train step."""
    B, variants = TRAIN_VARIANTS[name]
    if not dry:
        return ["--model", "SiT-XL/2", "--enc-type", "dinov2-vit-b", "--batch-sizes", str(B), "--dtype", "bf16",
                "--repeats", "10", "--variants", ",".join(variants)], None
    dropped = [v for v in variants if v == "compile"]
    # the methods' rows (sra, irepa, erw-warmup: compile+triton, CUDA only) run on their eager twins on the
    # CPU, so their plumbing is checked
    twins = [f"{v}-eager" for v in variants if f"{v}-eager" in METHOD_TWINS]
    kept = [v for v in variants if v not in dropped] + twins or ["eager"]
    return ["--quick", "--batch-sizes", "2", "--variants", ",".join(kept)], (
        "--quick (a tiny SiT, patch-pixels encoder), B=2, fp32 on the CPU"
        + (f"; left out: {', '.join(dropped)} (a CPU torch.compile takes minutes)" if dropped else ""))


def kernels_args(dry):
    if not dry:
        return ["--ops", ",".join(KERNEL_OPS), "--shapes", "SiT-XL/2", "--modes", "fwd+bwd", "--batch-sizes", "32,128",
                "--dtype", "bf16", "--repeats", "30"], None
    return ["--ops", ",".join(KERNEL_OPS), "--quick", "--modes", "fwd+bwd", "--impls", "eager,triton"], (
        "--quick (tiny shape), B=2, fp32 on the CPU; compile rows left out (a CPU torch.compile takes minutes)")


def attention_args(dry):
    if not dry:
        return ["--batch-sizes", "32,64", "--dtype", "bf16", "--repeats", "20"], None
    return ["--quick"], "--quick (2 heads x 16 tokens x 72), B=2, fp32 on the CPU"


def pde_args(dry):
    if not dry:
        return ["--batch-sizes", "8", "--dtype", "bf16", "--repeats", "10", "--variants",
                "encoder,cached,salient-sdpa,salient-math,plain-sdpa"], None
    return ["--quick"], "--quick (a tiny PDE-DiT and ViViT), B=2, fp32 on the CPU; the compile rows skip"


def sample_args(dry):
    if not dry:
        return ["--model", "SiT-XL/2", "--batch-sizes", "256", "--dtype", "bf16", "--repeats", "3",
                "--validate-steps", "5", "--variants", ",".join(SAMPLE_VARIANTS)], None
    return ["--quick", "--validate-steps", "2", "--variants", "eager,cuda-graphs"], (
        "--quick (a tiny SiT), B=2, fp32; eager instead of compile (a CPU torch.compile takes minutes)")


def bench_step(suite, make_args):
    def fn(c, step, limit):
        args, changes = make_args(step["name"], c.dry)
        if changes:
            step["dry_run_changes"] = changes
        bench(c, step, limit, suite, args)
    return fn


step_train = bench_step("train", train_args)
step_kernels = bench_step("kernels", lambda name, dry: kernels_args(dry))
step_sample = bench_step("sample", lambda name, dry: sample_args(dry))
step_attention = bench_step("attention", lambda name, dry: attention_args(dry))
step_pde = bench_step("pde", lambda name, dry: pde_args(dry))


TINY_TRAIN = ["--preset", "demo", "--hidden-size", "64", "--depth", "2", "--num-heads", "2", "--encoder-depth", "1",
              "--projector-dim", "64", "--batch-size", "16", "--checkpointing-steps", "1", "--sampling-steps", "1000",
              "--sample-num-steps", "4", "--log-every", "1", "--num-workers", "0", "--report-to", "none",
              "--parallel", "fsdp", "--mixed-precision", "bf16", "--exp-name", "gpu-check"]


def step_torchrun(c, step, limit):
    res = step["results"]
    end = time.monotonic() + limit
    data, pack = c.work / "data" / "synthetic", c.work / "data" / "packed"
    make = ("import sys; from fastrepa.data import pack, synthetic; "
            f"synthetic.main(['--out', {str(data)!r}, '--num-images', '64']); "
            f"sys.exit(pack.main([{str(data)!r}, {str(pack)!r}, '--image-format', 'raw', '--workers', '0']))")
    rec, text = c.run(step, [c.python, "-c", make], max(5, end - time.monotonic()), "data")
    if rec["rc"] != 0:
        step["status"] = "timeout" if rec["timed_out"] else "failed"
        step["reason"] = "making the synthetic pack failed: " + " | ".join(tail(text, 3))
        return
    runs = c.work / "runs"
    exp = runs / "gpu-check"
    flags = [*TINY_TRAIN, "--data-dir", str(pack), "--output-dir", str(runs)]
    if c.dry:
        step["dry_run_changes"] = "CPU processes (gloo), fp32, no --compile (a CPU torch.compile takes minutes)"
    else:
        flags.append("--compile")
    runs_meta = c.work / "runs-meta"
    runs_meta.mkdir(exist_ok=True)
    res["runs"] = []
    for k, steps in ((1, 2), (2, 3)):
        argv = [c.python, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}", "train.py", *flags, "--max-train-steps", str(steps)]
        rec, text = c.run(step, argv, max(5, end - time.monotonic()), f"run{k}")
        info = {"run": k, "max_train_steps": steps, "rc": rec["rc"], "wall_s": rec["wall_s"],
                "timed_out": rec["timed_out"], "resumed": None}
        m = re.search(r"^resuming from (.*)$", text, re.M)
        info["resumed"] = m.group(1) if m else None
        ck = exp / "checkpoints"
        info["dcp_checkpoints"] = sorted(p.name for p in ck.glob("step-*") if (p / "COMMITTED").exists()) if ck.exists() else []
        info["exports"] = sorted(p.name for p in ck.glob("*.pt")) + sorted(p.name for p in ck.glob("*.safetensors")) if ck.exists() else []
        metrics = exp / "metrics.jsonl"
        if metrics.exists():
            rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
            info["metrics"] = [{k2: r.get(k2) for k2 in ("step", "loss", "proj_loss", "grad_norm", "images_per_s",
                                                          "peak_mem_gib") if k2 in r} for r in rows]
            shutil.copy(metrics, runs_meta / f"run{k}-metrics.jsonl")
        for name in ("report.json", "report.md", "config.json"):
            if (exp / name).exists():
                shutil.copy(exp / name, runs_meta / f"run{k}-{name}")
        if (exp / "report.json").exists():
            try:
                rep = json.loads((exp / "report.json").read_text())
                info["report"] = {k2: rep.get(k2) for k2 in ("resumed_from", "steps", "last_loss", "images_per_s",
                                                             "mfu", "peak_mem_gib", "wall_s") if k2 in rep}
            except ValueError:
                pass
        res["runs"].append(info)
        if rec["rc"] != 0:
            step["status"] = "timeout" if rec["timed_out"] else "failed"
            step["reason"] = f"run {k} (--max-train-steps {steps}) exited {rec['rc']}: " + " | ".join(tail(text, 3))
            return
    r1, r2 = res["runs"]
    problems = []
    if not {"step-000000001", "step-000000002"} <= set(r1["dcp_checkpoints"]):
        problems.append(f"run 1 left DCP checkpoints {r1['dcp_checkpoints']}, expected step-000000001 and step-000000002")
    if not r2["resumed"] or "step 2" not in r2["resumed"]:
        problems.append(f"run 2 did not say it resumed from step 2 (said: {r2['resumed']!r})")
    if "step-000000003" not in r2["dcp_checkpoints"]:
        problems.append("run 2 left no complete step-000000003")
    steps_logged = [m_.get("step") for m_ in r2.get("metrics", [])]
    if steps_logged and steps_logged[-1] != 3:
        problems.append(f"metrics.jsonl ends at step {steps_logged[-1]}, expected 3")
    if problems:
        step["status"], step["reason"] = "failed", "; ".join(problems)
    else:
        step["status"] = "ok"


def step_sync_test(c, step, limit):
    junit = c.work / "junit" / "sync-test.xml"
    junit.parent.mkdir(exist_ok=True)
    argv = [c.python, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={junit}", "-o", "addopts=",
            SYNC_TEST]
    rec, text = c.run(step, argv, limit)
    pytest_result(step, rec, text, junit)


STEPS = [  # name, title, budget on CUDA (s), function
    ("setup", "offline install, versions, optional packages", 25, step_setup),
    ("kernel-tests", "kernel tests compiled on CUDA (tests/test_kernel_*.py)", 45, step_kernel_tests),
    ("train-b64-core", "train suite B=64: official, compile+triton, sra", 85, step_train),
    ("train-b64-rest", "train suite B=64: eager+fused-adamw, irepa, erw-warmup", 85, step_train),
    ("train-b64-family", "train suite B=64: haste, haste-after-stop, reg", 60, step_train),
    ("train-b32", "train suite B=32: all four REPA variants", 35, step_train),
    ("kernels", "kernel suite: SiT-XL/2 shapes, B=32/128, bf16, fwd+bwd", 30, step_kernels),
    ("attention", "attention suite: each SDPA backend at head_dim 72, B=32/64, bf16, fwd+bwd", 15, step_attention),
    ("pde", "pde suite: fourierflow step, encoder vs cached tokens, salient attention, B=8, bf16", 20, step_pde),
    ("sample", "sample suite: SiT-XL/2, REPA protocol, B=256, compile vs CUDA graphs", 40, step_sample),
    ("torchrun", "torchrun train.py: FSDP2 + compile + bf16, DCP save, auto-resume", 40, step_torchrun),
    ("sync-test", "host syncs of a CUDA step (tests/test_train.py)", 20, step_sync_test),
]
DRY_STEP_BUDGET = 100  # each step's budget in a dry run


def plan_budgets(dry):
    return {name: (DRY_STEP_BUDGET if dry else budget) for name, _, budget, _ in STEPS}


# ------------------------------------------------------------------------------------------- driver

def main(argv=None):
    p = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--dry-run", action="store_true", help="the plumbing of every step on the CPU, reduced shapes")
    p.add_argument("--out", default=None, help="folder for the three files (default $OUT, else bench/results)")
    p.add_argument("--work-dir", default=None, help="scratch folder (default: a new temporary one, removed at the end)")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch folder (data, checkpoints, caches)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for the whole run (default {DEFAULT_BUDGET}; {DRY_BUDGET} with --dry-run)")
    p.add_argument("--steps", default=None, help="comma list of steps to run (default all; setup always runs)")
    p.add_argument("--install", choices=["auto", "pip", "shim", "none"], default="auto",
                   help="how to make fastrepa.kernels importable when it is not yet (default auto: pip, then the "
                        "sitecustomize shim; --dry-run never runs pip)")
    p.add_argument("--python", default=None, help="the Python that runs the steps (default: this one)")
    p.add_argument("--list", action="store_true", help="print the plan and exit")
    args = p.parse_args(argv)
    names = [s[0] for s in STEPS]
    chosen = names if not args.steps else ["setup"] + [n.strip() for n in args.steps.split(",") if n.strip() != "setup"]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        p.error(f"--steps: unknown step(s) {', '.join(unknown)}; known: {', '.join(names)}")
    budgets = plan_budgets(args.dry_run)
    if args.list:
        total = 0
        for name, title, _, _ in STEPS:
            total += budgets[name]
            print(f"{name:15s} {budgets[name]:4d} s  (by {total:4d} s)  {title}")
        return 0

    c = Check(args)
    c.fatal, c.cuda = None, False
    slot_end = c.t0  # each step's limit: the end of its slot, the budgets of it and the steps before it
    print(f"gpu check{' (DRY RUN, CPU)' if c.dry else ''}: {len(chosen)} steps, budget {c.budget:.0f} s, "
          f"results to {c.out}, work in {c.work}", flush=True)

    def on_signal(signum, frame):  # a kill from outside: stop the step, keep what was measured
        if c.child is not None:
            kill_group(c.child)
        c.record["interrupted"] = f"signal {signum} at {c.elapsed():.0f} s"
        c.write()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    for name, title, _, fn in STEPS:
        budget = budgets[name]
        if name not in chosen:
            continue
        slot_end += budget
        step = {"name": name, "title": title, "budget_s": budget, "status": None, "reason": None, "started": now_utc(),
                "wall_s": None, "limit_s": None, "commands": [], "results": {}, "notes": [],
                "cache_files_at_start": {k: count_files(c.work / "cache" / k) for k in ("inductor", "triton")}}
        c.record["steps"].append(step)
        deadline = min(slot_end, c.t0 + c.budget)
        c.deadline = lambda s, d=deadline: d
        limit = deadline - time.monotonic()
        t = time.monotonic()
        if c.fatal and name != "setup":
            step["status"], step["reason"] = "skipped", f"setup failed: {c.fatal}"
        elif limit < MIN_STEP_S:
            step["status"], step["reason"] = "skipped", (f"out of time: {max(limit, 0):.0f} s left in the budget "
                                                         f"({c.budget:.0f} s), at least {MIN_STEP_S} s needed")
        else:
            step["limit_s"] = round(limit, 1)
            print(f"[{c.elapsed():6.1f} s] {name}: {title} (limit {limit:.0f} s)", flush=True)
            try:
                fn(c, step, limit)
            except Exception as e:  # noqa: BLE001 - a bug in one step's bookkeeping must not lose the others
                step["status"], step["reason"] = "failed", f"gpu_check.py: {type(e).__name__}: {e}"
        step["wall_s"] = round(time.monotonic() - t, 1)
        if c.stem is None and (c.record.get("env") or c.fatal):
            c.choose_stem((c.record.get("env") or {}).get("device_slug", "unknown-device"))
        print(f"[{c.elapsed():6.1f} s] {name}: {step['status']} in {step['wall_s']} s"
              + (f": {step['reason']}" if step["reason"] else ""), flush=True)
        for line in step_digest(step):
            print("    " + line, flush=True)
        c.write()

    if c.stem is None:
        c.choose_stem("unknown-device")
    paths = c.write()
    print("\n" + render_summary(c.record, steps_last=True))
    print(f"wrote {paths['md']}\nwrote {paths['json']}\nwrote {paths['logs']}", flush=True)
    if c.own_work and not args.keep_work:
        shutil.rmtree(c.work, ignore_errors=True)
    bad = [s["name"] for s in c.record["steps"] if s["status"] in ("failed", "timeout")]
    return 1 if bad else 0


# ------------------------------------------------------------------------------------------ summary

def step_digest(step):
    """A few lines per step for the console (the summary has the tables)."""
    res = step["results"]
    if step["name"] in ("kernel-tests", "sync-test") and res.get("tests") is not None:
        return [f"{res['passed']} passed, {res['failed']} failed, {res['errors']} errors, {res['skipped']} skipped "
                f"({res['time_s']} s in tests)"] + [f"FAILED {f}" for f in res["failures"][:8]]
    if step.get("bench") is None and step.get("progress"):
        return step["progress"][-8:]
    return []


def _row_note(r):
    if not r or r.get("status") == "ok":
        return ""
    reason = str(r.get("reason") or "")
    return f"{r.get('status')}: " + (reason.split(":")[0] if r.get("status") == "skipped" else reason[:120])


def train_section(record):
    rows = []
    for s in record["steps"]:
        if s["name"].startswith("train") and s.get("bench"):
            rows += [dict(r, _step=s["name"]) for r in s["bench"]["rows"]]
    if not rows:
        return []

    def official(r):
        """The official row of the same B: from the same step (same process) if there is one, else any step."""
        same = [o for o in rows if o["variant"] == "official" and o["status"] == "ok" and o["B"] == r["B"]]
        return next((o for o in same if o["_step"] == r["_step"]), same[0] if same else None)

    order = ["official", "eager", "eager+fused-adamw", "compile", "compile+triton", "sra-eager", "sra",
             "irepa-eager", "irepa", "erw-warmup-eager", "erw-warmup"]
    out_rows = []
    for r in sorted(rows, key=lambda r: (-r["B"], order.index(r["variant"]) if r["variant"] in order else 9)):
        o = official(r)
        x_off = r["images_per_s"] / o["images_per_s"] if o and r["status"] == "ok" and r is not o else None
        mfu = r.get("mfu")
        out_rows.append([r["B"], r["variant"], r["_step"], r.get("autocast") or "", fmt(r.get("step_ms"), ".4g"),
                         rate(r.get("images_per_s")), rate(None if mfu is None else 100 * mfu),
                         fmt(r.get("peak_mem_gib"), ".1f"), fmt(x_off, ".2f"), fmt(r.get("speedup_vs_repa"), ".2f"),
                         fmt(r.get("first_call_s"), ".1f"),
                         fmt(r.get("first_loss"), ".5g"), _row_note(r)])
    first = rows[0]
    lines = [f"## Train step: {first['model']}, {first['dtype']}", "",
             md_table(["B", "variant", "step", "autocast", "ms/step", "img/s", "MFU %", "peak GiB", "x official",
                       "x REPA", "first call s", "first loss", "note"], out_rows), ""]
    target = TARGETS["train_x_official"]
    for B in sorted({r["B"] for r in rows}, reverse=True):
        for t in [r for r in rows if r["B"] == B and r["variant"] == "compile+triton" and r["status"] == "ok"]:
            o = official(t)
            if o:
                x = t["images_per_s"] / o["images_per_s"]
                lines.append(f"- B={B} ({t['_step']}): compile+triton / official = {x:.2f}x (target >= {target:g}x: "
                             f"{'met' if x >= target else 'MISSED'})")
    lines += ["- ms/step: median optimizer step (encoder, forward, backward, clip, sync, AdamW, EMA); first call s: "
              "the first step of the row (torch.compile + Triton JIT + allocation), not in ms/step. MFU against the "
              "data-sheet dense bf16 peak. official = fp16 autocast + GradScaler + foreach AdamW (upstream REPA); "
              "x official: over the official row of the same B, from the same step when it has one. sra = SRA "
              "(EMA teacher to block 20, no encoder) on the compile+triton path; x REPA: over the REPA row of the "
              "same path and B (the teacher's cost).", ""]
    return lines


def kernels_section(record, dry):
    s = next((s for s in record["steps"] if s["name"] == "kernels" and s.get("bench")), None)
    if not s:
        return []
    rows = s["bench"]["rows"]
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r["B"], r["mode"], r["model"]), {})[r["impl"]] = r
    out, verdicts = [], []
    for (op, B, mode, model), g in groups.items():
        t, e, cp = g.get("triton", {}), g.get("eager", {}), g.get("compile", {})
        xe, xc, roof = t.get("speedup_vs_eager"), t.get("speedup_vs_compile"), t.get("pct_roofline")
        verdict = ""
        if t.get("status") == "ok" and B >= TARGETS["kernel_min_batch"]:
            miss = [name for name, v, lim in (("x eager", xe, TARGETS["kernel_x_eager"]),
                                               ("x compile", xc, TARGETS["kernel_x_compile"]),
                                               ("% roof", roof, TARGETS["kernel_pct_roofline"])) if v is None or v < lim]
            verdict = "met" if not miss else "MISSED " + ", ".join(miss)
            verdicts.append((op, B, verdict))
        out.append([op, B, mode, fmt(t.get("median_ms"), ".4g") or t.get("status", ""), fmt(e.get("median_ms"), ".4g"),
                    fmt(cp.get("median_ms"), ".4g") or cp.get("status", ""), rate(t.get("GB_per_s")),
                    rate(t.get("pct_bandwidth")), rate(t.get("pct_roofline")), fmt(xe, ".2f"), fmt(xc, ".2f"),
                    fmt(t.get("first_call_s"), ".1f"), fmt(cp.get("first_call_s"), ".1f"),
                    verdict or _row_note(t)])
    model = rows[0]["model"] if rows else ""
    lines = [f"## Kernels: {model}, {rows[0]['dtype'] if rows else ''}", "",
             md_table(["op", "B", "mode", "triton ms", "eager ms", "compile ms", "triton GB/s", "% BW", "% roof",
                       "x eager", "x compile", "triton JIT s", "compile s", "targets"], out), ""]
    lines.append(f"- targets at B >= {TARGETS['kernel_min_batch']}: x eager >= {TARGETS['kernel_x_eager']:g}, x compile >= "
                 f"{TARGETS['kernel_x_compile']:g}, % roof >= {TARGETS['kernel_pct_roofline']:g} (% roof = roofline time / "
                 "time: the bandwidth probe for memory-bound ops, the matmul probe where FLOPs bound, the projector)."
                 + (" Dry run: no Triton rows on the CPU." if dry else ""))
    lines.append("")
    return lines


def attention_section(record):
    s = next((s for s in record["steps"] if s["name"] == "attention" and s.get("bench")), None)
    if not s:
        return []
    rows, sh = s["bench"]["rows"], s["bench"].get("shape") or {}
    lines = [f"## Attention: SDPA backends at H x T x hd = {sh.get('heads')} x {sh.get('tokens')} x {sh.get('head_dim')}, "
             "fwd+bwd ms (TFLOP/s, max |err| vs fp32)", ""]
    for B in sorted({r["B"] for r in rows}):
        mine = [r for r in rows if r["B"] == B]
        ok = [f"{r['backend']} {fmt(r['ms'], '.4g')} ({rate(r.get('TFLOP_per_s'))}, {fmt(r.get('max_abs_err'), '.2g')})"
              for r in mine if r["status"] == "ok"]
        other = [f"{r['backend']} {r['status']}" for r in mine if r["status"] != "ok"]
        auto = next((r for r in mine if r["backend"] == "auto"), {})
        lines.append(f"- B={B}: " + "; ".join(ok) + (f"; auto runs {'/'.join(auto.get('auto_is') or ['?'])}")
                     + (f"; not run: {', '.join(other)}" if other else ""))
    return lines + [""]


def sample_section(record):
    s = next((s for s in record["steps"] if s["name"] == "sample" and s.get("bench")), None)
    if not s:
        return []
    rows = s["bench"]["rows"]
    out = []
    for r in rows:
        h = r.get("wall_50k_h") or {}
        val = (r.get("validate") or {}).get("measured_over_estimate")
        out.append([r["B"], r["variant"], fmt(r.get("step_ms_cfg"), ".4g"), fmt(r.get("step_ms"), ".4g"),
                    rate(r.get("images_per_s_estimate")), rate(h.get("1")), rate(h.get("8")),
                    fmt(r.get("first_call_s"), ".1f"), "" if r.get("cudagraph_skips") is None else r["cudagraph_skips"],
                    fmt(val, ".2f"), _row_note(r)])
    lines = [f"## Sampling: {s['bench'].get('model')}, REPA protocol (SDE 250 steps, CFG 1.8 on [0, 0.7])", "",
             md_table(["B", "variant", "ms/step CFG (2B)", "ms/step (B)", "img/s (est.)", "50K h x1", "50K h x8",
                       "compile s", "graphs not captured", "run/est", "note"], out), ""]
    c = {r["variant"]: r for r in rows if r["status"] == "ok"}
    if "compile" in c and "cuda-graphs" in c:
        lines.append(f"- CUDA graphs / compile: {c['cuda-graphs']['images_per_s_estimate'] / c['compile']['images_per_s_estimate']:.2f}x img/s")
    lines += ["- img/s and 50K hours are estimates from the per-step medians (78 plain + 172 CFG steps per batch; no "
              "VAE decode, Inception or I/O); run/est checks them against one whole sample_batch.", ""]
    return lines


def dist_section(record):
    lines = []
    t = next((s for s in record["steps"] if s["name"] == "torchrun"), None)
    if t and t["results"].get("runs"):
        lines += ["## torchrun train.py (1 process, FSDP2" + ("" if record["dry_run"] else " + compile") + " + bf16)", ""]
        for r in t["results"]["runs"]:
            last = (r.get("metrics") or [{}])[-1]
            lines.append(f"- run {r['run']} (--max-train-steps {r['max_train_steps']}): exit {r['rc']} in {r['wall_s']} s; "
                         f"resumed: {r['resumed'] or 'no'}; complete DCP checkpoints: {', '.join(r['dcp_checkpoints']) or 'none'}; "
                         f"exports: {', '.join(r['exports']) or 'none'}; last metrics row: "
                         + ", ".join(f"{k}={fmt(v, '.4g')}" for k, v in last.items()))
        lines.append("")
    s = next((s for s in record["steps"] if s["name"] == "sync-test"), None)
    if s and s["status"]:
        lines += [f"- host-sync test ({SYNC_TEST}): {s['status']}" + (f" ({s['reason']})" if s["reason"] else ""), ""]
    return lines


def render_summary(record, steps_last: bool = False):
    """The one-page summary; steps_last puts the header and the Steps table at the end (the console copy: a
    device tool returns only the last 12,000 characters of the output)."""
    env = record.get("env") or {}
    benv = env.get("bench_env") or {}
    dry = record["dry_run"]
    title = env.get("device_name", "unknown device")
    out = [f"# fastrepa GPU check: {title}, {record['started'][:10]}" + (" (DRY RUN on the CPU)" if dry else ""), ""]
    if dry:
        out += ["**Dry run**: the plumbing of every step with reduced shapes on the CPU (no CUDA, no torch.compile); "
                "no figure below is a GPU measurement.", ""]
    smi = record.get("nvidia_smi") or {}
    gpu = (f"{benv.get('gpu_model')}, sm {benv.get('gpu_capability')}, {benv.get('gpu_sm_count')} SMs, "
           f"{benv.get('gpu_memory_GiB')} GiB" if benv.get("gpu_model") else "no GPU")
    git = record.get("git") or {}
    out += [f"- command: `{record['command']}`",
            f"- started {record['started']}, {record.get('wall_s', 0):.0f} s of a {record['budget_s']:.0f} s budget",
            f"- device: {gpu}; driver {benv.get('driver') or '-'}; CPU {benv.get('cpu_model', '-')} "
            f"({benv.get('cpu_threads', '-')} threads)",
            f"- versions: torch {env.get('torch', '-')} (CUDA {env.get('cuda_build') or '-'}, cuDNN {benv.get('cudnn') or '-'}), "
            f"triton {env.get('triton') or '-'}, timm {env.get('timm') or '-'}, numpy {env.get('numpy') or '-'}, "
            f"python {env.get('python', '-')}",
            f"- git: {git.get('commit') or '-'}" + (" (with uncommitted changes)" if git.get("dirty") else ""),
            f"- install: {(record.get('install') or {}).get('method') or 'FAILED'}"]
    if smi.get("csv"):
        out.append(f"- nvidia-smi at start: {' / '.join(smi['csv'][-1:])} ({smi['csv'][0]})")
    probes = next((s["bench"] for s in record["steps"] if s.get("bench")), None)
    if probes:
        bw, mm = probes.get("bandwidth") or {}, probes.get("matmul") or {}
        out.append(f"- probes (first bench step): bandwidth {rate(bw.get('GB_per_s'))} GB/s ({bw.get('method') or bw.get('error')}), "
                   f"matmul {rate(mm.get('TFLOP_per_s'))} TFLOP/s ({mm.get('method') or mm.get('error')})")
    missing = env.get("optional_missing") or {}
    if missing:
        out.append("- optional packages absent: " + "; ".join(f"{v['package']} ({v['effect']})" for v in missing.values()))
    out += ["", "## Steps", ""]
    rows = []
    for s in record["steps"]:
        r = s["results"]
        if s["name"] in ("kernel-tests", "sync-test") and r.get("tests") is not None:
            what = f"{r['passed']} passed, {r['failed']} failed, {r['errors']} errors, {r['skipped']} skipped"
        elif s.get("bench"):
            what = f"{r.get('rows_ok', 0)} rows ok, {r.get('rows_skipped', 0)} skipped, {r.get('rows_error', 0)} failed"
        elif s["name"] == "setup":
            what = r.get("install", "")
        elif s["name"] == "torchrun" and r.get("runs"):
            what = "; ".join(f"run {x['run']}: exit {x['rc']}, {x['wall_s']} s" for x in r["runs"])
        else:
            what = ""
        cache = s.get("cache_files_at_start") or {}
        rows.append([s["name"], s["status"] or "", fmt(s.get("wall_s"), ".1f"), fmt(s.get("limit_s"), ".0f"),
                     f"{cache.get('inductor', 0)}/{cache.get('triton', 0)}", what, (s.get("reason") or "")[:220]])
    out += [md_table(["step", "status", "wall s", "limit s", "caches at start", "result", "reason"], rows), "",
            "- caches at start: files in the inductor / Triton caches when the step began (0/0: everything it "
            "compiled, it compiled cold)."]
    out += [f"- dry run, {s['name']}: {s['dry_run_changes']}" for s in record["steps"] if s.get("dry_run_changes")]
    out += [f"- {s['name']}: {n}" for s in record["steps"] for n in s.get("notes", [])]
    out.append("")
    head, out = out, []
    out += train_section(record) + kernels_section(record, dry) + attention_section(record) + pde_section(record)
    out += sample_section(record)
    out += dist_section(record)
    fails = [s for s in record["steps"] if s["name"] in ("kernel-tests", "sync-test") and s["results"].get("failures")]
    for s in fails:
        out += [f"## {s['name']}: failures", ""] + [f"- {f}" for f in s["results"]["failures"][:20]] + [""]
    cut = [s for s in record["steps"] if s["status"] == "timeout" and s.get("progress")]
    for s in cut:
        out += [f"## {s['name']}: rows printed before the time limit", "", "```"] + s["progress"][-20:] + ["```", ""]
    out += ["How to read this: README.md, \"Measuring on a GPU\". Every number comes from this run; the JSON file of "
            "the same name holds every field and every command, the -logs.tar.gz every log."]
    return "\n".join(out + [""] + head if steps_last else head + out).rstrip() + "\n"


def pde_section(record):
    s = next((s for s in record["steps"] if s["name"] == "pde" and s.get("bench")), None)
    if s is None or not (s["bench"].get("table") or {}).get("rows"):
        return []
    t = s["bench"]["table"]
    return [f"## PDE (FourierFlow): {s['bench'].get('model_name')}, encoder vs cached tokens, salient attention", "",
            md_table(t["headers"], t["rows"]), ""]


if __name__ == "__main__":
    sys.exit(main())
