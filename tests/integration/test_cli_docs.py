"""docs/cli.md against the command line itself (issue 12): every command and flag the doc
shows exists in the click command tree, every command of the tree is documented, the example
output is generated (``python docs/generate_cli.py``) rather than pasted, and nothing in it
names a directory of the machine that produced it.

The doc is read three ways: the ``$ dispatcher …`` lines of its ``console`` blocks, the
command overview (``dispatcher …`` lines of plain code blocks, ``a|b`` for alternatives), and
inline code spans that start with a command (``triggers add --park-on``). No Postgres needed.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from dispatcher.cli import main

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"

Path_ = tuple[str, ...]

FENCE = re.compile(r"^```(?P<lang>\w*)\n(?P<body>.*?)^```$", re.DOTALL | re.MULTILINE)
REGION = re.compile(r"<!-- cli: (\S+) -->\n(.*?)<!-- /cli -->", re.DOTALL)
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
COMMAND_WORD = re.compile(r"[a-z][a-z-]*(\|[a-z][a-z-]*)*")

# What would tie the doc to one machine: home, work and temporary directories, virtualenvs,
# installed packages, absolute paths in traceback frames.
MACHINE_PATHS = re.compile(
    r"/work/|/home/|/root/|/Users/|/tmp/|/var/folders/|/private/|site-packages|dist-packages"
    r"|\.venv/|File \"/|[A-Z]:\\"
)


def commands(group: click.Group = main, prefix: Path_ = ()) -> dict[Path_, click.Command]:
    """Every command of the tree, groups included, by its path of names."""
    found: dict[Path_, click.Command] = {}
    for name, command in group.commands.items():
        path = (*prefix, name)
        found[path] = command
        if isinstance(command, click.Group):
            found.update(commands(command, path))
    return found


def leaves() -> set[Path_]:
    return {p for p, c in commands().items() if not isinstance(c, click.Group)}


def options(command: click.Command) -> set[str]:
    names = {"--help"}
    for param in command.params:
        if isinstance(param, click.Option):
            names.update(param.opts, param.secondary_opts)
    return names


def all_options() -> set[str]:
    return set.union(options(main), *(options(c) for c in commands().values()))


def expand(words: list[str]) -> Iterator[list[str]]:
    """``triggers list|add`` as ``triggers list`` and ``triggers add``."""
    for i, word in enumerate(words[:2]):
        if "|" in word and COMMAND_WORD.fullmatch(word):
            for alternative in word.split("|"):
                yield from expand([*words[:i], alternative, *words[i + 1 :]])
            return
    yield words


def resolve(words: list[str]) -> tuple[Path_, click.Command, list[str]] | str:
    """The command ``words`` name and the words after it, or what is wrong."""
    command: click.Command = main
    path: Path_ = ()
    rest = list(words)
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        sub = command.commands.get(rest[0])
        if sub is None:
            if COMMAND_WORD.fullmatch(rest[0]):
                where = " ".join(("dispatcher", *path))
                return f"`{where}` has no command {rest[0]!r}"
            break
        path, command, rest = (*path, rest[0]), sub, rest[1:]
    return path, command, rest


def examples(doc: str) -> list[str]:
    """The command lines of the ``$ dispatcher`` examples, continuation lines joined."""
    found = []
    for block in FENCE.finditer(doc):
        if block["lang"] != "console":
            continue
        joined = block["body"].replace("\\\n", " ")
        found += [
            " ".join(ln[2:].split()) for ln in joined.splitlines() if ln.startswith("$ dispatcher ")
        ]
    return found


def overview(doc: str) -> list[str]:
    """The ``dispatcher …`` lines of plain code blocks, up to the description column."""
    found = []
    for block in FENCE.finditer(doc):
        if block["lang"] == "":
            found += [
                re.split(r"\s{2,}", ln.strip())[0]
                for ln in block["body"].splitlines()
                if ln.startswith("dispatcher ")
            ]
    return found


def spans(doc: str) -> list[str]:
    """Inline code spans outside code blocks and HTML comments, line breaks as spaces."""
    prose = re.sub(r"<!--.*?-->", "", FENCE.sub("", doc), flags=re.DOTALL)
    return [s.replace("\n", " ").replace("\\|", "|") for s in re.findall(r"`([^`]+)`", prose)]


def check_examples(doc: str) -> list[str]:
    """Each example runs as typed as far as click's parser goes: known commands, known
    options, no extra arguments (values are not checked: some examples show bad ones)."""
    problems = []
    for line in examples(doc):
        words = shlex.split(line)[1:]
        found = resolve(words)
        if isinstance(found, str):
            problems.append(f"{line}: {found}")
            continue
        path, command, rest = found
        # click's parser alone: options and arguments, no callbacks and no values checked.
        parser = command.make_parser(click.Context(command, info_name=" ".join(path)))
        try:
            _, extra, _ = parser.parse_args(rest)
        except click.UsageError as exc:
            problems.append(f"{line}: {exc.format_message()}")
            continue
        if extra:
            problems.append(f"{line}: unexpected extra argument {' '.join(extra)}")
    return problems


def check_mentions(doc: str) -> list[str]:
    """Overview lines and the inline spans that start with a command: the commands exist
    and have the flags shown. A flag shown without a command exists on some command."""
    problems = []
    top = set(main.commands)
    known = all_options()
    mentions = [(s.split(), False) for s in spans(doc)]
    mentions += [(line.split()[1:], True) for line in overview(doc)]
    for words, is_command in mentions:
        if words[:1] == ["dispatcher"]:
            words, is_command = words[1:], True
        text = " ".join(words)
        flags = FLAG.findall(text)
        if not is_command and not (words and set(words[0].split("|")) <= top):
            problems += [f"`{text}`: no command has {f}" for f in flags if f not in known]
            continue
        for variant in expand(words):
            found = resolve(variant)
            if isinstance(found, str):
                problems.append(f"`{' '.join(variant)}`: {found}")
                continue
            path, command, _ = found
            problems += [
                f"`{' '.join(variant)}`: `dispatcher {' '.join(path)}` has no option {f}"
                for f in flags
                if f not in options(command)
            ]
    return problems


def documented(doc: str) -> set[Path_]:
    """The commands the doc shows an example of or lists in its overview."""
    shown = set()
    for text in examples(doc) + overview(doc):
        for variant in expand(shlex.split(text)[1:]):
            found = resolve(variant)
            if not isinstance(found, str):
                shown.add(found[0])
    return shown


def check_generated(doc: str) -> list[str]:
    """Every example sits in a region the generator owns; regions are closed and unique."""
    problems = []
    generated = " ".join(body for _, body in REGION.findall(doc))
    for block in FENCE.finditer(doc):
        if block["lang"] == "console" and block[0] not in generated:
            first = block["body"].splitlines()[0]
            problems.append(f"pasted, not generated: {first}")
    keys = [key for key, _ in REGION.findall(doc)]
    problems += [
        f"region {k} appears twice" for k in sorted({k for k in keys if keys.count(k) > 1})
    ]
    if doc.count("<!-- cli: ") != len(keys) or doc.count("<!-- /cli -->") != len(keys):
        problems.append("a <!-- cli: KEY --> region is not closed by <!-- /cli --> (or nested)")
    return problems


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text()


def test_examples_use_existing_commands_and_options(doc: str) -> None:
    assert len(examples(doc)) > 40
    assert check_examples(doc) == []


def test_commands_and_flags_mentioned_exist(doc: str) -> None:
    assert check_mentions(doc) == []


def test_every_command_is_documented(doc: str) -> None:
    missing = sorted(" ".join(p) for p in leaves() - documented(doc))
    assert missing == [], f"commands docs/cli.md neither lists nor shows: {missing}"


def test_examples_are_generated_and_say_how(doc: str) -> None:
    assert check_generated(doc) == []
    assert "python docs/generate_cli.py" in doc.split("\n## ")[0]


def test_no_machine_paths(doc: str) -> None:
    leaks = [
        f"line {n}: {line.strip()}"
        for n, line in enumerate(doc.splitlines(), 1)
        if MACHINE_PATHS.search(line)
    ]
    assert leaks == []


# The checks above are only worth something if they can fail.

BROKEN = """\
```
dispatcher triggers list|frobnicate
dispatcher nothing-here      the description column
```

