"""lm-evaluation-harness adapter: evaluate deepseekmoe checkpoints with `lm_eval` (EleutherAI, pinned 0.4.13).

Install with `pip install 'deepseekmoe[eval]'`. Importing this module registers the model name `deepseekmoe` with
lm-eval. lm-eval 0.4.13 finds no outside models by itself, so its own `lm_eval` command does not know the name;
run it through this launcher instead, which registers the model and then hands every argument to lm-eval's CLI:

    python -m deepseekmoe.eval.harness run --model deepseekmoe \\
        --model_args pretrained=RUN_OR_CHECKPOINT_DIR,dtype=bfloat16 --batch_size 16 --device cuda:0 \\
        --tasks hellaswag arc_easy --num_fewshot 0 --output_path results/

Every `lm_eval run` option works (`--limit N`, `--include_path DIR` for local task YAMLs, `--log_samples`,
`--gen_kwargs`, ...); the word `run` may be left out, and `python -m deepseekmoe.eval.harness ls tasks` lists tasks.
The CLI always passes its own --batch_size (default 1) and --device (default cuda:0, which falls back to cpu on a
machine without CUDA), so give those two as options, never inside --model_args.

From Python:

    import lm_eval
    from deepseekmoe.eval.harness import DeepSeekMoELM
    lm = DeepSeekMoELM(pretrained="runs/my-run", batch_size=16, device="cuda")
    results = lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])
    # or, with the name registered by the import: lm_eval.simple_evaluate(model="deepseekmoe",
    #     model_args="pretrained=runs/my-run", tasks=["hellaswag"])

Model args: pretrained (a run directory, its latest checkpoint is used; a checkpoint directory; or an HF directory),
batch_size (sequences per forward, default 8), device (default cuda when available), max_length (positions per
forward, default and at most the model's max_position_embeddings), dtype (float32, bfloat16 or float16).

How requests are answered:
  loglikelihood          deepseekmoe.eval.multiple_choice.loglikelihoods: lm-eval's token split (the context's
                         trailing whitespace moves to the continuation, the joint string is encoded once), then
                         bos + context + continuation in one forward, longest first in batches; (sum of
                         continuation log-probs, is greedy). `deepseekmoe eval --task` scores with the same
                         functions, so both give the same numbers.
  loglikelihood_rolling  the document's tokens are cut into windows of max_length predictions; the first window is
                         conditioned on bos, later ones on the tokens just before them, so every token is scored once
                         with as much context as fits (lm-eval's rolling-window rule). All windows of all documents
                         are batched together, longest first.
  generate_until         deepseekmoe.inference.generate.generate per request (greedy unless do_sample/temperature
                         ask for sampling), stopping at eos, at max_gen_toks (default 256) or as soon as one of the
                         `until` strings appears; the text is cut at the first stop string. Prompts are
                         left-truncated so prompt + generation fit max_length.
A model without a bos token uses its eos token wherever bos is named above.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from tqdm import tqdm
from ..errors import UserValueError

try:
    import lm_eval.models  # noqa: F401 - registers lm-eval's own models first (lazily), so they stay reachable
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"deepseekmoe.eval.harness needs lm-eval ({exc}); install it with "
                      "pip install 'deepseekmoe[eval]'") from None

from ..inference.generate import generate
from ..inference.loading import load_for_inference
from .multiple_choice import loglikelihoods, prefix_token_id, score_tokens

logger = logging.getLogger(__name__)
MODEL_NAME = "deepseekmoe"
DEFAULT_MAX_GEN_TOKS = 256
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _positive_int(name: str, value: Any) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise UserValueError(f"{name}={value!r} must be a positive integer (lm-eval's 'auto' is not "
                             f"supported)") from None
    if n < 1:
        raise UserValueError(f"{name}={value!r} must be a positive integer")
    return n


def _usable(device: str | None) -> str | None:
    """The device, or cpu when it names CUDA on a machine without it (lm-eval's CLI asks for cuda:0 by default)."""
    if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("device %s requested but CUDA is not available; evaluating on cpu", device)
        return "cpu"
    return device


class _StopGeneration(Exception):
    """Raised from generate()'s stream callback once a stop string has appeared."""


class DeepSeekMoELM(LM):
    """A deepseekmoe checkpoint behind lm-eval's LM interface (loglikelihood, loglikelihood_rolling,
    generate_until)."""

    def __init__(self, pretrained: str, batch_size: int | str = 8, device: str | None = None,
                 max_length: int | str | None = None, dtype: str | None = None,
                 max_batch_size: int | None = None) -> None:
        super().__init__()
        del max_batch_size  # lm-eval passes it for its automatic batch sizes, which this model does not use
        self.batch_size = _positive_int("batch_size", batch_size)
        if dtype is not None and dtype not in _DTYPES:
            raise UserValueError(f"dtype={dtype!r} is not one of {', '.join(_DTYPES)}")
        self.model, self.tokenizer, self.checkpoint = load_for_inference(str(pretrained), _usable(device))
        if dtype is not None:
            self.model.to(_DTYPES[dtype])
        self._device = self.model.embed_tokens.weight.device
        limit = self.model.config.max_position_embeddings
        self.max_length = limit if max_length is None else _positive_int("max_length", max_length)
        if self.max_length > limit:
            raise UserValueError(f"max_length={self.max_length} exceeds the model's max_position_embeddings={limit}")
        cfg = self.model.config
        self.prefix_token_id = prefix_token_id(cfg)
        if self.prefix_token_id is None:
            raise UserValueError(f"{self.checkpoint}: the model config names neither bos_token_id nor eos_token_id; "
                             "lm-eval needs one to condition the first token on")
        self.eos_token_id = cfg.eos_token_id

    # -- tokens --------------------------------------------------------------------------------------------------
    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def _bar(self, total: int, desc: str, disable: bool) -> tqdm:
        return tqdm(total=total, desc=desc, disable=disable or self.rank != 0)

    # -- lm-eval's three request types ------------------------------------------------------------------------------
    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, whether greedy decoding would produce the continuation) per request."""
        args = [tuple(r.args) for r in requests]
        with self._bar(len(args), "loglikelihood", disable_tqdm) as bar:
            results = loglikelihoods(self.model, self.tok_encode, args, self.prefix_token_id, self.batch_size,
                                     self.max_length, progress=bar.update)
        for arg, res in zip(args, results):
            self.cache_hook.add_partial("loglikelihood", arg, res)
        return results

    def rolling_windows(self, text: str) -> list[tuple[list[int], int]]:
        """The (ids, number of scored ids) windows that cover the document, each token scored exactly once."""
        windows = get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1)
        return [(ctx + cont, len(cont)) for ctx, cont in map(make_disjoint_window, windows)]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole document (conditioned on bos), over windows of max_length tokens."""
        texts = [r.args[0] for r in requests]
        items, owner = [], []
        for doc, text in enumerate(texts):
            windows = self.rolling_windows(text)
            items += windows
            owner += [doc] * len(windows)
        with self._bar(len(items), "loglikelihood_rolling (windows)", disable_tqdm) as bar:
            scores = score_tokens(self.model, items, self.batch_size, progress=bar.update)
        totals = [0.0] * len(texts)
        for doc, (score, _) in zip(owner, scores):
            totals[doc] += score
        for text, total in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Continue each context until a stop string, eos or max_gen_toks; longest prompts first."""
        prompts = [[self.prefix_token_id] + self.tok_encode(r.args[0]) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: -len(prompts[i]))
        out: list[str] = [""] * len(requests)
        with self._bar(len(requests), "generate_until", disable_tqdm) as bar:
            for i in order:
                out[i] = self._generate_one(prompts[i], dict(requests[i].args[1] or {}))
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                bar.update(1)
        return out

    def _generate_one(self, prompt: list[int], gen_kwargs: dict[str, Any]) -> str:
        kwargs = normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKS)
        until = [s for s in kwargs["until"] if s]
        max_new = max(1, min(int(kwargs["max_gen_toks"]), self.max_length))
        prompt = prompt[-(self.max_length - max_new + 1):]  # prompt + max_new - 1 positions must fit
        temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
        ids: list[int] = []

        def on_token(token: int) -> None:
            ids.append(token)
            if until and any(s in self.tok_decode(ids) for s in until):
                raise _StopGeneration

        try:
            generate(self.model, prompt, max_new, temperature=temperature, top_k=kwargs.get("top_k"),
                     top_p=kwargs.get("top_p"), eos_token_id=self.eos_token_id, stream=on_token)
        except _StopGeneration:
            pass
        return cut_at_stop(self.tok_decode(ids), until)


def cut_at_stop(text: str, until: list[str]) -> str:
    """The text before the earliest occurrence of any stop string (all of it when none occurs)."""
    cuts = [i for i in (text.find(s) for s in until if s) if i >= 0]
    return text[:min(cuts)] if cuts else text


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's own command line (same arguments as `lm_eval`) with the deepseekmoe model registered.

    A bad path or value (a missing checkpoint, an unknown task) ends with one line on stderr and exit status 2.
    """
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except (FileNotFoundError, ValueError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"deepseekmoe.eval.harness: error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    # Run as a script, this file is the module __main__; register (and run) the importable module's class instead,
    # so the name is registered once even when something imports deepseekmoe.eval.harness later.
    from deepseekmoe.eval.harness import main as _main

    _main()
else:
    register_model(MODEL_NAME)(DeepSeekMoELM)
