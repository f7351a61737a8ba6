"""The ``gradwatch`` command line; each sub-command calls the public API."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expects a positive int, got {text}")
    return value


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects comma-separated positive ints such as 64,784, got {text!r}") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expects comma-separated positive ints such as 64,784, got {text!r}")
    return shape


def _load_factory(spec: str):  # type: ignore[no-untyped-def]
    from gradwatch._reference import load

    return load(spec, "factory")


def _check(spec: str, shape: tuple[int, ...], seed: int) -> int:
    import torch

    import gradwatch as gw

    try:
        factory = _load_factory(spec)
    except (ValueError, ImportError) as exc:
        print(f"gradwatch check: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(seed)
    model = factory()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    try:
        report = gw.check(model, x, seed=seed)
    except (TypeError, ValueError) as exc:  # the API's argument errors: a factory that returns no model, …
        print(f"gradwatch check: {spec}: {exc}", file=sys.stderr)
        return 2
    print(report)
    return 0


def _doctor(args: argparse.Namespace) -> int:
    import gradwatch as gw
    from gradwatch import zoo

    try:  # zoo:NAME, or a reference gw.doctor loads here and ships as text to its workers
        setup = zoo.get(args.setup[4:]) if args.setup.startswith("zoo:") else args.setup
    except KeyError as exc:
        print(f"gradwatch doctor: {exc.args[0]}", file=sys.stderr)
        return 2
    resources = {k: v for k, v in (("num_cpus", args.cpus_per_trial), ("num_gpus", args.gpus_per_trial)) if v is not None}
    if resources and args.ray is None:
        print("gradwatch doctor: --cpus-per-trial and --gpus-per-trial ask Ray for resources: add --ray", file=sys.stderr)
        return 2
    connected = None
    try:
        if args.ray:  # an address: connect first; gw.doctor then runs on that cluster and leaves it to us
            connected = _connect_ray(args.ray)
        report = gw.doctor(setup, steps=args.steps, seeds=args.seeds, budget_s=args.budget, store=args.store,
                           check_seed=not args.no_seed_check,
                           workers="ray" if args.ray is not None else args.workers, ray_resources=resources or None)
    except (ValueError, TypeError, ImportError, ConnectionError) as exc:  # the API's argument errors; no Ray
        print(f"gradwatch doctor: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradwatch doctor: interrupted before the baseline finished: no table", file=sys.stderr)
        return 130
    finally:
        if connected is not None:
            connected.shutdown()
    print(report)
    if args.store:
        print(f"\nruns stored in {args.store}: gradwatch report {Path(args.store) / report.baseline.runs[0]}")
    return 1 if report.baseline.error else 0


def _connect_ray(address: str):  # type: ignore[no-untyped-def]
    try:
        import ray
    except ImportError:
        raise ImportError("--ray needs Ray: pip install 'gradwatch[ray]'") from None
    import logging

    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError or ValueError for an address it cannot reach
        raise ConnectionError(f"cannot connect to Ray at {address}: {_one_line(exc)}") from None
    return ray


def _check_attack(spec: str, eps: float, norm: str, steps: int, clip: tuple[float, float] | None, square: bool,
                  seed: int) -> int:
    import gradwatch as gw
    from gradwatch import attack_zoo

    try:
        if spec.startswith("zoo:"):
            if spec[4:] not in attack_zoo.SETUPS:
                raise ValueError(f"no attack set-up {spec[4:]!r}; there are {', '.join(sorted(attack_zoo.SETUPS))}")
            made = attack_zoo.SETUPS[spec[4:]](seed)
        else:
            made = _load_factory(spec)()
        if isinstance(made, attack_zoo.AttackSetup):
            model, x, y, clip, embedding = made.model, made.x, made.y, clip or made.clip, made.embedding
        elif isinstance(made, tuple) and len(made) == 3:
            (model, x, y), embedding = made, None
        else:
            raise ValueError(f"{spec} must return (model, x, y) or an AttackSetup, got {type(made).__name__}")
        report = gw.check_attack(model, x, y, eps=eps, norm=norm, steps=steps, clip=clip, embedding=embedding,
                                 square=square, seed=seed)
    except (ValueError, TypeError, ImportError) as exc:  # a bad spec or factory, the API's argument errors, no ART
        print(f"gradwatch check-attack: {exc}", file=sys.stderr)
        return 2
    print(report)
    return 0


def _clip(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects LOW,HIGH such as 0,1, got {text!r}") from None
    if not lo < hi:
        raise argparse.ArgumentTypeError(f"expects LOW,HIGH with LOW < HIGH, got {text!r}")
    return lo, hi


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expects a positive number, got {text}")
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
    rep.add_argument("--redact", action="store_true", help="leave the run's name and path out of the page")
    chk = sub.add_parser("check", help="before training: will this network train? (gw.check on random input)")
    chk.add_argument("factory", metavar="MODULE:FACTORY",
                     help="a Python file or importable module, and a function in it that returns the model")
    chk.add_argument("--input-shape", required=True, type=_shape, help="example batch shape, e.g. 64,784")
    chk.add_argument("--seed", type=int, default=0, help="seed for the model factory and the input (default 0)")
    doc = sub.add_parser("doctor", help="try the remedies the findings point to, measured (gw.doctor)")
    doc.add_argument("setup", metavar="MODULE:SETUP",
                     help="a Python file or module and a function seed -> Trial in it, or zoo:NAME")
    doc.add_argument("--steps", type=_positive_int, default=None,
                     help="training steps per trial (default: the set-up's own, else 300)")
    doc.add_argument("--seeds", type=_positive_int, default=1, help="seeds per trial (default 1)")
    doc.add_argument("--budget", type=float, default=None, help="seconds after which no new remedy starts")
    doc.add_argument("--no-seed-check", action="store_true",
                     help="do not run the best remedy again on a seed no trial used (gw.doctor's check_seed=False)")
    doc.add_argument("--store", default=None, help="directory for every trial's run (default: a temporary one)")
    where = doc.add_mutually_exclusive_group()
    where.add_argument("--workers", type=_positive_int, default=1,
                       help="trials at once on a local process pool (default 1: one after another, in this process)")
    where.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="run the trials as Ray tasks: on the cluster at ADDRESS, else RAY_ADDRESS, else a local one")
    doc.add_argument("--cpus-per-trial", type=float, default=None, help="with --ray: CPUs each trial asks for (default 1)")
    doc.add_argument("--gpus-per-trial", type=float, default=None, help="with --ray: GPUs each trial asks for")
    atk = sub.add_parser("check-attack", help="is a robustness claim resting on masked gradients? (gw.check_attack)")
    atk.add_argument("setup", metavar="MODULE:FACTORY",
                     help="a Python file or module and a function in it returning (model, x, y), or zoo:NAME "
                          "(gradwatch.attack_zoo: digits_honest, digits_rounding, digits_temperature, text_…)")
    atk.add_argument("--eps", type=_positive_float, required=True, help="perturbation budget ε")
    atk.add_argument("--norm", choices=("linf", "l2"), default="linf", help="the threat model's norm (default linf)")
    atk.add_argument("--steps", type=_positive_int, default=20, help="PGD iterations (default 20)")
    atk.add_argument("--clip", type=_clip, default=None, help="valid input range LOW,HIGH, e.g. 0,1")
    atk.add_argument("--square", action="store_true", help="add ART's Square attack (1,000 queries a sample)")
    atk.add_argument("--seed", type=int, default=0, help="seed for the attacks and a zoo set-up (default 0)")
    args = parser.parse_args(argv)

    if args.command == "check-attack":
        return _check_attack(args.setup, args.eps, args.norm, args.steps, args.clip, args.square, args.seed)

    if args.command == "doctor":
        return _doctor(args)
    if args.command == "check":
        return _check(args.factory, args.input_shape, args.seed)
    if args.command == "demo":
        from gradwatch.demo import run_demo

        run_demo(args.out, args.steps)
    elif args.command in ("diagnose", "report"):
        from rich.console import Console

        import gradwatch as gw

        try:
            run = gw.open_run(args.run)
        except (FileNotFoundError, gw.NotARunError) as exc:
            print(f"gradwatch {args.command}: {exc}", file=sys.stderr)
            return 2
        with run:
            diagnosis = gw.diagnose(run)
            if args.command == "diagnose":
                from gradwatch.report.terminal import render

                render(run, diagnosis, Console())
            else:
                from gradwatch.report.html import write_html

                try:
                    path = write_html(run, args.output or run.path / "report.html", diagnosis, args.redact)
                except (ValueError, OSError) as exc:  # a bad -o, or a directory the user cannot write
                    print(f"gradwatch report: {_one_line(exc)}", file=sys.stderr)
                    return 2
                print(f"wrote {path}")
    return 0


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot write {exc.filename!r}: {exc.strerror}"
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
