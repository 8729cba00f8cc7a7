"""Generate man/anchore-objmig.1 from the argparse parser (argparse-manpage).

`--check` regenerates into memory and exits 1 when the committed page is
stale; the tests run it. The date is fixed per release so that the page only
changes when the parser or the extra sections change.
"""

import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "man", "anchore-objmig.1")
INCLUDE = os.path.join(ROOT, "man", "anchore-objmig.include")
RELEASE_DATE_EPOCH = "1795996800"  # 2026-12-01, the page's date


def generate(output):
    from anchore_objmig import __version__

    # This checkout's parser, not whichever anchore_objmig the venv has installed.
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, SOURCE_DATE_EPOCH=RELEASE_DATE_EPOCH, COLUMNS="80", PYTHONPATH=path)
    subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "argparse-manpage"),
         "--module", "anchore_objmig.cli", "--function", "build_parser",
         "--project-name", "anchore-objmig", "--prog", "anchore-objmig", "--version", __version__,
         "--description", "move Anchore object-store documents between storage backends",
         "--manual-title", "anchore-objmig manual", "--include", INCLUDE, "--output", output],
        check=True, env=env, cwd=ROOT,
    )


def main():
    if "--check" in sys.argv[1:]:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = os.path.join(tmp, "page.1")
            generate(fresh)
            with open(fresh, encoding="utf-8") as a, open(PAGE, encoding="utf-8") as b:
                if a.read() != b.read():
                    print("man/anchore-objmig.1 is stale: run `make man`", file=sys.stderr)
                    return 1
        return 0
    generate(PAGE)
    print(f"wrote {os.path.relpath(PAGE, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
