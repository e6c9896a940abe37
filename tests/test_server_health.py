"""GET /health: 200 while the engine serves, 503 once its model loop has ended, whatever ended it."""

import asyncio
import socket

import httpx
import uvicorn

from ftserve.engine.torch import TorchEngine
from ftserve.server.app import build_app
from ftserve.server.serving import ServerSettings


def test_health_answers_503_once_the_engine_loop_has_ended(llama_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main():
        engine = TorchEngine.from_pretrained(llama_dir, model_name="base")
        await engine.start()
        app = build_app(engine, ServerSettings("base", str(llama_dir)))
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off",
                                               log_level="warning"))
        task = asyncio.create_task(server.serve())
        try:
            while not server.started:
                await asyncio.sleep(0.02)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                alive = await client.get("/health")
                engine.core.stop()  # the model thread ends without the server being told
                await asyncio.get_running_loop().run_in_executor(None, engine.core.thread.join)
                dead = await client.get("/health")
                completion = await client.post("/v1/completions", json={"model": "base", "prompt": [1, 5, 6],
                                                                        "max_tokens": 2})
        finally:
            server.should_exit = True
            await task
            await engine.shutdown()
        return alive, dead, completion

    alive, dead, completion = asyncio.run(main())
    assert alive.status_code == 200 and alive.json() == {"status": "ok"}
    assert dead.status_code == 503 and dead.json() == {"status": "engine stopped"}
    assert completion.status_code == 503
