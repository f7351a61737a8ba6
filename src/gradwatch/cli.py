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
    diag = sub.add_parser("diagnose", help="print the layer table and the findings of a stored run")
    diag.add_argument("run", help="run directory (holding gradwatch.sqlite)")
    rep = sub.add_parser("report", help="write the self-contained HTML report of a stored run")
    rep.add_argument("run", help="run directory (holding gradwatch.sqlite)")
    rep.add_argument("-o", "--output", help="HTML file to write (default: RUN/report.html)")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from gradwatch.demo import run_demo

        run_demo(args.out, args.steps)
    elif args.command in ("diagnose", "report"):
        from rich.console import Console

        import gradwatch as gw

        try:
            run = gw.open_run(args.run)
        except FileNotFoundError as exc:
            print(f"gradwatch {args.command}: {exc}", file=sys.stderr)
            return 2
        with run:
            diagnosis = gw.diagnose(run)
            if args.command == "diagnose":
                from gradwatch.report.terminal import render

                render(run, diagnosis, Console())
            else:
                from gradwatch.report.html import write_html

                path = write_html(run, args.output or run.path / "report.html", diagnosis)
                print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
