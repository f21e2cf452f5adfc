#!/usr/bin/env python
"""Write the flag tables of the manual (docs/*.md) from the scripts' own parsers, so they cannot drift from --help.

    python docs/gen_flags.py            # rewrite every generated region in docs/*.md
    python docs/gen_flags.py --check    # change nothing; exit 1 naming each region that is out of date

A region is the text between `<!-- flags:NAME -->` and `<!-- /flags:NAME -->`; NAME is a key of TABLES. A row is
one flag as `python SCRIPT --help` describes it: the flag and its metavar, the default, the help text (the
"(default: X)" that --help appends moves to the default column). tests/test_docs.py fails while a region differs from what
this script writes now, so a change to a flag's help or a new flag lands together with its documentation.

Nothing heavy is imported: data_processing.py, pretokenize.py and predict.py build their parser inside
parse_args(), which is run here only up to the moment it would parse (the parser is taken there); finetune.py's
parser is qlora.config.build_parser, taken from there because importing finetune.py would import torch.
finetune.sbatch's settings are the `NAME=${NAME:-default}  # meaning` lines at its top.
The rendering uses argparse's formatter, so another Python version may word a row differently (this one: 3.11).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
REGION = re.compile(r"<!-- flags:(?P<name>[\w.]+) -->\n(?P<body>.*?)<!-- /flags:(?P=name) -->", re.S)

# Defaults that depend on the machine the generator runs on: shown as this text, so the docs are the same everywhere.
MACHINE_DEFAULTS = {("pretokenize", "num_proc"): "os.cpu_count()"}


# ------------------------------------------------------------------------------------------------- parsers
class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def parser_of(parse_args) -> argparse.ArgumentParser:
    """The parser a script's parse_args(argv) builds, taken at its parse_args call (nothing is parsed or run)."""
    def capture(self, *args, **kwargs):
        raise _Captured(self)

    original, argv0 = argparse.ArgumentParser.parse_args, sys.argv[0]
    argparse.ArgumentParser.parse_args = capture
    sys.argv[0] = parse_args.__module__ + ".py"  # %(prog)s, as the script would print it
    try:
        parse_args([])
    except _Captured as c:
        return c.parser
    finally:
        argparse.ArgumentParser.parse_args, sys.argv[0] = original, argv0
    raise RuntimeError(f"{parse_args.__module__}.parse_args returned without calling ArgumentParser.parse_args")


def script_parsers() -> dict[str, tuple[argparse.ArgumentParser, dict | None]]:
    """name -> (parser, defaults when they live outside the parser)."""
    sys.path.insert(0, str(REPO))
    import data_processing
    import predict
    import pretokenize
    from qlora.config import TrainConfig, build_parser

    parsers = {"data_processing": (parser_of(data_processing.parse_args), None),
               "pretokenize": (parser_of(pretokenize.parse_args), None),
               # finetune's flags default to SUPPRESS so that a YAML file can sit between; the defaults are the
               # dataclass's
               "finetune": (build_parser(""), {f.name: getattr(TrainConfig(), f.name)
                                               for f in dataclasses.fields(TrainConfig)}),
               "predict": (parser_of(predict.parse_args), None)}
    for (name, dest), shown in MACHINE_DEFAULTS.items():
        action = next(a for a in parsers[name][0]._actions if a.dest == dest)
        assert action.default == os.cpu_count(), f"{name} --{dest}: default no longer os.cpu_count(); update MACHINE_DEFAULTS"
        action.default = shown
    return parsers


# ------------------------------------------------------------------------------------------------- rendering
def _cell(text: str) -> str:
    """Plain text in a markdown table cell: pipes would split the cell, `*` and `<` would turn into markup."""
    return (" ".join(text.split()).replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*")
            .replace("<", "&lt;"))


