"""Run every benchmark and write ``BENCHMARKS.md``.

    python -m bench.run_all [--smoke] [--only NAME ...] [--out BENCHMARKS.md]

``--smoke`` runs tiny sizes (seconds, for CI); its figures are not meaningful and the file it
writes says so. Each benchmark runs edgefleet and its baseline side by side in the same run.
A full run (not ``--smoke``) keeps the sections of the existing file that it did not run
(``--only``, or written by another script such as ``bench.canary_matrix``): each section says
when it ran.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

from bench.common import REPO, Result, machine

BENCHES = ["serving_inproc", "oip_http", "canary", "ingest", "fleet", "footprint"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes for CI; figures not meaningful")
    ap.add_argument("--only", nargs="*", choices=BENCHES, help="run only these benchmarks")
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"), help="markdown file to write")
    ap.add_argument("--json", help="also write the raw figures as JSON here")
    args = ap.parse_args(argv)
    info = machine()
    results: list[Result] = []
    failed: list[str] = []
    t0 = time.monotonic()
    for name in args.only or BENCHES:
        print(f"== {name}", flush=True)
        t = time.monotonic()
        try:
            res = importlib.import_module(f"bench.{name}").run(smoke=args.smoke)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        res.notes.append(f"ran in {time.monotonic() - t:.0f} s, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        results.append(res)
    lines = ["# edgefleet benchmarks", ""]
    if args.smoke:
        lines += ["**Smoke run (tiny sizes): these figures are not meaningful.**", ""]
    lines += [
        "Written by `python -m bench.run_all`" + (" --smoke" if args.smoke else "") + ". Every benchmark "
        "runs edgefleet and its baseline side by side in the same run, interleaved where it can; "
        "nothing here is asserted, the `met` column compares against the targets of issue 7. The "
        "machine is shared (2 cores, other work running), so expect a few % of noise. On a virtual "
        "machine, request/response latencies (HTTP on loopback, even a single ORT run) are lower when "
        "the other core is busy than when it is idle: an idle virtual CPU is slow to wake. Absolute µs "
        "figures therefore move with the machine's load; the ratios to baselines measured in the same "
        "run do not.", "",
        "| | |", "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    lines += [f"| total run time | {time.monotonic() - t0:.0f} s |", ""]
    sections = {_number(res.title): res.markdown() for res in results}
    if not args.smoke and Path(args.out).exists():
        for number, text in _sections(Path(args.out).read_text()).items():
            sections.setdefault(number, text)  # kept from an earlier run
    lines += [sections[k] for k in sorted(sections, key=_order)]
    if failed:
        lines += ["## Failed", "", *[f"- {n} (see the run's output)" for n in failed], ""]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps({r.name: r.figures for r in results}, indent=1, default=float))
    return 1 if failed else 0


def _number(title: str) -> str:
    """"5. Fleet ..." -> "5"."""
    return title.split(".", 1)[0].strip()


def _order(number: str) -> tuple[int, str]:
    return (int(number), "") if number.isdigit() else (10**6, number)


def _sections(text: str) -> dict[str, str]:
    """The ``## N. ...`` sections of a BENCHMARKS.md, by N, each up to the next ``## ``."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("## "):
            current = out.setdefault(_number(line[3:]), [])
        if current is not None:
            current.append(line)
    return {k: "\n".join(v).rstrip() + "\n" for k, v in out.items()}


if __name__ == "__main__":
    sys.exit(main())
