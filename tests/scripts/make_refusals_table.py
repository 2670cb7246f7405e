"""Print docs/refusals.md: every case of tests/test_refusals.py, run through ``refine.loop.main``, with
the one line it prints. ``.venv/bin/python tests/scripts/make_refusals_table.py > docs/refusals.md``"""

import contextlib
import io
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
import conftest  # noqa: E402,F401  (the offline sandbox: environment, caches)
from test_refusals import CASES, GOOD, _manifest  # noqa: E402

from refine import loop  # noqa: E402
from refine.offline.devserver import FakeOpenAIServer  # noqa: E402
from refine.offline.models import build_vit_gpt2  # noqa: E402
from refine.offline.tokenizer import write_gpt2_tokenizer_files  # noqa: E402

INTRO = """# What refine refuses

Every input below is refused before a run directory exists and before any request reaches a critic:
one line on stderr that names the input and says what to write instead, exit code 2, no traceback.
Each row is a case of `tests/test_refusals.py`, which checks the exit code, the single line, the
message, that no run directory was left and that the local critic server received nothing. The
messages were printed by `python -m refine.loop` (temporary paths shortened to `…`); rebuild this page
with `.venv/bin/python tests/scripts/make_refusals_table.py > docs/refusals.md`.

| input | example | message (exit code 2) |
|---|---|---|
"""

TAIL = (Path(__file__).parent / "refusals_tail.md").read_text()


def main() -> None:
    work = Path(tempfile.mkdtemp())
    with contextlib.redirect_stdout(io.StringIO()):  # ultralytics and transformers print setup notes
        student = build_vit_gpt2(work / "student", tokenizer_cache=str(write_gpt2_tokenizer_files(work / "tok")))
    rows = []
    for name, make_args, _ in CASES:
        case = Path(tempfile.mkdtemp())
        (case / "empty").mkdir()
        (case / "work").mkdir()
        images = _manifest(case / "work", [GOOD])
        with FakeOpenAIServer() as server:
            url = server.base_url
            extra = make_args(case, url)
            err = io.StringIO()
            loop.console.file = err
            with contextlib.redirect_stdout(io.StringIO()):
                code = loop.main(["--images", str(images), f"--student.model={student}",
                                  f"--loop.runs_dir={case / 'runs'}", "--loop.use_regions=false", "--rounds=1", *extra])
        assert code == 2, (name, err.getvalue())
        line = err.getvalue().strip().splitlines()[-1].replace(str(images), "…").replace(str(case), "…")
        line = line.replace(url, "http://127.0.0.1:PORT/v1").replace(str(TESTS.parent), "…")
        shown = " ".join(extra).replace(str(case), "…").replace(url, "http://127.0.0.1:PORT/v1")
        rows.append(f"| {name} | `{shown}` | {line.replace('|', chr(92) + '|')} |")
    sys.stdout.write(INTRO + "\n".join(rows) + "\n\n" + TAIL)


if __name__ == "__main__":
    main()
