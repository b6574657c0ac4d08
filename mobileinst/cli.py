"""The `mobileinst` command: one verb per job, each a thin layer over the Python API.

A user-facing problem (bad file, bad option) raises MobileInstError deep inside; here it becomes
one line on stderr and exit code 2, never a stack trace.
"""
from __future__ import annotations

import argparse
import sys

from .errors import MobileInstError


def cmd_info(args: argparse.Namespace) -> None:
    from .profile import summarize
    from .registry import build_model, get_config
    get_config(args.model)  # clear error for an unknown name before building anything
    model = build_model(args.model, num_classes=args.num_classes)
    print(summarize(model, tuple(args.imgsz) if len(args.imgsz) == 2 else args.imgsz[0]).format())


def cmd_models(args: argparse.Namespace) -> None:
    from .registry import MODELS
    for name, cfg in MODELS.items():
        print(f"{name:<34} backbone={cfg.backbone:<12} D={cfg.mask_dim} conv={cfg.fusion_conv} "
              f"hidden={cfg.hidden_dim}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mobileinst", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the registered model variants")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("info", help="parameters and GFLOPs of a variant, per part")
    p.add_argument("model", help="variant name (see `mobileinst models`)")
    p.add_argument("--imgsz", type=int, nargs="+", default=[640], help="S or H W (default 640)")
    p.add_argument("--num-classes", type=int, default=80)
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MobileInstError as e:
        print(f"mobileinst {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mobileinst {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
