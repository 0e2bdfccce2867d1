"""Write the bad-input table of docs/robustness.md by running every case of tests/training/test_bad_inputs.py.

Each case is built in a temporary folder and run through the real entry point (model loads refused, as in the
test); the table shows what the user gets: the error line and the exit code. Temporary paths are shown as
`~/run`. Only the part between the BEGIN/END markers is rewritten; tests/test_robustness_docs.py fails when it
is stale.

    python tools/gen_robustness_docs.py          # rewrite the table in docs/robustness.md
    python tools/gen_robustness_docs.py --check  # exit 1 if it is stale
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from tests.training import test_bad_inputs as corpus  # noqa: E402
from tools.docgen import write_or_check  # noqa: E402

DOC = ROOT / "docs" / "robustness.md"
FIX = "python tools/gen_robustness_docs.py"
BEGIN = "<!-- BEGIN GENERATED: tools/gen_robustness_docs.py -->"
END = "<!-- END GENERATED -->"
SHOWN_TMP = "~/run"


def _flag_values(argv: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    flag = None
    for token in argv:
        if token.startswith("--"):
            flag = token
            out[flag] = []
        elif flag is not None:
            out[flag].append(token)
    return out


def _changed_flags(argv: list[str], base: list[str]) -> str:
    """The flags a case adds to, or changes in, the good command line."""
    before = _flag_values(base)
    return " ".join(" ".join([flag, *values]) for flag, values in _flag_values(argv).items()
                    if before.get(flag) != values)


def _input(case, run: corpus.CaseRun, tmp: Path, env_added: dict[str, str]) -> str:
    """The table cell: the case's docstring, else the environment variables and flags it sets."""
    if case.__doc__:
        return _cell(case.__doc__.strip().splitlines()[0])
    parts = [_code(f"{k}={v}") for k, v in env_added.items()]
    changed = _changed_flags(run.argv, corpus.train_argv(tmp / "dataset.toml", tmp / "out"))
    if changed:
        parts.append(_code(changed))
    return " with ".join(parts)


def run_cases() -> list[tuple[str, str, str, str, int]]:
    """(kind, case, input, error line, exit code) for every case, in the corpus's order."""
    logging.disable(logging.CRITICAL)  # the entry's INFO lines are not part of the table
    rows = []
    try:
        for kind, cases in corpus.CASES_BY_KIND.items():
            for name, case in cases.items():
                with tempfile.TemporaryDirectory() as tmp_name, pytest.MonkeyPatch.context() as mp:
                    tmp = Path(tmp_name)
                    mp.chdir(tmp)  # messages that mention the current folder show it as SHOWN_TMP too
                    environ = dict(os.environ)
                    run = corpus.run_case(case, tmp, mp)
                    env_added = {k: v for k, v in os.environ.items() if environ.get(k) != v}
                    line = run.stderr[-1] if run.stderr else "(no message)"
                    rows.append((kind, name, _input(case, run, tmp, env_added).replace(str(tmp), SHOWN_TMP),
                                 line.replace(str(tmp), SHOWN_TMP), run.code))
    finally:
        logging.disable(logging.NOTSET)
    return rows


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _code(text: str) -> str:
    """An inline code span that survives backticks inside the text."""
    text = " ".join(text.split()).replace("|", "\\|")
    fence = "``" if "`" in text else "`"
    return f"{fence} {text} {fence}" if fence == "``" else f"`{text}`"


def render() -> str:
    """The generated block, markers included."""
    rows = run_cases()
    lines = [BEGIN, "", f"{len(rows)} cases, each run through the real entry point by `{FIX}` "
             "(the same corpus as `tests/training/test_bad_inputs.py`).", ""]
    for kind in corpus.CASES_BY_KIND:
        lines += [f"### {kind}", "", "| case | input | what you see | exit |", "|---|---|---|---|"]
        lines += [f"| {_cell(name)} | {given} | {_code(line)} | {code} |" for k, name, given, line, code in rows if k == kind]
        lines.append("")
    return "\n".join([*lines, END])


def replace_block(text: str) -> str:
    """`text` with its generated block replaced (appended when there is none)."""
    head, sep, rest = text.partition(BEGIN)
    if not sep:
        return text.rstrip("\n") + "\n\n" + render() + "\n"
    _, sep, tail = rest.partition(END)
    if not sep:
        raise SystemExit(f"{DOC}: {BEGIN} without {END}")
    return head + render() + tail


def main(argv: list[str] | None = None) -> int:
    return write_or_check(DOC, replace_block, FIX, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
