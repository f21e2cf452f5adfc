"""The manual's flag tables (docs/*.md) are what docs/gen_flags.py writes from the parsers now, and the README keeps
to one page. A branch that adds or rewords a flag fails here until `python docs/gen_flags.py` is rerun."""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gen_flags", REPO / "docs" / "gen_flags.py")
gen_flags = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen_flags)


def test_flag_tables_are_current():
    stale = gen_flags.stale_regions()
    assert not stale, "flag tables out of date, run: python docs/gen_flags.py\n" + "\n".join(stale)


def test_every_parser_has_its_table_and_a_new_flag_makes_it_stale(monkeypatch):
    """Control for the test above: the tables hold every flag of every parser, and one more flag shows up as a
    stale region (so the comparison can fail)."""
    parsers = gen_flags.script_parsers()
    generated = gen_flags.tables()
    for name, (parser, _) in parsers.items():
        for action in parser._actions:
            if not isinstance(action, argparse._HelpAction):
                assert f"`{action.option_strings[0]}" in generated[name], (name, action.option_strings)
    assert "`MODEL_DIR`" in generated["finetune.sbatch"] and "`PYTHONUNBUFFERED`" in generated["finetune.sbatch"]

    def with_new_flag():
        out = dict(parsers)
        parser, defaults = out["predict"]
        parser.add_argument("--new-flag", type=int, default=3, help="a flag added on some branch")
        return out
    monkeypatch.setattr(gen_flags, "script_parsers", with_new_flag)
    assert gen_flags.stale_regions() == ["docs/predict.md: flags:predict"]


def test_a_missing_table_is_reported(tmp_path):
    """A doc set without one of the regions is reported too (deleting a region cannot pass)."""
    for path in (REPO / "docs").glob("*.md"):
        (tmp_path / path.name).write_text(path.read_text().replace("<!-- flags:pretokenize -->", "<!-- gone -->"))
    stale = gen_flags.stale_regions(tmp_path)
    assert len(stale) == 1 and stale[0].startswith("flags:pretokenize: in no file under "), stale


def test_generator_loads_no_model_library():
    """The generator reads parsers only: it must not import torch/transformers (fast, and no model is loaded)."""
    code = ("import runpy, sys; sys.argv = ['gen_flags.py', '--check']\n"
            "try:\n    runpy.run_path('docs/gen_flags.py', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "[]", p.stdout


def test_readme_is_one_page():
    size = len((REPO / "README.md").read_bytes())
    assert size <= 15 * 1024, f"README.md is {size} bytes; reference material belongs in docs/"
