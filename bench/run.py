"""fastrepa benchmarks: `python bench/run.py [--suite kernels|train|sample|data|attention|pde|all] [--quick] ...`

Runs the chosen suites on this machine (CUDA when available, else the CPU), prints a table per suite
and writes bench/results/<device>-<date>.json and .md (see bench/results/README.md).

Suites live in SUITES, a dict name -> run(args, ctx) -> result dict; a new suite joins by adding one
entry. PLANNED names the suites that are not built yet, so asking for them says so instead of failing
obscurely.
"""
import argparse
import os
import sys
from pathlib import Path

# Before torch starts its OpenMP pool: on the CPU, torch.compile's generated kernels bring a second
# OpenMP runtime, and two pools spin-waiting on the same cores made compiled train steps 20-40x slower
# than eager here (612 vs 11 ms, --suite train --quick). Passive waiting removes that; a GPU run is
# unaffected. An explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))  # the sibling modules (common, *_suite), also from a fresh clone

import torch  # noqa: E402

import common  # noqa: E402
import kernels_suite  # noqa: E402
import sample_suite  # noqa: E402
import train_suite  # noqa: E402
import data_suite  # noqa: E402
import attention_suite  # noqa: E402
import pde_suite  # noqa: E402

SUITES = {
    "kernels": kernels_suite.run,
    "sample": sample_suite.run,
    "train": train_suite.run,
    "data": data_suite.run,
    "attention": attention_suite.run,
    "pde": pde_suite.run,
}
PLANNED = {}  # name -> why it is not built yet (none today)
# Fields run.py adds to every suite's result unless the suite set them itself (the sample suite times
# multi-step calls with its own repeat counts).
SUITE_MAY_SET = ("repeats", "warmup", "timer")
CHOICES = [*SUITES, *[p for p in PLANNED if p not in SUITES], "all"]


def _batch_sizes(text):
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers such as 32,128, got {text!r}")
    if not sizes or any(b < 1 for b in sizes):
        raise argparse.ArgumentTypeError(f"expected positive batch sizes such as 32,128, got {text!r}")
    return sizes


def _int_at_least(low, what):
    def parse(text):
        try:
            n = int(text)
        except ValueError:
            n = low - 1
        if n < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return n
    return parse


_positive = _int_at_least(1, "a positive integer")
_non_negative = _int_at_least(0, "an integer >= 0")