`triggers add --colour`, `parked unpark --dry-run`, `--no-such-flag` alone, `--dry-run` alone.

<!-- cli: good -->
```console
$ dispatcher status --json
```
<!-- /cli -->

```console
$ dispatcher dead-letters list --sorted --scope acme
$ dispatcher breakers reset 1 2
$ dispatcher triggers add --scope acme \\
    --nme x
  File "/work/main/dispatcher/runtime/handlers.py", line 9, in run
```
"""


def test_the_checks_catch_what_they_are_for() -> None:
    problems = check_examples(BROKEN)
    assert [p.split(": ", 1)[0] for p in problems] == [
        "dispatcher dead-letters list --sorted --scope acme",
        "dispatcher breakers reset 1 2",
        "dispatcher triggers add --scope acme --nme x",
    ]
    for problem, says in zip(problems, ("'--sorted'", "extra argument 2", "'--nme'"), strict=True):
        assert says in problem
    assert check_mentions(BROKEN) == [
        "`triggers add --colour`: `dispatcher triggers add` has no option --colour",
        "`--no-such-flag`: no command has --no-such-flag",
        "`triggers frobnicate`: `dispatcher triggers` has no command 'frobnicate'",
        "`nothing-here`: `dispatcher` has no command 'nothing-here'",
    ]
    assert documented(BROKEN) == {
        ("triggers", "list"),
        ("status",),
        ("dead-letters", "list"),
        ("breakers", "reset"),
        ("triggers", "add"),
    }
    assert check_generated(BROKEN) == [
        "pasted, not generated: $ dispatcher dead-letters list --sorted --scope acme"
    ]
    assert MACHINE_PATHS.search(BROKEN)
    for clean in (
        "postgresql://app:secret@127.0.0.1:1/app",
        "https://pay.example/v1",
        'File "dispatcher/runtime/handlers.py"',
        "users/*",
    ):
        assert not MACHINE_PATHS.search(clean), clean
