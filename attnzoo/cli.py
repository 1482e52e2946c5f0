"""The ``attnzoo`` command line. Each subcommand lives in a small ``_cmd_*`` function."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def _cmd_demo(args: argparse.Namespace) -> int:
    from attnzoo.demo import run_demo

    run_demo(n=args.n)
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    import torch

    import attnzoo
    from attnzoo import patterns as P

    q = torch.randn(1, args.heads, args.n, args.dim, requires_grad=args.grad)
    k = torch.randn(1, args.heads, args.n, args.dim, requires_grad=args.grad)
    pattern = {
        "full": None,
        "causal": P.Causal(),
        "window": P.SlidingWindow(args.window, causal=True),
    }[args.pattern]
    print(attnzoo.explain(q, k, k, pattern=pattern))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnzoo", description="Every attention mechanism under one API: run, compare, inspect."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="show the ops, the patterns and the dispatcher on CPU")
    demo.add_argument("--n", type=int, default=4096, help="sequence length of the timing demo")
    demo.set_defaults(func=_cmd_demo)
    ex = sub.add_parser("explain", help="which backend attention() picks for a problem, and why")
    ex.add_argument("--pattern", choices=["full", "causal", "window"], default="window")
    ex.add_argument("--n", type=int, default=4096)
    ex.add_argument("--heads", type=int, default=8)
    ex.add_argument("--dim", type=int, default=64)
    ex.add_argument("--window", type=int, default=256)
    ex.add_argument("--grad", action="store_true", help="inputs require gradients")
    ex.set_defaults(func=_cmd_explain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)
