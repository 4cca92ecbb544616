"""Shared pieces of the benchmark suites: the run context, timing, probes, environment, results files.

Timing (docs/design.md, "Performance discipline"): the median of `repeats` timed calls after a warm-up.
- CUDA: one pair of CUDA events around each call, the L2 cache flushed (a 256 MiB memset) and the
  gradients of the given leaves reset to None before each call, as `triton.testing.do_bench` does, but
  with a fixed count of repeats (`--repeats`) instead of a time budget. As with do_bench, a call whose
  host-side launches take longer than its GPU work is timed with that launch overhead included.
- CPU: `time.perf_counter` around each call, gradients reset before each call.

Probes (measured in the same run, once, lazily):
- bandwidth: a large copy within the device memory (1 GiB on CUDA), counted as read + write bytes;
  the memory-bandwidth roofline of every row;
- matmul: a square matmul in the run's dtype (8192 on CUDA); the compute roofline of rows that have a
  FLOP model (the projector).
"""
import datetime as _dt
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastrepa.io import json_safe, write_text

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SCHEMA = "fastrepa-bench/1"
L2_FLUSH_BYTES = 256 * 2**20


class BenchUsageError(ValueError):
    """A suite refused its arguments (e.g. an unknown op name): run.py turns it into a usage error."""


