"""`deepseekmoe train`: a training run (train/run.py), ending with a text sample from the trained model."""

from __future__ import annotations

from pathlib import Path

from ..data.tokenizer import load_tokenizer
from ..inference.generate import encode_prompt, generate
from ..model import Transformer
from ..train.config import TrainConfig
from ..train.run import run_training


def train_command(config: list[str] = (), *, preset: str | None = None, data: str | None = None,  # type: ignore[assignment]
                  out: str | None = None, max_steps: int | None = None, resume: bool = False, ep: int = 1,
                  fsdp: bool | None = None) -> int:
    """Train a model with the paper's recipe; with no arguments, tiny-deepseekmoe on the built-in corpus (~5 min).

    Writes RUN_DIR (default runs/<preset>): config.yaml (the resolved config), metrics.jsonl, checkpoints/.
    At the end prints the validation loss and a short sample. Ctrl-C (or SIGTERM, SIGHUP) saves a checkpoint and
    stops; --resume continues exactly where the last checkpoint left off.

    Args:
        config: an optional CONFIG.yaml (see configs/), then dotted overrides such as train.lr=1e-3
            model.hidden_size=64 train.batch_size=8 (values are converted to each field's type). Precedence:
            preset < CONFIG < the options below < key=value overrides.
        preset: model preset to start from (default tiny-deepseekmoe).
        data: a data directory made by `deepseekmoe prepare` (default: the built-in corpus).
        out: the run directory (default runs/<preset>); must be empty unless --resume.
        max_steps: optimizer steps (overrides train.max_steps).
        resume: continue the run in the run directory from its latest checkpoint.
        ep: expert-parallel degree under `torchrun --nproc-per-node N` (N / ep data-parallel replicas);
            train.batch_size is the global batch, split over the N processes.
        fsdp: shard parameters, gradients and AdamW state over the processes (FSDP2, with --ep) and write
            sharded checkpoints (overrides train.fsdp; --no-fsdp turns it off). A run resumes at any number
            of processes and --ep, with or without it.
    """
    return run_training(config, preset=preset, data=data, out=out, max_steps=max_steps, resume=resume, ep=ep,
                        fsdp=fsdp, sample=sample_text)


def sample_text(model: Transformer, tokenizer_path: Path, cfg: TrainConfig) -> str:
    """The prompt and its continuation, sampled with the run's seed (deterministic)."""
    tokenizer = load_tokenizer(tokenizer_path)
    prompt_ids = encode_prompt(tokenizer, cfg.sample_prompt, model.config.bos_token_id)
    new_ids = generate(model, prompt_ids, cfg.sample_tokens, temperature=cfg.sample_temperature, seed=cfg.seed,
                       eos_token_id=model.config.eos_token_id)
    model.train()
    return tokenizer.decode(prompt_ids + new_ids)
