"""The ``gradwatch`` command line; each sub-command calls the public API."""

from __future__ import annotations

import argparse
import sys


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expects a positive int, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradwatch", description="Find vanishing and exploding gradients.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a vanishing deep tanh MLP and its healthy twin under a watch")
    demo.add_argument("--out", default="runs", help="directory for the run stores (default: runs)")
    demo.add_argument("--steps", type=_positive_int, default=300, help="training steps per set-up (default: 300)")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from gradwatch.demo import run_demo

        run_demo(args.out, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
