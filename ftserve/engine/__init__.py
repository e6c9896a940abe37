"""Inference engines behind one small interface (see base.py): the embedded torch engine, and vLLM."""
