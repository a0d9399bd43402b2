"""The names of the files this project reads and writes, one name for each.

    a checkpoint directory     MODEL_FILE, CONFIG_FILE (ModelConfig as JSON), TOKENIZER_FILE,
                               CHECKPOINT_RUN_CONFIG_FILE (the run config it was trained with), TRAINER_STATE_FILE
                               (optimizer, scheduler, RNG and progress: a training checkpoint)
    a sharded checkpoint       SHARDED_DIR/ (torch.distributed.checkpoint's files), SHARDED_EXTRA_FILE, CONFIG_FILE,
                               TOKENIZER_FILE, CHECKPOINT_RUN_CONFIG_FILE
    a run directory            RUN_CONFIG_FILE (the resolved run config), METRICS_FILE (the training log),
                               checkpoints/STEP_PREFIX########/
    a data directory           META_FILE, TOKENIZER_FILE, TOKEN_FILES (one token file per split)
An HF directory uses CONFIG_FILE, TOKENIZER_FILE and (a single shard) MODEL_FILE under the same names, and holds
TOKENIZER_CONFIG_FILE and GENERATION_CONFIG_FILE beside them.
"""

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
CHECKPOINT_RUN_CONFIG_FILE = "run_config.yaml"
TRAINER_STATE_FILE = "trainer_state.pt"
SHARDED_DIR = "dcp"
SHARDED_EXTRA_FILE = "extra_state.pt"
SHARDED_METADATA_FILE = ".metadata"  # what torch.distributed.checkpoint writes last into SHARDED_DIR
RUN_CONFIG_FILE = "config.yaml"
STEP_PREFIX = "step_"
META_FILE = "meta.json"
METRICS_FILE = "metrics.jsonl"
TOKEN_FILES = {"train": "train.bin", "val": "val.bin"}
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
