"""Hugging Face safetensors folders: llm-compressor weight-only; common.py loads and describes them."""
