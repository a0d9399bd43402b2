"""Data: corpus reading, byte-level BPE tokenizers, token files and the packed dataset.

`deepseekmoe prepare` (prepare.py) writes a data directory; dataset.py reads it (read_meta, open_split,
PackedBatches, eval_batches); builtin.py defines the no-download corpus, builtin_cache.py prepares it once
(ensure_builtin_data).
"""