def _code(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


def _default(action: argparse.Action, defaults: dict | None) -> str:
    value = defaults.get(action.dest, action.default) if defaults is not None else action.default
    if action.required:
        return "required"
    if value is None or value is argparse.SUPPRESS:
        return "—"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    text = str(value)
    return _code(repr(text) if not text.strip() else text)


_APPENDED_DEFAULT = re.compile(r"\s*\[default: [^\]]*\]$")  # qlora.config.build_parser's suffix


def render_parser(parser: argparse.ArgumentParser, defaults: dict | None = None) -> str:
    # A plain formatter: the help text as written, without the "(default: X)" that ArgumentDefaultsHelpFormatter
    # appends (the default has its own column); %(default)s and %(prog)s expand as in --help.
    formatter = argparse.HelpFormatter(parser.prog)
    out = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.help is not argparse.SUPPRESS
                   and not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        if group.title not in ("options", "optional arguments", "positional arguments"):
            out.append(f"**{group.title}**" + (f": {_cell(group.description)}" if group.description else ""))
            out.append("")
        out += ["| flag | default | meaning |", "| --- | --- | --- |"]
        for action in actions:
            help_text = _APPENDED_DEFAULT.sub("", formatter._expand_help(action))
            default = _default(action, defaults)
            if help_text.endswith(" (required)"):
                help_text, default = help_text[:-len(" (required)")], "required"
            out.append(f"| {_code(formatter._format_action_invocation(action))} | {default} | {_cell(help_text)} |")
        out.append("")
    return "\n".join(out).rstrip("\n")


SETTING = re.compile(r"^(?:export )?(?P<name>[A-Z][A-Z0-9_]*)=\$\{(?P=name):-(?P<default>.*?)\}\s*(?:#\s*(?P<help>.*))?$")


def render_sbatch_settings(path: Path) -> str:
    """The settings block at the top of a batch script: each `NAME=${NAME:-default}` line (or `export ...`) with its
    trailing comment, or the comment lines right above it; the block ends at the first other command."""
    rows, above = [], []
    for line in path.read_text().splitlines():
        m = SETTING.match(line)
        if m:
            help_text = m["help"] or " ".join(above)
            if not help_text:
                raise ValueError(f"{path.name}: setting {m['name']} has no comment to document it")
            default = m["default"].strip('"')
            rows.append(f"| `{m['name']}` | {_code(default) if default else '—'} | {_cell(help_text)} |")
            above = []
        elif line.startswith("#") and not line.startswith(("#!", "#SBATCH")):
            above.append(line.lstrip("#").strip())
        elif not line.strip():
            above = []
        elif not line.startswith("#"):
            break
    return "\n".join(["| variable | default | meaning |", "| --- | --- | --- |", *rows])


def tables() -> dict[str, str]:
    out = {name: render_parser(parser, defaults) for name, (parser, defaults) in script_parsers().items()}
    out["finetune.sbatch"] = render_sbatch_settings(REPO / "finetune.sbatch")
    return out


# ------------------------------------------------------------------------------------------------- regions
def source_of(name: str) -> str:
    return {"finetune": "qlora/config.py (finetune.py's flags)",
            "finetune.sbatch": "the settings block of finetune.sbatch"}.get(name, f"{name}.py")


def update(text: str, generated: dict[str, str], where: str = "") -> str:
    """text with every flags region rewritten; an unknown region name is an error."""
    def body(m):
        name = m["name"]
        if name not in generated:
            raise SystemExit(f"{where}: unknown region flags:{name} (known: {', '.join(sorted(generated))})")
        return (f"<!-- flags:{name} -->\n<!-- generated by docs/gen_flags.py from {source_of(name)}: edit the text "
                f"there, then run python docs/gen_flags.py -->\n{generated[name]}\n<!-- /flags:{name} -->")
    return REGION.sub(body, text)


def stale_regions(docs: Path = DOCS, generated: dict[str, str] | None = None) -> list[str]:
    """'FILE: flags:NAME' for each region that differs from what would be written now, and 'flags:NAME: in no
    file' for each table that no doc holds."""
    generated = tables() if generated is None else generated
    stale, seen = [], set()
    for path in sorted(docs.glob("*.md")):
        text = path.read_text()
        new = update(text, generated, str(path))
        old_regions = {m["name"]: m[0] for m in REGION.finditer(text)}
        seen.update(old_regions)
        for m in REGION.finditer(new):
            if old_regions.get(m["name"]) != m[0]:
                stale.append(f"{os.path.relpath(path, REPO)}: flags:{m['name']}")
    stale += [f"flags:{name}: in no file under {os.path.relpath(docs, REPO)}" for name in sorted(set(generated) - seen)]
    return stale


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a region is out of date")
    args = ap.parse_args(argv)
    generated = tables()
    if args.check:
        stale = stale_regions(DOCS, generated)
        for s in stale:
            print(f"out of date: {s}", file=sys.stderr)
        if stale:
            print("run: python docs/gen_flags.py", file=sys.stderr)
        return 1 if stale else 0
    for path in sorted(DOCS.glob("*.md")):
        text = path.read_text()
        new = update(text, generated, str(path))
        if new != text:
            path.write_text(new)
            print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
