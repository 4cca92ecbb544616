"""Train a REPA-family SiT. Flags follow the official REPA train.py (see `python train.py --help`).

    python train.py --preset demo                       # the embedded demo (CPU or GPU, minutes)
    python train.py --model SiT-XL/2 --enc-type dinov2-vit-b --exp-name run --data-dir data/imagenet256
"""
import json
import sys

from fastrepa.config import ConfigError, build_parser, from_args, to_flat


def main(argv=None) -> int:
    parser = build_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    try:
        cfg = from_args(args)
    except ConfigError as e:
        parser.error(str(e))
    from fastrepa.train import train  # heavy imports after the flags are known to be good

    print(json.dumps(to_flat(cfg), indent=None))
    report = train(cfg)
    print("\n".join(f"{k}: {v}" for k, v in report.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
