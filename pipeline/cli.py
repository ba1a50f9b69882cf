"""The library's commands of the ``recon3d`` command line (no service needed).

    recon3d reconstruct BUNDLE --out DIR [--model fusion] [--preset fast|balanced|quality] [--device auto|cpu|cuda]
    recon3d evaluate MESH --bundle BUNDLE [--gt GT_MESH] [--out quality.json]

The ``recon3d`` entry point is :func:`serve_app.cli.main`, which adds the service's commands
(``submit``, ``experiment``: HTTP clients in ``serve_app/client.py``) to the parser built here;
``python -m pipeline.cli`` runs the library's commands alone. The library never imports the
service.

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
    from .registry import model_names

    p = sub.add_parser("reconstruct", help="reconstruct a textured mesh from a bundle folder or ZIP")
    p.add_argument("bundle", help="bundle folder or ZIP (docs/input-format.md)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default="fusion", choices=model_names())
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


def build_parser(extra=()) -> argparse.ArgumentParser:
    """The parser of the library's commands; each of ``extra`` (``add(subparsers)``) adds another command."""
    parser = argparse.ArgumentParser(prog="recon3d", description="Multi-view images to a textured 3D mesh.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_reconstruct(sub)
    _add_evaluate(sub)
    for add in extra:
        add(sub)
    return parser


def main(argv: list[str] | None = None, *, extra=()) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not extra and argv[:1] in (["submit"], ["experiment"]):
        # An install whose `recon3d` script predates serve_app.cli:main lands here.
        print(
            f"error: `recon3d {argv[0]}` talks to the service: run `python -m serve_app.cli {argv[0]} ...` "
            "(or reinstall the package to update the `recon3d` script)",
            file=sys.stderr,
        )
        return EXIT_INVALID_INPUT
    args = build_parser(extra).parse_args(argv)
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
