"""The ``recon3d`` command line.

    recon3d reconstruct BUNDLE --out DIR [--model fusion] [--preset fast|balanced|quality] [--device auto|cpu|cuda]
    recon3d evaluate MESH --bundle BUNDLE [--gt GT_MESH] [--out quality.json]
    recon3d submit BUNDLE [--model ...] [--wait --out DIR] [--url URL]
    recon3d experiment SPEC.yaml [--bundle B] [--wait] | show ID [--csv] | compare ID ID ...

Exit codes: 0 success, 2 invalid input (the error code is printed), 1 any other
failure, 130 canceled.
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import PRESETS
from .errors import CanceledError, InvalidInputError, ReconError

EXIT_INVALID_INPUT = 2
EXIT_FAILED = 1
EXIT_CANCELED = 130


def _add_reconstruct(sub) -> None:
    from .reconstruct import MODELS

    p = sub.add_parser("reconstruct", help="reconstruct a textured mesh from a bundle folder or ZIP")
    p.add_argument("bundle", help="bundle folder or ZIP (docs/input-format.md)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default="fusion", choices=MODELS)
    p.add_argument("--preset", default="balanced", choices=sorted(PRESETS))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-quality", action="store_true", help="skip quality.json")
    p.add_argument("--no-previews", action="store_true", help="skip previews/")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_reconstruct)


def _run_reconstruct(args) -> int:
    from tqdm import tqdm

    from .reconstruct import reconstruct_bundle

    bar = None if args.quiet else tqdm(total=100, unit="%", bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}] {desc}")

    def progress(stage: str, fraction: float) -> None:
        if bar is not None:
            bar.set_description_str(stage)
            bar.update(max(0.0, 100.0 * fraction - bar.n))

    try:
        result = reconstruct_bundle(
            args.bundle,
            args.out,
            model=args.model,
            preset=args.preset,
            device=args.device,
            progress=progress,
            evaluate=not args.no_quality,
            previews=not args.no_previews,
        )
    finally:
        if bar is not None:
            bar.close()
    summary = {k: result[k] for k in ("model", "preset", "mesh", "timings_s") if k in result}
    if "quality" in result:
        summary["quality"] = result["quality"]
    print(json.dumps(summary, indent=2))
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="score a mesh against a bundle's views (and a ground-truth mesh)")
    from .evaluate import add_evaluate_arguments, run_evaluate

    add_evaluate_arguments(p)
    p.set_defaults(func=run_evaluate)


def _add_submit(sub) -> None:
    p = sub.add_parser("submit", help="submit a bundle to a running Recon3D service")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="see `recon3d submit -h`")
    p.set_defaults(func=_run_submit)


def _run_submit(args) -> int:
    # The HTTP client lives with the service (serve_app/client.py); it needs only httpx.
    from serve_app.client import submit_main

    return submit_main(args.argv)


def _add_experiment(sub) -> None:
    p = sub.add_parser("experiment", help="submit a parameter sweep to a service, or show / compare results")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="see `recon3d experiment -h`")
    p.set_defaults(func=_run_experiment)


def _run_experiment(args) -> int:
    # Like submit: the HTTP client lives with the service and needs only httpx.
    from serve_app.client import experiment_main

    return experiment_main(args.argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recon3d", description="Multi-view images to a textured 3D mesh.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_reconstruct(sub)
    _add_evaluate(sub)
    _add_submit(sub)
    _add_experiment(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["submit"]:  # pass everything through, including -h
        return _run_submit(argparse.Namespace(argv=argv[1:]))
    if argv[:1] == ["experiment"]:
        return _run_experiment(argparse.Namespace(argv=argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InvalidInputError as e:
        print(f"error: {e.code}: {e.message}", file=sys.stderr)
        return EXIT_INVALID_INPUT
    except CanceledError as e:
        print(f"canceled: {e.message}", file=sys.stderr)
        return EXIT_CANCELED
    except ReconError as e:
        print(f"error: {e.code}: {e.message}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
