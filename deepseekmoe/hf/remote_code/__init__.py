"""The DeepSeekMoE model for transformers as plain files, standalone on torch + transformers.

`configuration_deepseek.py` and `modeling_deepseek.py` import nothing from this package: every HF export
(`deepseekmoe convert --to-hf`, `save_pretrained`) gets a verbatim copy, which is what its config.json `auto_map`
names, so `from_pretrained(EXPORT, trust_remote_code=True)` works where only transformers is installed.
`deepseekmoe.hf` registers the same classes natively.
"""
