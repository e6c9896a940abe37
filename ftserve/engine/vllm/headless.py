"""``ftserve serve BASE --engine vllm --headless --nnodes N --node-rank K --master-addr ADDR``: a worker node.

A multi-node vLLM engine has one API node (rank 0, the ftserve server) and worker nodes that run only vLLM's
model workers and join rank 0's torch.distributed group. A worker must be built with exactly the engine
arguments of rank 0 (LoRA buffers, parallel sizes, dtype), so it takes them from the same
``VllmEngine.engine_args`` and hands them to vLLM's own headless entry point (``vllm serve --headless``).
It returns when vLLM's workers exit (on SIGTERM, or when rank 0 goes away).
"""

from __future__ import annotations

import dataclasses
import os

from ..options import EngineOptions


def run_headless(base: str | os.PathLike, options: EngineOptions) -> None:
    from vllm.entrypoints.cli.serve import run_headless as vllm_headless
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from .engine import VllmEngine

    engine_args = VllmEngine.from_options(base, options).engine_args()
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", str(base)])
    for field in dataclasses.fields(engine_args):
        setattr(args, field.name, getattr(engine_args, field.name))
    args.headless, args.api_server_count = True, 0
    vllm_headless(args)
