"""The README's install-and-run line, as README.md writes it, in a fresh virtual environment (see .ci/readme_stage).

It drives the line with tests/test_quickstart.py's driver and checks (the tour's answers on SmolLM2), so the
stage and the test agree on what "the tour works" means; the line runs from the checkout's root, as a user
runs it after `git clone`, with a model cache of its own so that the GGUF conversion is timed too.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / ".ci"), str(ROOT / "tests")]

from readme_command import readme_command  # noqa: E402
from test_quickstart import check_real_tour, run_quickstart  # noqa: E402

OUTPUT = ROOT / "ftserve-quickstart"  # where `ftserve quickstart` writes by default, in the folder it runs in


def main() -> None:
    line = readme_command("quickstart")
    print(f"README stage: {line}", flush=True)
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):  # nothing of this environment leaks into the new one
        os.environ.pop(name, None)
    kept = OUTPUT.exists()
    with tempfile.TemporaryDirectory(prefix="ftserve-readme-") as tmp:
        tmp = Path(tmp)
        started = time.monotonic()
        venv = tmp / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        env = {"PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv),
               "FTSERVE_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": str(os.cpu_count())}
        try:
            tour = run_quickstart(tmp, command=["bash", "-c", line], python=str(venv / "bin" / "python"), env=env,
                                  cwd=ROOT, timeout=3600)
        finally:
            if not kept:
                shutil.rmtree(OUTPUT, ignore_errors=True)
        check_real_tour(tour)
    print(tour.stdout[tour.stdout.index("1/4 "):], flush=True)
    print(f"README stage passed: fresh virtual environment to the first answer of the printed openai call in "
          f"{tour.answered_at - started:.0f} s; Ctrl-C then exited 0 without a traceback", flush=True)


if __name__ == "__main__":
    main()
