#!/usr/bin/env python3
"""Dependency audit that always gives a verdict (``make audit``).

Python: every distribution installed in the environment that runs this script is
looked up in PyPI's JSON API, whose ``vulnerabilities`` field carries the PyPA/OSV
advisories. The per-version document (``/pypi/NAME/VERSION/json``) is asked first;
where only the project document answers (some mirrors and proxies serve only that),
its advisories describe the *latest* release, so they decide only for packages
installed at that release. JavaScript: ``npm audit`` for each npm project of the repo.

The report ends with one verdict line and a plain list of what could NOT be checked
and why. Exit status: 1 if a known vulnerability was found, 2 if ``--strict`` and
something could not be checked, else 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

PYPI = "https://pypi.org/pypi"
ROOT = Path(__file__).resolve().parents[1]
NPM_PROJECTS = ["web", "tests/e2e/idp"]
SELF = {"aifa-broker"}


@dataclass
class Result:
    ecosystem: str
    name: str
    version: str
    status: str  # "clean" | "vulnerable" | "unchecked"
    detail: str = ""
    advisories: list[str] = field(default_factory=list)


def _get_json(url: str, timeout: float) -> dict | None:  # type: ignore[type-arg]
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310 - https only
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return json.load(response)  # type: ignore[no-any-return]
    except (urllib.error.URLError, TimeoutError, ValueError, OSError):
        return None


def _advisory_ids(vulns: list[dict]) -> list[str]:  # type: ignore[type-arg]
    return sorted({v.get("id", "?") for v in vulns})


def check_python(name: str, version: str, timeout: float) -> Result:
    doc = _get_json(f"{PYPI}/{name}/{version}/json", timeout)
    if doc is not None and "vulnerabilities" in doc:
        ids = _advisory_ids(doc["vulnerabilities"])
        return Result("pypi", name, version, "vulnerable" if ids else "clean", "per-version advisories", ids)
    project = _get_json(f"{PYPI}/{name}/json", timeout)
    if project is None:
        return Result("pypi", name, version, "unchecked", "PyPI answered neither the version nor the project")
    latest = project.get("info", {}).get("version")
    if latest != version:
        return Result("pypi", name, version, "unchecked",
                      f"only the latest release's advisories are reachable (latest {latest}, installed {version})")
    ids = _advisory_ids(project.get("vulnerabilities", []))
    return Result("pypi", name, version, "vulnerable" if ids else "clean", "advisories of the latest release", ids)


def python_results(timeout: float) -> list[Result]:
    seen: dict[str, str] = {}
    for dist in metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower().replace("_", "-")
        if name and name not in SELF:
            seen[name] = dist.version
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda item: check_python(item[0], item[1], timeout), sorted(seen.items())))


def npm_results() -> list[Result]:
    results = []
    for rel in NPM_PROJECTS:
        project = ROOT / rel
        if not (project / "package-lock.json").is_file():
            continue
        try:
            proc = subprocess.run(["npm", "audit", "--json", "--package-lock-only"], cwd=project,  # noqa: S607
                                  capture_output=True, text=True, timeout=120, check=False)
            report = json.loads(proc.stdout or "{}")
        except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
            results.append(Result("npm", rel, "-", "unchecked", f"npm audit could not run: {exc}"))
            continue
        if "error" in report or "vulnerabilities" not in report:
            why = (report.get("error") or {}).get("summary") or report.get("message") or "no audit data"
            results.append(Result("npm", rel, "-", "unchecked", f"the registry's audit endpoint refused: {why}"[:200]))
            continue
        vulns = report["vulnerabilities"]
        results.append(Result("npm", rel, "-", "vulnerable" if vulns else "clean", "npm audit", sorted(vulns)))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strict", action="store_true", help="fail when something could not be checked")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    results = python_results(args.timeout) + npm_results()
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
    for r in results:
        if r.status != "clean":
            extra = f" {', '.join(r.advisories)}" if r.advisories else ""
            print(f"{r.status:<10} {r.ecosystem}:{r.name} {r.version} — {r.detail}{extra}")
    counts = {s: sum(r.status == s for r in results) for s in ("clean", "vulnerable", "unchecked")}
    print(f"audit verdict: {'VULNERABLE' if counts['vulnerable'] else 'no known vulnerability'} among "
          f"{counts['clean'] + counts['vulnerable']} checked packages ({counts['vulnerable']} vulnerable); "
          f"{counts['unchecked']} could NOT be checked (listed above with the reason)")
    if counts["vulnerable"]:
        return 1
    return 2 if args.strict and counts["unchecked"] else 0


if __name__ == "__main__":
    sys.exit(main())
