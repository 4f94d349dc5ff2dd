"""Generate src/pinauth/pinterest/endpoints_data.py from the vendored OpenAPI spec.

pinauth needs two facts from Pinterest's spec at run time: the resource names (first
path segments, which bound metric labels) and each operation's `x-ratelimit-category`
(the scope Pinterest rate-limits in). Parsing 1.5 MB of YAML at start-up would cost
seconds, so they are extracted here into a small Python module; a test fails when the
module and the spec disagree. Run: `make endpoints`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "spec" / "pinterest" / "openapi.yaml"
TARGET = ROOT / "src" / "pinauth" / "pinterest" / "endpoints_data.py"
METHODS = ("get", "post", "put", "patch", "delete")


def _entry(operation: tuple[str, str, str]) -> str:
    line = f"    ({', '.join(json.dumps(part) for part in operation)}),"
    if len(line) <= 100:
        return line
    # ruff format's own wrapping, so the generated file is already formatted.
    return "\n".join(["    (", *(f"        {json.dumps(part)}," for part in operation), "    ),"])


def render(spec: dict[str, Any]) -> str:
    operations: list[tuple[str, str, str]] = []
    for path, item in spec["paths"].items():
        for method in METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            category = operation.get("x-ratelimit-category")
            if not category:
                raise SystemExit(f"{method.upper()} {path} has no x-ratelimit-category")
            operations.append((method.upper(), path.strip("/"), str(category)))
    operations.sort()
    lines = [
        '"""Generated from spec/pinterest/openapi.yaml by scripts/gen_endpoints.py."""',
        "",
        f"SPEC_VERSION = {json.dumps(str(spec['info']['version']))}",
        "",
        "# (method, path template below /v5, x-ratelimit-category)",
        "OPERATIONS: tuple[tuple[str, str, str], ...] = (",
        *(_entry(operation) for operation in operations),
        ")",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    spec = yaml.load(SPEC.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    text = render(spec)
    if "--check" in sys.argv[1:]:
        if TARGET.read_text() != text:
            print(f"{TARGET} is out of date: run `make endpoints`", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
