"""The man page is generated from the parser and must be fresh; the README's
commands are the ones CI runs."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_man_page_is_fresh():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "build_man.py"), "--check"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_man_page_covers_every_command_and_the_operator_sections():
    with open(os.path.join(ROOT, "man", "anchore-objmig.1"), encoding="utf-8") as handle:
        page = handle.read()
    for heading in ("EXIT STATUS", "ENVIRONMENT", "FILES", "EXAMPLES"):
        assert f".SH {heading}" in page
    for command in ("check", "migrate", "list\\-migrations", "list\\-drivers"):
        assert f"anchore\\-objmig {command}" in page
    for flag in ("nodelete", "dontask", "from\\-analysis\\-archive", "to\\-analysis\\-archive", "db\\-connect", "workers"):
        assert f"\\-\\-{flag}" in page


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as handle:
        commands = [line.strip() for line in handle if line.strip() and not line.startswith(("#", "set ", "cd "))]
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    assert commands and commands[-1] in readme
