"""The `deepseekmoe` command: a table of subcommands, each a plain typed function whose docstring is its --help.

Argument rules (read from the function's signature):
  * positional parameters become positional arguments (`list[str]` ones take several values; a default makes them
    optional); keyword-only parameters become `--options` (underscores -> dashes);
  * `bool` options are flags (`--x/--no-x`); `X | None` options default to None;
  * a keyword-only parameter typed as a dataclass takes the dataclass's fields as its options;
  * the docstring's first paragraph is the description; lines `name: text` under "Args:" are per-argument help.
Errors a user can fix (bad paths, bad values) raise `errors.UserError` (`errors.UserValueError` for an invalid
value or setting) or FileNotFoundError and are printed as one line `deepseekmoe: error: ...` with exit code 2;
anything else, a ValueError from inside a library included, keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
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

# name -> ("module:function", one-line summary). Only the command that runs is imported (`deepseekmoe --help` imports
# none); each summary is the first paragraph of its function's docstring (tests/test_cli_info.py checks).
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("deepseekmoe.commands.info:info_command",
             "Print parameter counts, FLOPs and expert combinations of a model, instantly (no weights allocated)."),
    "prepare": ("deepseekmoe.commands.prepare:prepare_command",
                "Turn text into a training data directory: a byte-level BPE tokenizer, token files and meta.json."),
    "train": ("deepseekmoe.commands.train:train_command",
              "Train a model with the paper's recipe; with no arguments, tiny-deepseekmoe on the built-in corpus "
              "(~5 min)."),
    "eval": ("deepseekmoe.commands.eval:eval_command",
             "Evaluate a trained model on held-out text: loss (nats/token), perplexity and bits per byte; or, with "
             "--task, multiple-choice accuracy (acc, acc_norm per character, acc_bytes per byte) on a local JSONL "
             "task, scored by lm-evaluation-harness's rules (deepseekmoe/eval/multiple_choice.py), so the numbers "
             "equal `lm_eval`'s on the same items."),
    "generate": ("deepseekmoe.commands.generate:generate_command",
                 "Generate text from a trained model, streaming tokens to stdout as they are produced."),
    "serve": ("deepseekmoe.commands.serve:serve_command",
              "Serve a checkpoint over an OpenAI-compatible HTTP API (FastAPI + uvicorn): /v1/completions, "
              "/v1/chat/completions, /v1/models, /tokenize, /detokenize, /metrics, /health, /docs. Requests join "
              "and leave the running batch at every decode step (continuous batching). Listens on localhost unless "
              "told otherwise."),
    "analyze": ("deepseekmoe.commands.analyze:analyze_command",
                "Routing statistics and the paper's expert-specialization experiments (Figs. 4-5) for checkpoints."),
    "compare": ("deepseekmoe.commands.compare:compare_command",
                "Train the paper's comparison suites with one recipe and write results.json, results.md, "
                "loss_curves.png."),
    "report": ("deepseekmoe.commands.report:report_command",
               "Write one self-contained HTML page (loss curves, expert-load heatmaps, compare table, routing "
               "analysis)."),
    "convert": ("deepseekmoe.commands.convert:convert_command",
                "Convert between the Hugging Face DeepSeekMoE layout and this project's checkpoint directory."),
    "plan": ("deepseekmoe.commands.plan:plan_command",
             "Estimate per-GPU memory, all-to-all traffic and step time of a run before renting the GPUs."),
    "bench": ("deepseekmoe.commands.bench:bench_command",
              "Run a benchmark: moe-layer (MoE block vs dense FFN vs transformers), train-step (tokens/s, MFU) or "
              "decode."),
}


# a full disk, a quota, a read-only file system: the user can fix these, so they are one line, not a traceback
USER_FIXABLE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _resolve(target: str) -> Callable[..., Any]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


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


def _parameters(fn: Callable[..., Any]) -> list[inspect.Parameter]:
    """fn's parameters with their resolved annotations; a keyword-only one typed as a dataclass stands for that
    dataclass's fields (each one an option; `_call` builds the object from them)."""
    hints = typing.get_type_hints(fn)
    params = []
    for name, p in inspect.signature(fn).parameters.items():
        tp = hints.get(name, str)
        if p.kind is p.KEYWORD_ONLY and dataclasses.is_dataclass(tp):
            field_hints = typing.get_type_hints(tp)
            params += [inspect.Parameter(f.name, p.KEYWORD_ONLY, annotation=field_hints[f.name],
                                         default=p.empty if f.default is dataclasses.MISSING else f.default)
                       for f in dataclasses.fields(tp)]
        else:
            params.append(p.replace(annotation=tp))
    return params


def _call(fn: Callable[..., Any], args: dict[str, Any]) -> Any:
    """fn(**args), the fields of each dataclass-typed parameter gathered into its object first."""
    hints = typing.get_type_hints(fn)
    for name, p in inspect.signature(fn).parameters.items():
        tp = hints.get(name)
        if p.kind is p.KEYWORD_ONLY and dataclasses.is_dataclass(tp):
            args[name] = tp(**{f.name: args.pop(f.name) for f in dataclasses.fields(tp)})
    return fn(**args)


def _add_params(parser: argparse.ArgumentParser, fn: Callable[..., Any]) -> None:
    helps = _arg_help(fn)
    for p in _parameters(fn):
        name = p.name
        tp = _unwrap_optional(p.annotation)
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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser: every subcommand with its summary; the options of `command` only (importing its module)."""
    parser = _Parser(
        prog="deepseekmoe", description="DeepSeekMoE: fine-grained + shared-expert Mixture-of-Experts LMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parser.set_defaults(_commands=sub.choices)
    for name, (target, summary) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=summary)
            continue
        fn = _resolve(target)
        p = sub.add_parser(name, help=summary, description=inspect.getdoc(fn).split("Args:")[0]
                           if fn.__doc__ else None, formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_params(p, fn)
        p.set_defaults(_fn=fn)
    return parser


def parse(argv: list[str]) -> dict[str, Any]:
    """Parse a command line; a subcommand's positional arguments may come before, between or after its options
    (`train train.lr=1e-3 --out r model.experts_impl=loop`)."""
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    if argv and argv[0] in COMMANDS:
        args = vars(parser.get_default("_commands")[argv[0]].parse_intermixed_args(argv[1:]))
        args["command"] = argv[0]
    else:  # --help, no command, an unknown command: the top-level parser says what is wrong
        args = vars(parser.parse_args(argv))
    args.pop("_commands", None)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else list(argv))
    fn = args.pop("_fn")
    args.pop("command")
    try:
        result = _call(fn, args)
    except (UserError, FileNotFoundError) as exc:
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
