"""The ``attnzoo`` command line. Each subcommand lives in a small ``_cmd_*`` function."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse turns the ValueError into a usage error)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _cmd_demo(args: argparse.Namespace) -> int:
    from attnzoo.demo import run_demo

    run_demo(n=args.n)
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    import torch

    import attnzoo
    from attnzoo import patterns as P

    n = args.n
    if args.pattern == "neighborhood":
        n = args.grid[0] * args.grid[1]
    q = torch.randn(1, args.heads, n, args.dim, requires_grad=args.grad)
    k = torch.randn(1, args.heads, n, args.dim, requires_grad=args.grad)
    pattern = {
        "full": lambda: None,
        "causal": P.Causal,
        "window": lambda: P.SlidingWindow(args.window, causal=True),
        "neighborhood": lambda: P.Neighborhood(args.kernel, grid=tuple(args.grid)),
    }[args.pattern]()
    print(attnzoo.explain(q, k, k, pattern=pattern))
    return 0


def _rich_console() -> Any:
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(soft_wrap=False, width=200) if not sys.stdout.isatty() else Console()


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    console = _rich_console()
    if console is not None:
        from rich.table import Table

        table = Table(title=title)
        for c in columns:
            table.add_column(c)
        for r in rows:
            table.add_row(*r)
        console.print(table)
        return
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    print(title)
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def _cmd_list(args: argparse.Namespace) -> int:
    import attnzoo

    if args.status:
        from attnzoo.catalog import status_rows

        rows = [r for r in status_rows()
                if (args.family is None or r["family"] == args.family)
                and (args.type is None or r["type"] == args.type)
                and (args.priority is None or r["priority"] == args.priority)]
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        done = sum(r["implemented"] for r in rows)
        _print_table(f"catalogue status: {done}/{len(rows)} implemented",
                     ["slug", "family", "type", "P", "implemented", "checks"],
                     [[r["slug"], r["family"], r["type"], str(r["priority"]), "yes" if r["implemented"] else "no",
                       str(len(r["checks"]))] for r in rows])
        return 0
    specs = attnzoo.list(family=args.family, type=args.type, priority=args.priority)
    if args.json:
        print(json.dumps([s.to_dict() for s in specs], indent=2))
        return 0
    _print_table(f"attnzoo entries ({len(specs)})",
                 ["slug", "family", "type", "P", "supports", "complexity", "summary"],
                 [[s.slug + (f" ({', '.join(s.aliases)})" if s.aliases else ""), s.family, s.type, str(s.priority),
                   ",".join(sorted(s.supports)), s.complexity, s.summary] for s in specs])
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import attnzoo

    try:
        s = attnzoo.spec(args.slug)
    except KeyError as e:
        print(e.args[0], file=sys.stderr)
        return 2
    d = s.to_dict()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    doc = (s.factory.__doc__ or "").strip()
    rows = [[k, ", ".join(map(str, v)) if isinstance(v, list) and k != "reductions" else str(v)]
            for k, v in d.items() if k != "reductions"]
    rows += [["reduction", f"{r['name']}: {r['description']}"] for r in d["reductions"]]
    _print_table(f"{s.slug}: {doc.splitlines()[0] if doc else ''}", ["field", "value"], rows)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnzoo", description="Every attention mechanism under one API: run, compare, inspect."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="show the ops, the patterns and the dispatcher on CPU")
    demo.add_argument("--n", type=_positive_int, default=4096, help="sequence length of the timing demo")
    demo.set_defaults(func=_cmd_demo)
    ex = sub.add_parser("explain", help="which backend attention() picks for a problem, and why")
    ex.add_argument("--pattern", choices=["full", "causal", "window", "neighborhood"], default="window")
    ex.add_argument("--n", type=_positive_int, default=4096)
    ex.add_argument("--heads", type=_positive_int, default=8)
    ex.add_argument("--dim", type=_positive_int, default=64)
    ex.add_argument("--window", type=_positive_int, default=256)
    ex.add_argument("--grid", type=_positive_int, nargs=2, default=[64, 64], metavar=("H", "W"),
                    help="grid of --pattern neighborhood (N = H * W)")
    ex.add_argument("--kernel", type=_positive_int, default=7, help="kernel size of --pattern neighborhood")
    ex.add_argument("--grad", action="store_true", help="inputs require gradients")
    ex.set_defaults(func=_cmd_explain)
    ls = sub.add_parser("list", help="registered entries (or the whole catalogue with --status)")
    ls.add_argument("--family", help="only this family (e.g. dense-multihead, positional)")
    ls.add_argument("--type", help="only this type (mixer, pattern, score_mod, ...)")
    ls.add_argument("--priority", type=int, choices=[1, 2, 3], help="only this priority")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.add_argument("--status", action="store_true", help="every catalogue slug and whether it is implemented")
    ls.set_defaults(func=_cmd_list)
    info = sub.add_parser("info", help="everything the registry knows about one entry")
    info.add_argument("slug")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_cmd_info)
    from attnzoo.inspect.viewer import add_cli as _inspect_cli

    _inspect_cli(sub)
    from attnzoo.bench.cli import add_subcommands  # compare, train, bench, results, report

    add_subcommands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, OSError, OverflowError) as exc:  # bad arguments or paths: a message, not a traceback
        print(f"attnzoo {args.command}: error: {exc}", file=sys.stderr)
        return 2
