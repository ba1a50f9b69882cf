"""The ``recon3d`` entry point: the library's commands plus the service's.

    recon3d reconstruct ... | evaluate ...            (pipeline/cli.py: runs here, no service)
    recon3d submit BUNDLE [--model ...] [--wait --out DIR] [--url URL]
    recon3d experiment SPEC.yaml [--bundle B] [--wait] | show ID [--csv] | compare ID ID ...

``submit`` and ``experiment`` are HTTP clients of a running service (serve_app/client.py, httpx
only). They live here, above the library, so ``pipeline`` never imports ``serve_app``.
"""

from __future__ import annotations

import argparse
import sys

from pipeline import cli as library_cli


def _add_submit(sub) -> None:
    p = sub.add_parser("submit", help="submit a bundle to a running Recon3D service")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="see `recon3d submit -h`")
    p.set_defaults(func=_run_submit)


def _run_submit(args) -> int:
    from .client import submit_main

    return submit_main(args.argv)


def _add_experiment(sub) -> None:
    p = sub.add_parser("experiment", help="submit a parameter sweep to a service, or show / compare results")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="see `recon3d experiment -h`")
    p.set_defaults(func=_run_experiment)


def _run_experiment(args) -> int:
    from .client import experiment_main

    return experiment_main(args.argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["submit"]:  # pass everything through, including -h
        return _run_submit(argparse.Namespace(argv=argv[1:]))
    if argv[:1] == ["experiment"]:
        return _run_experiment(argparse.Namespace(argv=argv[1:]))
    return library_cli.main(argv, extra=(_add_submit, _add_experiment))


if __name__ == "__main__":
    sys.exit(main())