def build_parser():
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="kernels", choices=CHOICES,
                   help="which benchmark suite to run (default kernels); 'all' runs every suite built so far")
    p.add_argument("--out", default=str(BENCH_DIR / "results"),
                   help="directory for <device>-<date>.json/.md (default bench/results)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes and few repeats: checks that the bench runs, measures nothing useful")
    p.add_argument("--ops", default=None,
                   help=f"comma list of kernel ops to run (default all: {','.join(kernels_suite.OPS)})")
    p.add_argument("--shapes", default=None,
                   help="kernel suite: comma list of model shapes (default all: "
                        f"{','.join(s.name for s in kernels_suite.FULL_SHAPES)}; --quick uses a tiny one)")
    p.add_argument("--modes", default=None,
                   help=f"kernel suite: comma list of modes (default all: {','.join(kernels_suite.MODES)})")
    p.add_argument("--impls", default=None,
                   help=f"kernel suite: comma list of implementations (default all: {','.join(kernels_suite.IMPLS)})")
    p.add_argument("--batch-sizes", type=_batch_sizes, default=None,
                   help="comma list of batch sizes (kernels: default 32,128 on CUDA, 1 on the CPU; train: default "
                        f"{','.join(map(str, train_suite.CUDA_BATCH_SIZES))} on CUDA, 2 on the CPU; sample: "
                        f"default {','.join(map(str, sample_suite.CUDA_BATCH_SIZES))} on CUDA, "
                        f"{','.join(map(str, sample_suite.CPU_BATCH_SIZES))} on the CPU; 2 with --quick)")
    p.add_argument("--model", default=None,
                   help=f"sample and train suites: the model, random weights (default {sample_suite.CUDA_MODEL} on "
                        f"CUDA, {sample_suite.CPU_MODEL} on the CPU; --quick shrinks it to a tiny width)")
    p.add_argument("--variants", default=None,
                   help=f"sample / train / pde suite: comma list of variants (default all; sample: "
                        f"{','.join(sample_suite.VARIANTS)}; train: {','.join(train_suite.VARIANTS)}; pde: "
                        f"{','.join(pde_suite.parse_variants(None))})")
    p.add_argument("--workers", type=_positive, default=None,
                   help="data suite: DataLoader worker processes / DALI threads (default min(8, CPU count))")
    p.add_argument("--enc-type", default=None,
                   help=f"train suite: the REPA encoder, random weights (default {train_suite.CUDA_ENCODER} on CUDA, "
                        f"{train_suite.CPU_ENCODER} on the CPU, {train_suite.QUICK_ENCODER} with --quick)")
    p.add_argument("--validate-steps", type=_non_negative, default=None,
                   help="sample suite: steps of the whole sample_batch run that checks the estimate (default 25 "
                        "on CUDA, 10 on the CPU, 3 with --quick; 250 = the full protocol; 0 = skip it)")
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default=None,
                   help="data type of the inputs (default bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--repeats", type=_positive, default=None,
                   help="timed calls per row, the median is reported (kernels: default 100 on CUDA, 5 on the "
                        "CPU; sample: 10 on CUDA, 3 on the CPU; 3 with --quick)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="CPU threads for torch (default: torch's own choice); 1 gives steadier CPU timings "
                        "on a machine that other work shares")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.suite == "all":
        names = list(SUITES)
        skipped = [f"{n} ({PLANNED[n]})" for n in PLANNED if n not in SUITES]
    elif args.suite in SUITES:
        names, skipped = [args.suite], []
    else:
        parser.error(f"suite {args.suite!r} is not built yet ({PLANNED[args.suite]}); suites available now: "
                     f"{', '.join(SUITES)} (or --suite all)")

    for name, check in (("kernels", kernels_suite.check_args), ("sample", sample_suite.check_args),
                        ("train", train_suite.check_args),
                        ("pde", lambda a: pde_suite.parse_variants(a.variants if a.suite == "pde" else None))):
        if name in names:  # usage errors before any suite has run
            try:
                check(args)
            except common.BenchUsageError as e:
                parser.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = common.Context(args, device)
    command = common.command_line([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    env = ctx.env
    print(f"fastrepa bench on {env['device_name']}: torch {env['torch']}, triton {env['triton']}, "
          f"python {env['python']}, CUDA {env['cuda_build']}; dtype {ctx.dtype_name}", flush=True)
    if skipped:
        print(f"suites not built yet, skipped: {'; '.join(skipped)}", flush=True)

    results = {}
    for name in names:
        started = common.now_utc()
        try:
            result = SUITES[name](args, ctx)
        except common.BenchUsageError as e:
            parser.error(str(e))
        fields = {
            "suite": name, "command": command, "argv": sys.argv if argv is None else [sys.argv[0], *argv],
            "python_executable": sys.executable, "started": started, "finished": common.now_utc(),
            "env": env, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "dtype": ctx.dtype_name,
            "quick": ctx.quick, "repeats": ctx.repeats,
            "warmup": ctx.warmup, "timer": ctx.timer(), "bandwidth": ctx.bandwidth(), "matmul": ctx.matmul(),
        }
        result.update({k: v for k, v in fields.items() if not (k in SUITE_MAY_SET and k in result)})
        if skipped:
            result["skipped_suites"] = skipped
        results[name] = result
        print(f"\n## suite {name}\n" + "\n".join(common.suite_header_lines(name, result)) + "\n")
        if result["table"]["rows"]:
            print(common.format_table(result["table"]["headers"], result["table"]["rows"]))
        for note in result.get("notes", []):
            print(f"- {note}")
        errors = sum(r.get("status") == "error" for r in result.get("rows", []))
        if errors:
            print(f"- {errors} row(s) failed; their reasons are in the JSON file")

    slug, date = common.device_slug(env), common.today_utc()
    jpath, mpath = common.write_results(args.out, slug, date, env["device_name"], env, results)
    print(f"\nwrote {jpath}\nwrote {mpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
