"""`ftserve quickstart`: train, merge, verify and serve, offline, on a small model built locally."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path

import click

from .errors import clean_errors

MERGED_METHOD = "lora"


@click.command()
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("ftserve-quickstart"), show_default=True,
              help="Folder for the base model, the adapters and the merged model.")
@click.option("--steps", type=click.IntRange(min=2), default=40, show_default=True, help="Training steps per method.")
@click.option("--serve/--no-serve", default=True, show_default=True,
              help="Serve the base and the adapters afterwards (needs the [serve] extra).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--exit-after-check", is_flag=True,
              help="Stop the server once the sample requests have been answered (for scripts and CI).")
@click.pass_context
@clean_errors
def quickstart(ctx: click.Context, out_dir: Path, steps: int, serve: bool, port: int, exit_after_check: bool) -> None:
    """Offline tour: build a small model, train each of the five methods briefly, merge one, serve the rest."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .serve import check_port

    if serve:
        check_port("127.0.0.1", port)  # before any training: a busy port fails now, not after minutes
    from ..merge import AdapterSpec, merge_checkpoint
    from ..merge.verify import verify_merge
    from ..quickstart import run_training

    click.echo(f"1/4 Building a small Llama-shaped model and tokenizer in {out_dir / 'base'}")
    bars: dict = {}

    def progress(method: str, step: int, total: int, loss: float) -> None:
        if method not in bars:
            bars[method] = click.progressbar(length=total, label=f"2/4 training {method:<10}", show_pos=True)
            bars[method].__enter__()
        bars[method].label = f"2/4 training {method:<10} loss {loss:6.3f}"
        bars[method].update(1)
        if step == total:
            bars[method].__exit__(None, None, None)

    base_dir, results = run_training(out_dir, steps, progress)
    click.echo(f"\n{'method':<11} {'trainable':>10} {'loss first':>11} {'loss last':>10}  adapter")
    for r in results:
        click.echo(f"{r.method:<11} {r.trainable:>10,d} {r.first_loss:>11.3f} {r.last_loss:>10.3f}  {r.path}")

    merged_dir = out_dir / "merged"
    adapters = {r.method: r.path for r in results}
    spec = AdapterSpec.parse(str(adapters[MERGED_METHOD]))
    click.echo(f"\n3/4 Merging the {MERGED_METHOD} adapter into a standalone model: {merged_dir}")
    merge_checkpoint(base_dir, [spec], merged_dir, force=True)
    report = verify_merge(base_dir, [spec], merged_dir)
    click.echo(f"    verify: {report.summary()}")
    if not report.passed:
        raise click.ClickException("the merged model does not match the adapter model")

    served = {m: str(p) for m, p in adapters.items() if m != MERGED_METHOD}
    if not serve:
        click.echo(f"\nDone. Serve them with:\n  ftserve serve {base_dir} "
                   + " ".join(f"--adapter {n}={p}" for n, p in served.items()))
        return
    from .serve import serve as serve_command

    click.echo(f"\n4/4 Serving the base model and {len(served)} adapters on http://127.0.0.1:{port}")
    threading.Thread(target=_try_it, args=(port, str(base_dir), list(served), exit_after_check), daemon=True).start()
    ctx.invoke(serve_command, base=str(base_dir), adapters=tuple(f"{n}={p}" for n, p in served.items()),
               port=port, log_level="warning")


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def _try_it(port: int, base: str, adapters: list[str], exit_after_check: bool) -> None:
    """Wait for the server, answer one request per adapter, print the calls to try, and maybe stop it."""
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1):
                break
        except OSError:
            time.sleep(0.2)
    else:
        click.echo("the server did not come up", err=True)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    for name in [base, *adapters]:
        try:
            out = _post(f"{url}/v1/completions", {"model": name, "prompt": "the cat", "max_tokens": 8,
                                                  "temperature": 0})
        except OSError as exc:  # an HTTP error too: one line, not a thread's traceback
            click.echo(f"    {name:<12} -> request failed: {exc}", err=True)
            continue
        click.echo(f"    {name:<12} -> {out['choices'][0]['text']!r}")
    adapter = adapters[0]
    click.echo(f"""
Try it (the server runs until Ctrl-C):

  curl {url}/v1/models
  curl {url}/v1/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "{adapter}", "prompt": "the cat", "max_tokens": 16, "temperature": 0}}'

  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="none")
  print(client.chat.completions.create(model="{adapter}", max_tokens=16, temperature=0,
        messages=[{{"role": "user", "content": "the cat"}}]).choices[0].message.content)
""")
    if exit_after_check:
        os.kill(os.getpid(), signal.SIGTERM)
