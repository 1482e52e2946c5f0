"""The ``attnzoo`` command line. Each subcommand lives in a small ``_cmd_*`` function.

Start-up stays fast: only the chosen subcommand's parser is built (``attnzoo --help`` lists them
all without importing torch), and ``list`` / ``info`` read a cached snapshot of the registry
(:mod:`attnzoo.cli_index`). :func:`main` sets ``OMP_WAIT_POLICY=PASSIVE`` (unless it is set)
before torch loads: OpenMP threads then sleep instead of spinning, which on a shared CPU makes
torch several times faster.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from attnzoo.cli_args import check_fits, check_inspect_model, check_writable, int_in

# name -> (one-line help, "module:function" adding the full subparser, aliases)
COMMANDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "list": ("registered entries (or the whole catalogue with --status)", "attnzoo.cli:_add_list", ()),
    "info": ("everything the registry knows about one entry", "attnzoo.cli:_add_info", ()),
    "explain": ("which backend attention() picks for a problem, and why", "attnzoo.cli:_add_explain", ()),
    "tour": ("a one-minute tour of the core layer: backends against the float64 reference, the dispatcher, "
             "a timing (not what `make demo` runs: that is `attnzoo compare --preset quick`)",
             "attnzoo.cli:_add_tour", ("demo",)),
    "compare": ("train, measure, store and report mechanisms side by side (the main job; `make demo`)",
                "attnzoo.bench.cli:add_subcommands", ()),
    "train": ("train one mixer on one task (runs under torchrun with DDP)", "attnzoo.bench.cli:add_subcommands", ()),
    "bench": ("benchmarks: speed and memory sweeps, the CAB contract", "attnzoo.bench.cli:add_subcommands", ()),
    "results": ("the results store: list, show and export runs", "attnzoo.bench.cli:add_subcommands", ()),
    "report": ("HTML report with plots and a leaderboard from the results store",
               "attnzoo.bench.cli:add_subcommands", ()),
    "inspect": ("capture a model's attention on a text; write an HTML view and/or a PNG",
                "attnzoo.inspect.viewer:add_cli", ()),
}
_ALIAS_OF = {a: name for name, (_, _, aliases) in COMMANDS.items() for a in aliases}
EXIT_BROKEN_PIPE = 1  # as Python's documentation recommends, and as rich ends on a broken pipe


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to every option that has a default other than None / False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "default" in text.lower() or not action.option_strings
                or default is None or default is False or default == argparse.SUPPRESS
                or isinstance(action, argparse._HelpAction)):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class _Subcommands(argparse._SubParsersAction):
    """Subcommands whose ``--help`` opens with their one-line help when they have no description."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        text = kwargs.get("help")
        if text and text is not argparse.SUPPRESS and not kwargs.get("description"):
            kwargs["description"] = text[0].upper() + text[1:] + "."
        return super().add_parser(name, **kwargs)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (``attnzoo CMD: error: ...``), exit status 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", _Subcommands)

    def error(self, message: str) -> Any:  # argparse's own error prints the usage block first
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _cmd_tour(args: argparse.Namespace) -> int:
    from attnzoo.demo import run_demo

    check_fits(f"--n {args.n}", 8 * args.n * 64 * 4 * 12)
    run_demo(n=args.n)
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    n = args.grid[0] * args.grid[1] if args.pattern == "neighborhood" else args.n
    keys = args.kernel**2 if args.pattern == "neighborhood" else args.window
    check_fits(f"explain at N={n}, {args.heads} heads of {args.dim}",
               4 * args.heads * n * args.dim * 4 + n * min(keys, n) * 8)

    import torch

    import attnzoo
    from attnzoo import patterns as P

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
    """A rich console for a terminal; None (plain aligned text, quicker and easier to grep) for a pipe or
    a file, or without rich."""
    if not sys.stdout.isatty():
        return None
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console()


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    console = _rich_console()
    if console is not None:
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=escape(title))
        for i, c in enumerate(columns):  # only the last column wraps (measuring wrapped cells is rich's slow part)
            last = i == len(columns) - 1
            table.add_column(escape(c), no_wrap=not last, overflow="fold")
        for r in rows:
            table.add_row(*(escape(v) for v in r))
        console.print(table)
        return
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    print(title)
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def _check_filter(name: str, value: str | None, known: Iterable[str]) -> None:
    known = sorted(set(known))
    if value is not None and value not in known:
        raise ValueError(f"{name}: expected one of {known}, got {value!r}")


