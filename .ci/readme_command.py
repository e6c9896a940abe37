"""Print a command that README.md shows, so CI runs the README's own words, never a copy of them.

    python .ci/readme_command.py quickstart     # the install-and-run line
    python .ci/readme_command.py test           # the test line

The README marks each such block with ``<!-- ci: NAME -->`` on the line before its fence; the block holds one
shell command (a line may end in a backslash to continue).
"""

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_command(name: str, text: str | None = None) -> str:
    text = README.read_text(encoding="utf-8") if text is None else text
    found = re.findall(rf"^<!-- ci: {re.escape(name)} -->\n```\w*\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    if len(found) != 1:
        raise SystemExit(f"README.md must mark exactly one block with <!-- ci: {name} -->; found {len(found)}")
    return found[0].replace("\\\n", " ").strip()


if __name__ == "__main__":
    print(readme_command(sys.argv[1]))
