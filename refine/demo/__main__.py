"""``python -m refine.demo`` (``make demo``): see ``refine.demo.driver``."""

import sys

from rich.markup import escape

from refine.demo.driver import console, main

try:
    sys.exit(main())
except (ValueError, OSError, KeyError) as e:
    console.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True)
    sys.exit(2)
