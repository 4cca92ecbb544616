"""Train a REPA-family SiT. Flags follow the official REPA train.py (see `python train.py --help`).

    python train.py --preset demo                       # the embedded demo (CPU or GPU, minutes)
    python train.py --model SiT-XL/2 --enc-type dinov2-vit-b --exp-name run --data-dir data/imagenet256
    torchrun --nproc_per_node=8 train.py --model SiT-XL/2 ... # FSDP2 (default) / --parallel ddp
"""
import json
import os
import sys

from fastrepa.config import ConfigError, build_parser, from_args, to_flat


def main(argv=None) -> int:
    parser = build_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    try:
        cfg = from_args(args)
    except ConfigError as e:
        parser.error(str(e))
    from fastrepa.distributed import teardown
    from fastrepa.train import NonFiniteError, train  # heavy imports after the flags are known to be good

    rank0 = int(os.environ.get("RANK", "0")) == 0
    if cfg.dry_run:
        train(cfg)  # prints the config and the counts
        return 0
    if rank0:
        print(json.dumps(to_flat(cfg), indent=None), flush=True)
    try:
        report = train(cfg)
    except NonFiniteError as e:  # every rank agrees; the good weights are checkpointed
        if rank0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        teardown()
    if rank0:
        print("\n".join(f"{k}: {v}" for k, v in report.items()), flush=True)
    return 0


if __name__ == "__main__":
    from fastrepa.distributed import exit_process
    exit_process(main())
