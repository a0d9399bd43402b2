"""benchmarks/llama_cpp_16b.py is optional: without llama_cpp or llama.cpp's conversion script its steps say so
and do nothing."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import llama_cpp_16b  # noqa: E402


def test_decode_without_llama_cpp_is_skipped(monkeypatch, tmp_path: Path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    result = llama_cpp_16b.decode(str(tmp_path / "absent.gguf"), str(tmp_path / "absent"), 2, 4, 4, 1)
    assert result == {"step": "decode", "skipped": "llama_cpp is not installed (pip install llama-cpp-python)"}


def test_gguf_without_the_conversion_script_is_skipped(tmp_path: Path):
    result = llama_cpp_16b.gguf(tmp_path, tmp_path / "out.gguf", tmp_path / "convert_hf_to_gguf.py")
    assert result["skipped"].startswith("no llama.cpp convert_hf_to_gguf.py") and not list(tmp_path.iterdir())
