"""README's option reference table, generated from the config dataclasses and ee_cli.commands.options.

    .venv/bin/python scripts/options_reference.py           # print it
    .venv/bin/python scripts/options_reference.py --write   # replace the table in README.md
"""

import sys
from pathlib import Path

from ee_cli.commands.options import reference_table

HEADER = "| option | commands (default) | meaning |"

if "--write" in sys.argv:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    start = text.index(HEADER)
    end = text.index("\n\n", start)
    readme.write_text(text[:start] + reference_table() + text[end:])
else:
    print(reference_table())