def _cmd_list(args: argparse.Namespace) -> int:
    from attnzoo.cli_index import load_index

    index = load_index()
    entries = index["entries"]
    if args.status:
        from attnzoo.catalog import load_rows

        catalogue = load_rows()
        _check_filter("family", args.family, (r["family"] for r in catalogue))
        _check_filter("type", args.type, (r["type"] for r in catalogue))
        rows = [{**r, "priority": int(r["priority"]), "implemented": r["slug"] in entries,
                 "checks": entries[r["slug"]]["checks"] if r["slug"] in entries else []} for r in catalogue]
        rows = [r for r in rows if (args.family is None or r["family"] == args.family)
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
    specs = [e["spec"] for e in entries.values()]
    _check_filter("family", args.family, (s["family"] for s in specs))
    _check_filter("type", args.type, (s["type"] for s in specs))
    specs = sorted((s for s in specs if (args.family is None or s["family"] == args.family)
                    and (args.type is None or s["type"] == args.type)
                    and (args.priority is None or s["priority"] == args.priority)), key=lambda s: s["slug"])
    if args.json:
        print(json.dumps(specs, indent=2))
        return 0
    n_aliases = sum(len(s["aliases"]) for s in specs)
    _print_table(f"attnzoo entries ({len(specs)}" + (f"; {n_aliases} aliases in brackets)" if n_aliases else ")"),
                 ["slug", "family", "type", "P", "supports", "complexity", "summary"],
                 [[s["slug"] + (f" ({', '.join(s['aliases'])})" if s["aliases"] else ""), s["family"], s["type"],
                   str(s["priority"]), ",".join(s["supports"]), s["complexity"], s["summary"]] for s in specs])
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from attnzoo.cli_index import load_index, plain_doc
    from attnzoo.registry import unknown_slug_error

    index = load_index()
    slug = index["aliases"].get(args.slug, args.slug)
    entry = index["entries"].get(slug)
    if entry is None:
        raise unknown_slug_error(args.slug, index["entries"], index["aliases"])
    d = entry["spec"]
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    doc = plain_doc(entry["doc"]).strip()
    first = doc.split("\n\n")[0]
    rows = [[k, ", ".join(map(str, v)) if isinstance(v, list) else str(v)] for k, v in d.items() if k != "reductions"]
    rows += [["reduction", f"{r['name']}: {r['description']}"] for r in d["reductions"]]
    if "\n" in first.strip():
        rows.append(["description", " ".join(line.strip() for line in first.splitlines())])
    _print_table(f"{d['slug']}: {first.splitlines()[0] if first else ''}", ["field", "value"], rows)
    return 0


def _add_list(sub: Any) -> None:
    ls = sub.add_parser("list", help=COMMANDS["list"][0])
    ls.add_argument("--family", help="only this family (e.g. dense-multihead, positional; default: all)")
    ls.add_argument("--type", help="only this type (mixer, pattern, score_mod, ...; default: all)")
    ls.add_argument("--priority", type=int, choices=[1, 2, 3], help="only this priority (default: all)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.add_argument("--status", action="store_true", help="every catalogue slug and whether it is implemented")
    ls.set_defaults(func=_cmd_list)


def _add_info(sub: Any) -> None:
    info = sub.add_parser("info", help=COMMANDS["info"][0])
    info.add_argument("slug", help="a registry slug or alias (attnzoo list shows them)")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_cmd_info)


def _add_explain(sub: Any) -> None:
    size = int_in(1)
    ex = sub.add_parser("explain", help=COMMANDS["explain"][0])
    ex.add_argument("--pattern", choices=["full", "causal", "window", "neighborhood"], default="window",
                    help="the attention pattern")
    ex.add_argument("--n", type=size, default=4096, help="sequence length (not used by --pattern neighborhood)")
    ex.add_argument("--heads", type=size, default=8, help="attention heads")
    ex.add_argument("--dim", type=size, default=64, help="head dimension")
    ex.add_argument("--window", type=size, default=256, help="window of --pattern window")
    ex.add_argument("--grid", type=size, nargs=2, default=[64, 64], metavar=("H", "W"),
                    help="grid of --pattern neighborhood (N = H * W)")
    ex.add_argument("--kernel", type=size, default=7, help="kernel size of --pattern neighborhood")
    ex.add_argument("--grad", action="store_true", help="inputs require gradients")
    ex.set_defaults(func=_cmd_explain)


def _add_tour(sub: Any) -> None:
    tour = sub.add_parser("tour", aliases=list(COMMANDS["tour"][2]), help=COMMANDS["tour"][0])
    tour.add_argument("--n", type=int_in(1, 65536), default=4096,
                      help="sequence length of the timing (at most 65536: the dense comparison grows as N^2)")
    tour.set_defaults(func=_cmd_tour)


def _add_command(sub: Any, name: str) -> None:
    module, function = COMMANDS[name][1].split(":")
    builder = getattr(importlib.import_module(module), function)
    if module == "attnzoo.bench.cli":
        builder(sub, only=[name])
    else:
        builder(sub)


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``attnzoo`` parser with the full options of ``commands`` (None: every command) and a one-line
    entry for the others."""
    full = set(COMMANDS) if commands is None else set(commands)
    parser = Parser(prog="attnzoo", description="Every attention mechanism under one API: run, compare, inspect.",
                    epilog="`attnzoo COMMAND --help` shows a command's options and their defaults.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, (text, _, aliases) in COMMANDS.items():
        if name in full:
            _add_command(sub, name)
        else:
            sub.add_parser(name, help=text, aliases=list(aliases), add_help=False)
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    for word in argv:
        if not word.startswith("-"):
            name = _ALIAS_OF.get(word, word)
            return name if name in COMMANDS else None
    return None


def _check_inspect(args: argparse.Namespace) -> None:
    """Output paths, --layer and the text length, checked before the model is loaded and run."""
    for option in ("html", "png"):
        check_writable(f"--{option}", getattr(args, option, None))
    check_inspect_model(args)


def _silence_stdout() -> None:
    try:  # the reader is gone: later writes (and the flush at exit) go nowhere instead of failing again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _error_text(exc: BaseException) -> str:
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``attnzoo ARGV``; returns the exit status (argparse's usage errors raise SystemExit(2))."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch (and its OpenMP) loads
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        command = _command_in(argv)
        parser = build_parser([command] if command else [])
        if not argv:
            parser.print_help(sys.stderr)
            return 2
        args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            parser.print_help(sys.stderr)
            return 2
        args.command = _ALIAS_OF.get(args.command, args.command)
        try:
            if args.command == "inspect":
                _check_inspect(args)
            return args.func(args)
        except BrokenPipeError:
            raise
        except (ValueError, KeyError, OSError, OverflowError) as exc:  # bad arguments or paths: one line
            print(f"attnzoo {args.command}: error: {_error_text(exc)}", file=sys.stderr)
            return 2
    except BrokenPipeError:  # `attnzoo list | head`: end quietly
        _silence_stdout()
        return EXIT_BROKEN_PIPE
