"""Write cluster/rayservice.yaml: the template with serveConfigV2 generated from serve_config.yaml.

    python cluster/render_rayservice.py           # rewrite rayservice.yaml
    python cluster/render_rayservice.py --check   # exit 1 (with a diff) when rayservice.yaml is stale
    python cluster/render_rayservice.py --serve-config out.yaml   # the merged config, for `serve deploy`

serveConfigV2 = serve_config.yaml deep-merged with cluster/serve_cluster_overrides.yaml
(mappings merge key by key, the ``applications`` and ``models`` lists merge by ``name``,
a null value deletes the key), dumped as YAML into the template's ``__SERVE_CONFIG_V2__``.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parent
REPO = CLUSTER.parent
SERVE_CONFIG = REPO / "serve_config.yaml"
OVERRIDES = CLUSTER / "serve_cluster_overrides.yaml"
TEMPLATE = CLUSTER / "rayservice.template.yaml"
OUTPUT = CLUSTER / "rayservice.yaml"
PLACEHOLDER = "__SERVE_CONFIG_V2__"
#: Lists whose items are mappings identified by this key merge item by item.
NAMED_LISTS = {"applications": "name", "models": "name"}
#: Spaces before serveConfigV2's block lines (two levels under spec:).
BLOCK_INDENT = 4


def merge(base, override, key: str | None = None):
    """``base`` with ``override`` applied (see the module docstring); inputs are not modified."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = merge(base.get(k), v, k)
        return out
    if isinstance(base, list) and isinstance(override, list) and key in NAMED_LISTS:
        ident = NAMED_LISTS[key]
        out = list(base)
        index = {item.get(ident): i for i, item in enumerate(out) if isinstance(item, dict)}
        for item in override:
            name = item.get(ident) if isinstance(item, dict) else None
            if name in index:
                out[index[name]] = merge(out[index[name]], item)
            else:
                out.append(item)
        return out
    return override


def serve_config_v2(serve_config: str, overrides: str) -> dict:
    """The Serve config the cluster deploys (a dict)."""
    return merge(yaml.safe_load(serve_config), yaml.safe_load(overrides) or {})


def render(serve_config: str, overrides: str, template: str) -> str:
    """rayservice.yaml's text."""
    body = yaml.safe_dump(serve_config_v2(serve_config, overrides), sort_keys=False, default_flow_style=False)
    pad = " " * BLOCK_INDENT
    block = "|\n" + "".join(f"{pad}{line}\n" if line else "\n" for line in body.splitlines())
    if template.count(PLACEHOLDER) != 1:
        raise ValueError(f"{TEMPLATE.name} must hold {PLACEHOLDER} exactly once")
    return template.replace(PLACEHOLDER + "\n", block)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="fail when rayservice.yaml is out of sync")
    p.add_argument("--serve-config", metavar="OUT", help="also write the merged Serve config (for `serve deploy`)")
    a = p.parse_args(argv)
    if a.serve_config:
        merged = serve_config_v2(SERVE_CONFIG.read_text(), OVERRIDES.read_text())
        Path(a.serve_config).write_text(yaml.safe_dump(merged, sort_keys=False))
    text = render(SERVE_CONFIG.read_text(), OVERRIDES.read_text(), TEMPLATE.read_text())
    if a.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            sys.stdout.writelines(
                difflib.unified_diff(current.splitlines(True), text.splitlines(True), str(OUTPUT), "rendered")
            )
            print(f"\n{OUTPUT} is out of sync with serve_config.yaml: run python cluster/render_rayservice.py")
            return 1
        print(f"{OUTPUT.name} is in sync")
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
