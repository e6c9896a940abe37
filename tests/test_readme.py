"""README.md as CI reads it: the two commands .ci/ runs out of it, and its links, which no docs build checks."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / ".ci"))

from readme_command import readme_command  # noqa: E402


def test_ci_finds_the_tour_line_and_the_test_line_in_the_readme():
    tour, tests = readme_command("quickstart"), readme_command("test")
    assert "pip install -e '.[quickstart]'" in tour and tour.endswith("ftserve quickstart")
    assert tests.endswith("python -m pytest -q tests") and "'.[test]'" in tests
    assert readme_command("x", "<!-- ci: x -->\n```sh\na \\\nb\n```\n") == "a  b"  # a continued line is one


def test_every_relative_link_of_the_readme_names_a_file_that_exists():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    local = [link for link in links if "://" not in link]
    assert local and [link for link in local if not (ROOT / link).exists()] == []