def parse_names(arg, known, suite, flag="--variants"):
    """The names of a comma list flag (all of `known` when empty); a BenchUsageError naming the unknown ones."""
    if not arg:
        return list(known)
    names = [n.strip() for n in arg.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BenchUsageError(f"{flag}: unknown variant(s) {', '.join(unknown)}; the {suite} suite knows: "
                              f"{', '.join(known)}")
    return names


def triton_skip_reason():
    """Why Triton kernels cannot be timed in this process, or None."""
    from fastrepa.kernels import _dispatch
    if _dispatch.interpreting():
        return "TRITON_INTERPRET is set: the interpreter measures nothing real"
    if not _dispatch.HAS_TRITON:
        return "the triton package is not installed"
    return None


# ----------------------------------------------------------------------------------------- timing

def _reset_grads(leaves):
    for t in leaves:
        t.grad = None


def median_ms(fn, device, repeats, warmup, leaves=()):
    """Median wall time of fn() in milliseconds (see the module docstring for the method)."""
    return statistics.median(time_calls(fn, device, repeats, warmup, leaves))


def time_calls(fn, device, repeats, warmup, leaves=()):
    """Wall times of `repeats` calls of fn() in milliseconds, after `warmup` untimed calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(max(warmup, 0)):
        _reset_grads(leaves)
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for i in range(repeats):
            _reset_grads(leaves)
            flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        del flush
    else:
        times = []
        for _ in range(repeats):
            _reset_grads(leaves)
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def timer_description(device, repeats, warmup):
    if device.type == "cuda":
        return (f"CUDA events, median of {repeats} calls after {warmup} warm-up calls; L2 flushed "
                f"({L2_FLUSH_BYTES >> 20} MiB memset) and grads reset to None before each call")
    return f"time.perf_counter, median of {repeats} calls after {warmup} warm-up calls; grads reset before each call"


# ------------------------------------------------------------------------------------------- rows

def short_error(e: BaseException) -> str:
    """An exception as one short line for a results row."""
    return f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]


def free_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_row(rows, row, reason, measure, label, summary, cleanup=None):
    """Fill `row` and append it to `rows`: status "skipped" with `reason` when one is given; else
    row.update(measure()) (status "ok" unless measure says otherwise), or status "error" with the exception
    when it raises, since one failing row (OOM, a compile error) must not stop the suite. `cleanup()` runs
    after the measurement either way; one line `label: summary(row)` (or the status and reason) is printed
    with the seconds taken."""
    if reason:
        row.update(status="skipped", reason=reason)
        rows.append(row)
        return row
    t0 = time.perf_counter()
    try:
        row.update({"status": "ok", **measure()})
    except Exception as e:  # noqa: BLE001 - reported in the row
        row.update(status="error", reason=short_error(e))
    finally:
        if cleanup is not None:
            cleanup()
    rows.append(row)
    said = summary(row) if row["status"] == "ok" else f"{row['status']}: {row['reason']}"
    print(f"{label}: {said} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return row


# ----------------------------------------------------------------------------------------- probes

def bandwidth_probe(device, nbytes, repeats, warmup):
    """Device memory bandwidth from a copy of `nbytes` bytes: GB/s = 2 * nbytes / time (read + write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, repeats, warmup)
    del src, dst
    return {"method": f"copy of {nbytes / 2**20:.0f} MiB within {device.type} memory, read + write bytes counted",
            "bytes": nbytes, "moved_bytes": 2 * nbytes, "median_ms": ms,
            "GB_per_s": 2 * nbytes / (ms * 1e-3) / 1e9}


def matmul_probe(device, dtype, n, repeats, warmup):
    """Matmul throughput of an n x n x n product in `dtype`: TFLOP/s = 2 n^3 / time."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, device, repeats, warmup)
    del a, b
    return {"method": f"{n}x{n}x{n} matmul in {str(dtype).replace('torch.', '')}", "n": n,
            "median_ms": ms, "TFLOP_per_s": 2 * n**3 / (ms * 1e-3) / 1e12}


# ------------------------------------------------------------------------------------ environment

def _cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _git_commit():
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return {"commit": sha or None, "dirty": bool(dirty)} if sha else None
    except (OSError, subprocess.SubprocessError):
        return None


def _driver_version():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device):
    """What a reader needs to reproduce or compare a row: machine, versions, settings."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device": device.type,
        "cpu_model": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "gpu_model": None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "platform": platform.platform(),
        "git": _git_commit(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        # other work on the machine skews CPU timings (and host launch overhead on GPU runs)
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update({
            "gpu_model": torch.cuda.get_device_name(device),
            "gpu_memory_GiB": round(p.total_memory / 2**30, 1),
            "gpu_sm_count": p.multi_processor_count,
            "gpu_capability": f"{p.major}.{p.minor}",
            "cudnn": torch.backends.cudnn.version(),
            "driver": _driver_version(),
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        })
    env["device_name"] = env["gpu_model"] if device.type == "cuda" else f"CPU: {env['cpu_model']}"
    return env


def slugify(text, max_len=48):
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    text = re.sub(r"[^a-z0-9]+", "-", text).strip("-")
    return text[:max_len].rstrip("-") or "unknown"


def device_slug(env):
    if env["device"] == "cuda":
        return slugify(env["gpu_model"])
    return "cpu-" + slugify(env["cpu_model"], max_len=40)


def today_utc():
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")


def now_utc():
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def command_line(argv=None):
    argv = sys.argv if argv is None else argv
    return shlex.join(["python", *argv])


# ------------------------------------------------------------------------------------ run context

class Context:
    """What a suite gets: device, dtype, repeat counts, the environment, the probes (measured once)."""

    def __init__(self, args, device):
        self.args = args
        self.device = device
        self.quick = bool(args.quick)
        self.dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
        self.dtype = DTYPES[self.dtype_name]
        on_cuda = device.type == "cuda"
        default_repeats = 3 if self.quick else (100 if on_cuda else 5)
        self.repeats = args.repeats or default_repeats
        self.warmup = 1 if self.quick else (10 if on_cuda else 2)
        self.env = environment(device)
        self._bandwidth = None
        self._matmul = None

    def time_ms(self, fn, leaves=()):
        """(median, min, max) in milliseconds over the run's repeats."""
        times = time_calls(fn, self.device, self.repeats, self.warmup, leaves)
        return statistics.median(times), min(times), max(times)

    def timer(self):
        return timer_description(self.device, self.repeats, self.warmup)

    def bandwidth(self):
        if self._bandwidth is None:
            if self.device.type == "cuda":
                nbytes, reps = 2**30, 20
            else:
                nbytes, reps = (32 if self.quick else 256) * 2**20, (3 if self.quick else 5)
            try:
                self._bandwidth = bandwidth_probe(self.device, nbytes, reps, warmup=2)
            except Exception as e:  # noqa: BLE001 - a failed probe is reported, not fatal
                self._bandwidth = {"error": f"{type(e).__name__}: {e}", "GB_per_s": None}
        return self._bandwidth

    def matmul(self):
        if self._matmul is None:
            n = 8192 if self.device.type == "cuda" else (256 if self.quick else 1024)
            try:
                self._matmul = matmul_probe(self.device, self.dtype, n, repeats=3 if self.quick else 10,
                                            warmup=2)
            except Exception as e:  # noqa: BLE001
                self._matmul = {"error": f"{type(e).__name__}: {e}", "TFLOP_per_s": None}
        return self._matmul


# ---------------------------------------------------------------------------------------- tables

def format_table(headers, rows):
    """A Markdown table with padded columns (readable both printed and rendered)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def fmt(value, spec):
    return "" if value is None else format(value, spec)


def num(value):
    """A rate for a table cell: one decimal from 10 up, three significant digits below."""
    if value is None:
        return ""
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"


def suite_header_lines(name, result):
    """The lines above a suite's table: command, machine, versions, probes, shape caveats."""
    env = result["env"]
    versions = (f"torch {env['torch']}, triton {env['triton'] or '-'}, python {env['python']}, "
                f"CUDA {env['cuda_build'] or '-'}" + (f" (driver {env['driver']})" if env.get("driver") else ""))
    lines = [f"- command: `{result['command']}`",
             f"- date: {result['started']} to {result['finished']}",
             f"- device: {env['device_name']} (CPU: {env['cpu_model']}, {env['cpu_threads']} threads, load {env.get('load_avg_1min')}"
             + (f"; GPU: {env['gpu_model']}, {env.get('gpu_memory_GiB')} GiB, sm {env.get('gpu_capability')}"
                if env.get("gpu_model") else "") + ")",
             f"- versions: {versions}"]
    if env.get("git"):
        lines.append(f"- git: {env['git']['commit']}" + (" (with uncommitted changes)" if env["git"]["dirty"] else ""))
    if result.get("dtype"):
        lines.append(f"- dtype: {result['dtype']}")
    if result.get("timer"):
        lines.append(f"- timer: {result['timer']}")
    bw = result.get("bandwidth")
    if bw:
        lines.append(f"- bandwidth probe: {num(bw.get('GB_per_s'))} GB/s ({bw.get('method') or bw.get('error')})")
    mm = result.get("matmul")
    if mm:
        lines.append(f"- matmul probe: {num(mm.get('TFLOP_per_s'))} TFLOP/s ({mm.get('method') or mm.get('error')})")
    if result.get("reduced"):
        lines.append(f"- REDUCED SHAPES: {result.get('reduced_reason')}")
    return lines


def render_markdown(doc):
    out = [f"# fastrepa benchmarks: {doc['device_name']}, {doc['date']}", "",
           "Written by `bench/run.py`; the JSON file of the same name holds every field. "
           "Times are medians in milliseconds; a row that did not run says why.", ""]
    for name, result in doc["suites"].items():
        out += [f"## suite `{name}`", ""] + suite_header_lines(name, result) + [""]
        table = result.get("table")
        if table and table["rows"]:
            out += [format_table(table["headers"], table["rows"]), ""]
        for note in result.get("notes", []):
            out.append(f"- {note}")
        if result.get("notes"):
            out.append("")
        for section, body in result.get("appendix", {}).items():
            out += [f"### {section}", ""] + list(body) + [""]
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------------------------- results files

def write_results(out_dir, slug, date, device_name, env, suites):
    """Write <slug>-<date>.json/.md under out_dir; return (json_path, md_path).

    An existing file of that name from the same device that holds none of these suites gets them added
    (merge by suite); a file that already holds one of them, or that cannot be read, is left alone and the
    name gets a suffix (-2, -3, ...). Nothing already written is overwritten.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(1, 1000):
        stem = f"{slug}-{date}" + ("" if i == 1 else f"-{i}")
        jpath, mpath = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
        if not jpath.exists():
            if mpath.exists():
                continue
            doc = {"schema": SCHEMA, "device_slug": slug, "device_name": device_name, "date": date,
                   "env": env, "suites": {}}
        else:
            try:
                doc = json.loads(jpath.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if (doc.get("schema") != SCHEMA or doc.get("device_slug") != slug
                    or any(name in doc.get("suites", {}) for name in suites)):
                continue
        doc["suites"].update(json_safe(suites))
        write_text(jpath, json.dumps(doc, indent=1, allow_nan=False) + "\n")
        write_text(mpath, render_markdown(doc))
        return jpath, mpath
    raise RuntimeError(f"no free results file name for {slug}-{date} in {out_dir}")
