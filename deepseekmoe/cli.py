"""The `deepseekmoe` command: a table of subcommands, each a plain typed function whose docstring is its --help.

Argument rules (read from the function's signature):
  * positional parameters become positional arguments (`list[str]` ones take several values; a default makes them
    optional); keyword-only parameters become `--options` (underscores -> dashes);
  * `bool` options are flags (`--x/--no-x`); `X | None` options default to None;
  * the docstring's first paragraph is the description; lines `name: text` under "Args:" are per-argument help.
Errors a user can fix (bad paths, bad values) raise `errors.UserError`, ValueError (invalid settings) or
FileNotFoundError and are printed as one line `deepseekmoe: error: ...` with exit code 2; anything else keeps its
traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import inspect
import os
import re
import sys
import types
import typing
from typing import Any, Callable

from .errors import UserError

# name -> "module:function"; modules are imported only when their subcommand runs.
COMMANDS: dict[str, str] = {
    "info": "deepseekmoe.accounting:info_command",
    "prepare": "deepseekmoe.data.prepare:prepare_command",
    "train": "deepseekmoe.train.trainer:train_command",
    "eval": "deepseekmoe.eval.perplexity:eval_command",
    "generate": "deepseekmoe.inference.generate:generate_command",
    "serve": "deepseekmoe.inference.server:serve_command",
    "analyze": "deepseekmoe.analysis.analyze:analyze_command",
    "compare": "deepseekmoe.analysis.compare:compare_command",
    "report": "deepseekmoe.analysis.report:report_command",
    "convert": "deepseekmoe.convert.hf:convert_command",
    "plan": "deepseekmoe.distributed.planner:plan_command",
    "bench": "deepseekmoe.bench:bench_command",
}


# a full disk, a quota, a read-only file system: the user can fix these, so they are one line, not a traceback
USER_FIXABLE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _resolve(target: str) -> Callable[..., Any]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def _summary(fn: Callable[..., Any]) -> str:
    doc = inspect.getdoc(fn) or ""
    return doc.split("\n\n")[0].replace("\n", " ")


def _arg_help(fn: Callable[..., Any]) -> dict[str, str]:
    doc = inspect.getdoc(fn) or ""
    if "Args:" not in doc:
        return {}
    helps: dict[str, str] = {}
    last = None
    for line in doc.split("Args:", 1)[1].splitlines():
        m = re.match(r"\s{0,4}(\w+):\s*(.*)", line)
        if m:
            last = m.group(1)
            helps[last] = m.group(2)
        elif last and line.strip():
            helps[last] += " " + line.strip()
    return helps


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _add_params(parser: argparse.ArgumentParser, fn: Callable[..., Any]) -> None:
    hints = typing.get_type_hints(fn)
    helps = _arg_help(fn)
    for name, p in inspect.signature(fn).parameters.items():
        tp = _unwrap_optional(hints.get(name, str))
        is_list = typing.get_origin(tp) is list
        elem = typing.get_args(tp)[0] if is_list else tp
        kw: dict[str, Any] = {"help": helps.get(name)}
        has_default = p.default is not inspect.Parameter.empty
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            if is_list:
                kw["nargs"] = "*" if has_default else "+"
            elif has_default:
                kw["nargs"] = "?"
            if has_default:
                kw["default"] = list(p.default) if is_list else p.default
            parser.add_argument(name, type=elem, metavar=name.upper(), **kw)
            continue
        flag = "--" + name.replace("_", "-")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=p.default, **kw)
        else:
            if is_list:
                kw["nargs"] = "+"
            parser.add_argument(flag, type=elem, default=p.default, dest=name,
                                required=not has_default, **kw)


class _Parser(argparse.ArgumentParser):
    """Usage mistakes print one line (`deepseekmoe <cmd>: error: ...`) and exit 2; --help shows the usage."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="deepseekmoe", description="DeepSeekMoE: fine-grained + shared-expert Mixture-of-Experts LMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parser.set_defaults(_commands=sub.choices)
    for name, target in COMMANDS.items():
        fn = _resolve(target)
        p = sub.add_parser(name, help=_summary(fn), description=inspect.getdoc(fn).split("Args:")[0]
                           if fn.__doc__ else None, formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_params(p, fn)
        p.set_defaults(_fn=fn)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, Any]:
    """Parse a command line; a subcommand's positional arguments may come before, between or after its options
    (`train train.lr=1e-3 --out r model.experts_impl=loop`)."""
    commands = parser.get_default("_commands")
    if argv and argv[0] in commands:
        args = vars(commands[argv[0]].parse_intermixed_args(argv[1:]))
        args["command"] = argv[0]
    else:  # --help, no command, an unknown command: the top-level parser says what is wrong
        args = vars(parser.parse_args(argv))
    args.pop("_commands", None)
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, sys.argv[1:] if argv is None else list(argv))
    fn = args.pop("_fn")
    args.pop("command")
    try:
        result = fn(**args)
    except (UserError, ValueError, FileNotFoundError) as exc:
        print(f"deepseekmoe: error: {exc}", file=sys.stderr)
        return 2
    except (PermissionError, IsADirectoryError, NotADirectoryError) as exc:  # a path the user gave
        print(f"deepseekmoe: error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`deepseekmoe info | head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        if exc.errno not in USER_FIXABLE_ERRNOS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"deepseekmoe: error: {where}{exc.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deepseekmoe: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
