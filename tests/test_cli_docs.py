"""docs/cli.md is generated from library.cli.build_parser(); it must be regenerated whenever an option changes."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "tools" / "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_docs_are_up_to_date() -> None:
    gen = _generator()
    current = gen.DOC.read_text(encoding="utf-8") if gen.DOC.exists() else ""
    assert current == gen.render(), f"docs/cli.md is stale: run {gen.FIX}"


def test_every_option_is_documented_in_its_group() -> None:
    from library.cli import build_parser

    page = _generator().render()
    sections = {s.split("\n", 1)[0]: s for s in page.split("\n## ")[1:]}
    for group in build_parser()._action_groups:
        title = "general" if group.title in ("options", "optional arguments") else group.title
        for action in group._group_actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert f"| `{action.option_strings[0]}" in sections[title], f"{action.option_strings[0]} not under {title}"
    assert "| `--network_dim INT` | `4` | LoRA rank |" in page
    assert "| `--use_spd` / `--no-use_spd` | `True` (the optimizer's, when not given) |" in page


def test_check_mode_reports_a_stale_page(tmp_path: Path, monkeypatch, capsys) -> None:
    gen = _generator()
    stale = tmp_path / "cli.md"
    stale.write_text(gen.render().replace("LoRA rank", "rank"), encoding="utf-8")
    monkeypatch.setattr(gen, "DOC", stale)
    assert gen.main(["--check"]) == 1
    assert "run python tools/gen_cli_docs.py" in capsys.readouterr().err
    assert gen.main([]) == 0 and gen.main(["--check"]) == 0


HAND_WRITTEN = ["quickstart.md", "dataset-config.md", "formats.md", "troubleshooting.md", "optimizer-guides.md", "networks.md",
                "zh-TW/quickstart.md", "zh-TW/optimizer-guides.md"]
# Flags in those pages that belong to other programs: accelerate launch, sample-prompt lines, the synthetic-data
# generator, the doc generators, tensorboard, and train.py's spelling of --config_file.
NOT_TRAINER_FLAGS = {"num_processes", "cpu", "w", "h", "s", "l", "d", "n", "concept", "check", "logdir", "config-file"}


def test_hand_written_pages_name_only_real_options() -> None:
    """A renamed or removed option must not survive in the guides users copy commands from."""
    import re

    from library.cli import build_parser

    known = {s[2:] for a in build_parser()._actions for s in a.option_strings}
    for page in HAND_WRITTEN:
        text = (ROOT / "docs" / page).read_text(encoding="utf-8")
        flags = set(re.findall(r"(?<![\w-])--([a-z][a-z0-9_-]*[a-z0-9])(?![\w-])", text))
        unknown = sorted(flags - known - NOT_TRAINER_FLAGS)
        assert not unknown, f"docs/{page} names options the parser does not have: {unknown}"


def test_translations_keep_the_english_structure() -> None:
    """zh-TW pages are translations: same headings (levels and order), same code-block count, same commands."""
    import re

    for page in ("quickstart.md", "optimizer-guides.md"):
        en = (ROOT / "docs" / page).read_text(encoding="utf-8")
        zh = (ROOT / "docs" / "zh-TW" / page).read_text(encoding="utf-8")
        levels = [re.findall(r"^(#+) ", t, flags=re.M) for t in (en, zh)]
        assert levels[0] == levels[1], f"docs/zh-TW/{page}: heading structure differs from docs/{page}"
        commands = [re.findall(r"^\s*(?:python|bash|export|cp) [^#\n]*", t, flags=re.M) for t in (en, zh)]
        assert commands[0] == commands[1], f"docs/zh-TW/{page}: commands differ from docs/{page}; keep them in step"
