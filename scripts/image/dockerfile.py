"""The subset of Dockerfile syntax this project's Dockerfile uses, parsed into stages.

scripts/image/check.py replays these instructions in a debootstrap root instead of a Docker build,
so whatever the Dockerfile says is what gets checked. An instruction outside the subset raises
:class:`Unsupported`: the check then fails loudly rather than silently checking something else.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

#: Instructions the replay understands (the others raise Unsupported).
SUPPORTED = frozenset({"ARG", "FROM", "ENV", "WORKDIR", "COPY", "RUN", "USER", "EXPOSE", "HEALTHCHECK", "ENTRYPOINT"})


class Unsupported(ValueError):
    """The Dockerfile uses syntax the replay does not implement."""


@dataclass(frozen=True)
class Instruction:
    """One logical instruction: its keyword (upper case), raw arguments and first line number."""

    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    """A ``FROM`` and the instructions up to the next one."""

    name: str | None
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def of(self, keyword: str) -> list[Instruction]:
        """This stage's instructions with that keyword, in order."""
        return [i for i in self.instructions if i.keyword == keyword]


def logical_lines(text: str) -> list[tuple[int, str]]:
    """Joins ``\\`` continuations and drops comments and blank lines, as Docker's parser does."""
    out: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        out.append((start, " ".join(p for p in pending if p)))
        pending = []
    if pending:
        out.append((start, " ".join(pending)))
    return out


def parse(text: str) -> list[Stage]:
    """The Dockerfile's stages, in order."""
    stages: list[Stage] = []
    for line, content in logical_lines(text):
        keyword, _, args = content.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword not in SUPPORTED:
            raise Unsupported(f"Dockerfile line {line}: {keyword} is not replayed by scripts/image/check.py")
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            if len(words) not in (1, 3) or (len(words) == 3 and name is None) or words[0].startswith("--"):
                raise Unsupported(f"Dockerfile line {line}: FROM {args}")
            stages.append(Stage(name=name, base=words[0]))
        elif keyword == "ARG" and not stages:
            continue  # global ARGs only feed FROM lines; the base is the debootstrap root either way
        elif not stages:
            raise Unsupported(f"Dockerfile line {line}: {keyword} before the first FROM")
        else:
            stages[-1].instructions.append(Instruction(keyword, args, line))
    if not stages:
        raise Unsupported("no FROM in the Dockerfile")
    return stages


_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def expand(value: str, env: Mapping[str, str]) -> str:
    """``$NAME`` and ``${NAME}`` from env (unset names become empty, as in Docker)."""
    return _VAR.sub(lambda m: env.get(m.group(1) or m.group(2), ""), value)


def env_pairs(args: str, env: Mapping[str, str]) -> dict[str, str]:
    """An ``ENV`` instruction's assignments, expanded against the environment before it."""
    words = shlex.split(args)
    if words and "=" not in words[0]:  # legacy form: ENV NAME value with spaces
        return {words[0]: expand(" ".join(words[1:]), env)}
    pairs: dict[str, str] = {}
    for word in words:
        name, sep, value = word.partition("=")
        if not sep:
            raise Unsupported(f"ENV {args}")
        pairs[name] = expand(value, env)
    return pairs


@dataclass(frozen=True)
class Copy:
    """A ``COPY``: sources (from the context, or from stage ``from_stage``) to ``dest``."""

    sources: list[str]
    dest: str
    from_stage: str | None


def copy_args(args: str) -> Copy:
    """Parses ``COPY [--from=stage] src... dest`` (other flags are not replayed)."""
    words = shlex.split(args)
    from_stage = None
    while words and words[0].startswith("--"):
        flag, _, value = words.pop(0).partition("=")
        if flag != "--from":
            raise Unsupported(f"COPY {flag}")
        from_stage = value
    if len(words) < 2:
        raise Unsupported(f"COPY {args}")
    return Copy(sources=words[:-1], dest=words[-1], from_stage=from_stage)


def exec_form(args: str) -> list[str]:
    """The argv of an exec-form (JSON array) ``ENTRYPOINT``/``CMD``."""
    try:
        argv = json.loads(args)
    except json.JSONDecodeError as exc:
        raise Unsupported(f"not an exec-form argv: {args}") from exc
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise Unsupported(f"not an exec-form argv: {args}")
    return argv


def healthcheck_argv(args: str) -> list[str]:
    """The command of ``HEALTHCHECK [--options] CMD [...]`` (exec form)."""
    _, sep, command = args.partition("CMD ")
    if not sep:
        raise Unsupported(f"HEALTHCHECK {args}")
    return exec_form(command.strip())


def apt_packages(run_args: str) -> list[str]:
    """The package arguments of every ``apt-get install`` in a ``RUN`` (``name`` or ``name=version``)."""
    packages: list[str] = []
    for command in re.split(r"&&|;|\|\|", run_args):
        words = shlex.split(command)
        if words[:2] == ["apt-get", "install"]:
            packages += [w for w in words[2:] if not w.startswith("-")]
    return packages
