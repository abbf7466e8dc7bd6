"""``#SBATCH`` directives: read a batch script the way sbatch reads it, and build the
*effective request* the broker prices, checks and submits.

sbatch (``src/sbatch/opt.c``) reads the script's leading block: every line that
begins with ``#SBATCH`` (or the old ``#SLURM``) contributes words, blank lines and
other comments are skipped, and the first command line ends the block. The words
of all those lines form ONE argument vector that ``getopt_long`` parses — so an
option's value may even sit on the next directive line. :func:`scan` reproduces
that, word splitting (quotes, backslashes, ``#`` comments) and long-option prefixes
included, the prefixes resolved over sbatch's option table of every release the
broker supports (:mod:`broker.sbatch_options`): a prefix sbatch would resolve
uniquely resolves the same way here; an ambiguous or unknown one is refused.

Every directive is then either *mapped* into the effective request (and so
priced, checked and submitted by the broker itself) or refused with
:class:`UnsupportedDirective` (422 ``unsupported_directive``, naming the line).
Nothing is passed through: the script the adapters receive has its directive
lines neutralised (:func:`neutralise`, ``#SBATCH`` → ``##SBATCH``, Slurm's own
way to comment one out), so no line can add to what was reserved.
JSON fields the client really sent override the script, as sbatch's command line
overrides ``#SBATCH``. See docs/directives.md for the table.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from broker.account_names import canonical_account
from broker.sbatch_options import SBATCH_OPTIONS

__all__ = [
    "ArraySpec",
    "Dependency",
    "Directive",
    "EffectiveRequest",
    "UnsupportedDirective",
    "effective_request",
    "neutralise",
    "parse_array",
    "parse_dependency",
    "parse_memory_mb",
    "parse_time_minutes",
    "scan",
]

MAGIC_WORDS = ("#SBATCH", "#SLURM")
#: sbatch translates these (unless --ignore-pbs) from the first 100 non-comment lines
FOREIGN_MAGIC = ("#PBS", "#BSUB")
MAX_ARRAY_TASKS = 10_000
#: Slurm's MaxArraySize is at most 4000001: no task id is larger than this
MAX_ARRAY_INDEX = 4_000_000


class UnsupportedDirective(ValueError):
    """A directive the broker cannot price or must not honour (422
    ``unsupported_directive``). ``line`` is 1-based; ``text`` the line as written."""

    def __init__(self, line: int, text: str, reason: str) -> None:
        super().__init__(f"line {line}: {text.strip()!r}: {reason}")
        self.line = line
        self.text = text
        self.reason = reason


@dataclass(frozen=True)
class Directive:
    """One option found in the directive block."""

    line: int
    text: str
    option: str  # canonical long name, e.g. "array"
    written: str  # as written, e.g. "--arr" or "-a"
    value: str | None


# --------------------------------------------------------------------------- scanning


def _split_words(text: str) -> list[str]:
    """sbatch's ``get_argument`` applied repeatedly to the rest of one line.

    Stops at an unquoted ``#`` (comment) and — like sbatch — at an argument that
    comes out empty (``""``): the rest of that line is then not read."""
    words: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            return words
        if text[i] == ":":
            raise ValueError("unexpected ':' (heterogeneous job separator)")
        word: list[str] = []
        quote = ""
        while i < n and (quote or not text[i].isspace()):
            ch = text[i]
            if ch == "\\":
                i += 1
                if i < n:
                    word.append(text[i])
                    i += 1
                continue
            if quote:
                if ch == quote:
                    quote = ""
                else:
                    word.append(ch)
                i += 1
                continue
            if ch in "\"'":
                quote = ch
                i += 1
                continue
            if ch == "#":
                i = n
                break
            word.append(ch)
            i += 1
        if quote:
            raise ValueError(f"unmatched {quote}")
        if not word:
            return words
        words.append("".join(word))


def _is_command(line: str) -> bool:
    stripped = line.lstrip()
    return bool(stripped) and not stripped.startswith("#")


def header_lines(script: str) -> Iterable[tuple[int, str, str]]:
    """(line number, line, text after the magic word) of each directive line of the
    leading block, in order; stops at the first command like sbatch."""
    for number, line in enumerate(script.split("\n"), start=1):
        for magic in MAGIC_WORDS:
            if line.startswith(magic):
                yield number, line, line[len(magic):]
                break
        else:
            if _is_command(line):
                return


def _resolve_long(name: str) -> str | None:
    if name in SBATCH_OPTIONS:
        return name
    hits = [o for o in SBATCH_OPTIONS if o.startswith(name)]
    return hits[0] if len(hits) == 1 else None


_SHORT = {short: long for long, (_, short, _) in SBATCH_OPTIONS.items() if short}


def scan(script: str) -> list[Directive]:
    """Every option of the script's directive block, as sbatch's getopt_long sees it.

    Raises :class:`UnsupportedDirective` where sbatch itself would refuse the block
    (unknown or ambiguous option, missing argument, stray word) and for
    heterogeneous-job separators and ``#PBS``/``#BSUB`` lines."""
    _refuse_foreign(script)
    words: list[tuple[int, str, str]] = []
    for number, line, rest in header_lines(script):
        stripped = rest.lstrip()
        if re.match(r"(?i)(hetjob|packjob)(\s|$)", stripped):
            raise UnsupportedDirective(number, line, "heterogeneous jobs are not supported")
        try:
            words += [(number, line, w) for w in _split_words(rest)]
        except ValueError as exc:
            raise UnsupportedDirective(number, line, str(exc)) from None
    found: list[Directive] = []
    i = 0
    while i < len(words):
        number, line, word = words[i]
        i += 1
        if word == "--":
            if i < len(words):
                raise UnsupportedDirective(words[i][0], words[i][1], f"{words[i][2]!r} is not an option")
            break
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            option = _resolve_long(name)
            if option is None:
                what = "ambiguous" if any(o.startswith(name) for o in SBATCH_OPTIONS) else "unknown"
                raise UnsupportedDirective(number, line, f"{what} sbatch option --{name}")
            kind = SBATCH_OPTIONS[option][0]
            if eq:
                if kind == "no":
                    raise UnsupportedDirective(number, line, f"--{option} takes no value")
                found.append(Directive(number, line, option, "--" + name, value))
            elif kind == "required":
                if i >= len(words):
                    raise UnsupportedDirective(number, line, f"--{option} needs a value")
                found.append(Directive(number, line, option, "--" + name, words[i][2]))
                i += 1
            else:
                found.append(Directive(number, line, option, "--" + name, None))
        elif word.startswith("-") and len(word) > 1:
            j = 1
            while j < len(word):
                letter = word[j]
                option = _SHORT.get(letter)
                if option is None:
                    raise UnsupportedDirective(number, line, f"unknown sbatch option -{letter}")
                kind = SBATCH_OPTIONS[option][0]
                rest = word[j + 1:]
                if kind == "no":
                    found.append(Directive(number, line, option, "-" + letter, None))
                    j += 1
                    continue
                if rest:
                    found.append(Directive(number, line, option, "-" + letter, rest))
                elif kind == "required":
                    if i >= len(words):
                        raise UnsupportedDirective(number, line, f"-{letter} needs a value")
                    found.append(Directive(number, line, option, "-" + letter, words[i][2]))
                    i += 1
                else:
                    found.append(Directive(number, line, option, "-" + letter, None))
                break
        else:
            raise UnsupportedDirective(number, line, f"{word!r} is not an sbatch option")
    return found


def _refuse_foreign(script: str) -> None:
    commands = 0
    for number, line in enumerate(script.split("\n"), start=1):
        if line.startswith(FOREIGN_MAGIC):
            raise UnsupportedDirective(number, line, "#PBS/#BSUB directives are not supported; use #SBATCH")
        if not line.startswith("#"):
            commands += 1
            if commands > 100:
                return


def neutralise(script: str) -> str:
    """The script with its directive lines turned into plain comments
    (``#SBATCH`` → ``##SBATCH``), so that no scheduler reads them again."""
    lines = script.split("\n")
    for number, _line, _rest in list(header_lines(script)):
        lines[number - 1] = "#" + lines[number - 1]
    return "\n".join(lines)


# --------------------------------------------------------------------------- values


_TIME_RE = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$")


def parse_time_minutes(text: str) -> int:
    """Slurm's ``time_str2mins``: ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``,
    ``D-H:M:S``, seconds rounded up to the minute. ValueError for anything else
    (``UNLIMITED`` included: the broker prices a finite limit)."""
    m = _TIME_RE.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a time limit (M, M:S, H:M:S, D-H, D-H:M or D-H:M:S)")
    if m.group(1) is not None:
        d, h, mi, s = (int(g or 0) for g in m.group(1, 2, 3, 4))
    else:
        a, b, c = m.group(5, 6, 7)
        if c is not None:
            d, h, mi, s = 0, int(a), int(b), int(c)
        else:
            d, h, mi, s = 0, 0, int(a), int(b or 0)
    seconds = ((d * 24 + h) * 60 + mi) * 60 + s
    if seconds <= 0:
        raise ValueError(f"{text!r} is not a positive time limit")
    return math.ceil(seconds / 60)


_MEM_RE = re.compile(r"^(\d+)([KkMmGgTt][Bb]?)?$")


def parse_memory_mb(text: str) -> int:
    """Slurm's ``str_to_mbytes``: a number with an optional K/M/G/T suffix (MB by
    default; K rounds up)."""
    m = _MEM_RE.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a memory size (number with K, M, G or T)")
    value, unit = int(m.group(1)), (m.group(2) or "M")[0].upper()
    return {"K": math.ceil(value / 1024), "M": value, "G": value * 1024, "T": value * 1024 * 1024}[unit]


@dataclass(frozen=True)
class ArraySpec:
    """``--array``: the task ids and the ``%max`` throttle."""

    text: str
    task_ids: tuple[int, ...]
    max_running: int | None = None

    @property
    def count(self) -> int:
        return len(self.task_ids)


def parse_array(text: str) -> ArraySpec:
    """``0-15``, ``1,3,5``, ``0-15:4``, ``1-5,9%2`` (ids, ranges with step, ``%max``)."""
    body, pct, throttle = text.strip().partition("%")
    max_running = None
    if pct:
        if not throttle.isdigit() or int(throttle) < 1:
            raise ValueError(f"bad %max in {text!r}")
        max_running = int(throttle)
    ids: set[int] = set()
    for part in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part)
        if not m:
            raise ValueError(f"{part!r} is not an array index, range or range:step")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        step = int(m.group(3)) if m.group(3) is not None else 1
        if hi < lo or step < 1:
            raise ValueError(f"bad range {part!r}")
        if hi > MAX_ARRAY_INDEX:
            raise ValueError(f"array index {hi} is above {MAX_ARRAY_INDEX} (Slurm's largest MaxArraySize - 1)")
        if (hi - lo) // step + 1 + len(ids) > MAX_ARRAY_TASKS:
            raise ValueError(f"more than {MAX_ARRAY_TASKS} array tasks")
        ids.update(range(lo, hi + 1, step))
    return ArraySpec(text.strip(), tuple(sorted(ids)), max_running)


DEPENDENCY_TYPES = ("after", "afterany", "afterok", "afternotok", "aftercorr")


@dataclass(frozen=True)
class Dependency:
    """``--dependency``: ``(type, job ids)`` terms joined by ``,`` (all) or ``?`` (any).

    The ids are *broker* job ids; the service translates them to scheduler ids."""

    terms: tuple[tuple[str, tuple[str, ...]], ...]
    any_of: bool = False

    def render(self, ids: Mapping[str, str]) -> str:
        """Slurm's dependency text with each broker id replaced by ``ids[id]``."""
        joiner = "?" if self.any_of else ","
        return joiner.join(f"{kind}:{':'.join(ids[j] for j in jobs)}" for kind, jobs in self.terms)

    @property
    def job_ids(self) -> list[str]:
        return [j for _, jobs in self.terms for j in jobs]


def parse_dependency(text: str) -> Dependency:
    """``afterok:ID[:ID...][,afterany:ID...]`` or ``?``-separated; ``singleton`` and
    ``after:ID+time`` are not supported."""
    text = text.strip()
    if "," in text and "?" in text:
        raise ValueError("a dependency list is joined by ',' or by '?', not both")
    any_of = "?" in text
    terms = []
    for term in text.split("?" if any_of else ","):
        kind, _, rest = term.partition(":")
        if kind not in DEPENDENCY_TYPES or not rest:
            raise ValueError(f"{term!r}: supported are {', '.join(DEPENDENCY_TYPES)} with broker job ids")
        jobs = tuple(rest.split(":"))
        if not all(re.fullmatch(r"[0-9a-f]{32}", j) for j in jobs):
            raise ValueError(f"{term!r}: dependencies name broker job ids (32 hex digits)")
        terms.append((kind, jobs))
    return Dependency(tuple(terms), any_of)


# --------------------------------------------------------------------------- effective request


@dataclass(frozen=True)
class EffectiveRequest:
    """What the broker prices, checks, records and submits for one job.

    ``sources`` says where each value came from: ``"json"``, ``"script:N"`` (line
    N of the script), ``"default"``, or ``"broker"`` (the broker's own choice)."""

    script: str  # with the directive lines neutralised
    time_limit_minutes: int
    name: str = "job"
    partition: str | None = None
    nodes: int = 1
    min_nodes: int | None = None
    ntasks: int | None = None
    ntasks_per_node: int = 1
    cpus_per_task: int = 1
    gpus_per_node: int = 0
    gpu_type: str | None = None
    memory_per_node_mb: int | None = None
    exclusive: bool = False
    constraint: str | None = None
    mail_type: str | None = None
    mail_user: str | None = None
    array: ArraySpec | None = None
    dependency: Dependency | None = None
    working_directory: str | None = None
    environment: Mapping[str, str] = field(default_factory=dict)
    #: ``--account`` as the script wrote it: (value, line, text); see :func:`check_account`
    account: tuple[str, int, str] | None = None
    #: totals and per-task/per-CPU forms still to spread over the nodes (``--gpus``,
    #: ``--gpus-per-task``, ``--mem-per-cpu``, ``--mem-per-gpu``): value, source
    per_unit: Mapping[str, tuple[int, str]] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def cpus(self) -> int:
        """CPUs the tasks ask for (before ``--exclusive``)."""
        if self.ntasks is not None:
            return self.ntasks * self.cpus_per_task
        return self.nodes * self.ntasks_per_node * self.cpus_per_task

    @property
    def tasks(self) -> int:
        """Array tasks (1 for a plain job)."""
        return self.array.count if self.array else 1

    def record(self) -> dict[str, Any]:
        """The job record's view: every value and its source."""
        values: dict[str, Any] = {
            "time_limit_minutes": self.time_limit_minutes, "name": self.name, "partition": self.partition,
            "nodes": self.nodes, "min_nodes": self.min_nodes, "ntasks": self.ntasks,
            "ntasks_per_node": self.ntasks_per_node, "cpus_per_task": self.cpus_per_task,
            "gpus_per_node": self.gpus_per_node, "gpu_type": self.gpu_type,
            "memory_per_node_mb": self.memory_per_node_mb, "exclusive": self.exclusive,
            "constraint": self.constraint, "mail_type": self.mail_type, "mail_user": self.mail_user,
            "array": self.array.text if self.array else None,
            "array_tasks": self.tasks,
            "dependency": (self.dependency.render({j: j for j in self.dependency.job_ids})
                           if self.dependency else None),
            "working_directory": self.working_directory, "environment": dict(self.environment),
        }
        return {**values, "sources": dict(self.sources), "notes": list(self.notes)}


#: JSON field -> EffectiveRequest field (the JSON fields that can override a directive)
JSON_FIELDS = ("time_limit_minutes", "name", "partition", "nodes", "ntasks_per_node", "cpus_per_task",
               "gpus_per_node", "memory_per_node_mb", "working_directory", "environment")

#: directives refused outright, with the reason the answer gives
REFUSED: dict[str, str] = {
    "uid": "jobs run as your own cluster account; the broker chooses it",
    "gid": "jobs run as your own cluster account; the broker chooses it",
    "qos": "the QOS is part of what the allocation pays for; the broker chooses it",
    "reservation": "reservations are booked by the site, not per job through the broker",
    "wckey": "the broker accounts jobs to the allocation's account",
    "nice": "priority is not set per job through the broker",
    "priority": "priority is not set per job through the broker",
    "hold": "a held job would keep its budget reserved; submit when it should run",
    "begin": "a deferred job would keep its budget reserved; submit when it should run",
    "deadline": "not supported by the broker",
    "comment": "the broker uses the job comment to tag the job",
    "clusters": "choose the cluster with the request's `cluster` field",
    "cluster": "choose the cluster with the request's `cluster` field",
    "cluster-constraint": "choose the cluster with the request's `cluster` field",
    "mcs-label": "not supported by the broker",
    "test-only": "use POST /v1/jobs/estimate for a dry run",
    "wait": "the broker does not block on a job; use the job's state",
    "wrap": "the script is the job",
    "export": "the job's environment is the request's `environment`",
    "export-file": "the job's environment is the request's `environment`",
    "get-user-env": "the job's environment is the request's `environment`",
    "batch": "not supported by the broker",
    "input": "batch jobs read no standard input through the broker",
    "time-min": "the broker prices the full time limit; use --time",
    "requeue": "a requeued job would run (and be charged) more than once",
    "licenses": "licenses cannot be priced by the broker",
    "bb": "burst buffers cannot be priced by the broker",
    "bbf": "burst buffers cannot be priced by the broker",
    "reboot": "node reboots cannot be priced by the broker",
    "nodelist": "node lists can enlarge the allocation beyond what was priced",
    "nodefile": "node lists can enlarge the allocation beyond what was priced",
    "core-spec": "specialised cores enlarge the allocation beyond what was priced",
    "thread-spec": "specialised threads enlarge the allocation beyond what was priced",
    "mincpus": "use --cpus-per-task/--ntasks",
    "overcommit": "not supported by the broker",
    "oversubscribe": "not supported by the broker",
    "output": "",  # handled (overridden) below
    "error": "",
}


_NO_EFFECT = {"verbose", "quiet", "parsable", "ignore-pbs"}  # change sbatch's own output only


def _gpu_count(text: str, what: str) -> tuple[str | None, int]:
    """``[type:]N`` (``--gpus*``) → (type, N)."""
    parts = text.split(":")
    if len(parts) == 1 and parts[0].isdigit():
        return None, int(parts[0])
    if len(parts) == 2 and parts[1].isdigit() and re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", parts[0]):
        return parts[0], int(parts[1])
    raise ValueError(f"{text!r} is not a {what} request ([type:]count)")


def _gres(text: str) -> tuple[str | None, int]:
    """``--gres``: only GPUs (``gpu``, ``gpu:N``, ``gpu:type:N``, optionally ``gres/``)."""
    items = [t for t in text.split(",") if t]
    if len(items) != 1:
        raise ValueError("only one GRES (gpu) can be requested")
    item = items[0].removeprefix("gres/").removeprefix("gres:")
    parts = item.split(":")
    if parts[0] != "gpu":
        raise ValueError(f"GRES {parts[0]!r} cannot be priced; only gpu")
    if len(parts) == 1:
        return None, 1
    if len(parts) == 2:
        return (None, int(parts[1])) if parts[1].isdigit() else (parts[1], 1)
    if len(parts) == 3 and parts[2].isdigit():
        return parts[1], int(parts[2])
    raise ValueError(f"{text!r} is not gpu[:type][:count]")


@dataclass
class _Script:
    """Values the directives asked for, each with its directive."""

    values: dict[str, Any] = field(default_factory=dict)
    where: dict[str, Directive] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    gpu_forms: dict[str, Directive] = field(default_factory=dict)

    def set(self, key: str, value: Any, d: Directive) -> None:
        self.values[key] = value
        self.where[key] = d


def _nodes(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", text.strip())
    if not m or int(m.group(1)) < 1 or (m.group(2) and int(m.group(2)) < int(m.group(1))):
        raise ValueError(f"{text!r} is not a node count or min-max range")
    lo = int(m.group(1))
    return lo, int(m.group(2) or lo)


def _positive(text: str, what: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"{what} must be a positive integer, not {text!r}")
    return int(text)


def _map(d: Directive, s: _Script) -> None:
    o, v = d.option, d.value or ""
    if o in _NO_EFFECT:
        return
    if o in ("output", "error"):
        s.notes.append(f"line {d.line}: {d.written} overridden: the broker keeps the job's {o} where "
                       f"GET /v1/jobs/{{id}}/output can read it")
        s.where[o] = d
        return
    if o == "account":
        s.set("account", v, d)  # checked against the allocation's account by check_account()
        return
    if o in REFUSED:
        raise UnsupportedDirective(d.line, d.text, f"{d.written}: {REFUSED[o]}")
    if o in ("gres", "gpus", "gpus-per-node", "gpus-per-task"):
        s.gpu_forms[o] = d
    if o == "time":
        s.set("time_limit_minutes", parse_time_minutes(v), d)
    elif o == "job-name":
        if not v or len(v) > 128 or any(ord(c) < 32 for c in v):
            raise ValueError("the job name must be 1-128 printable characters")
        s.set("name", v, d)
    elif o == "partition":
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", v):
            raise ValueError("exactly one partition (the broker prices one)")
        s.set("partition", v, d)
    elif o == "nodes":
        lo, hi = _nodes(v)
        s.set("nodes", hi, d)
        s.set("min_nodes", lo if lo != hi else None, d)
    elif o == "ntasks":
        s.set("ntasks", _positive(v, "--ntasks"), d)
    elif o in ("ntasks-per-node", "tasks-per-node"):
        s.set("ntasks_per_node", _positive(v, "--ntasks-per-node"), d)
    elif o == "cpus-per-task":
        s.set("cpus_per_task", _positive(v, "--cpus-per-task"), d)
    elif o == "mem":
        s.set("memory_per_node_mb", parse_memory_mb(v), d)
        s.values.pop("mem_per_cpu", None)
        s.values.pop("mem_per_gpu", None)
    elif o == "mem-per-cpu":
        s.set("mem_per_cpu", parse_memory_mb(v), d)
        s.values.pop("memory_per_node_mb", None)
    elif o == "mem-per-gpu":
        s.set("mem_per_gpu", parse_memory_mb(v), d)
        s.values.pop("memory_per_node_mb", None)
    elif o == "gres":
        gtype, count = _gres(v)
        s.set("gpus_per_node", count, d)
        s.set("gpu_type", gtype, d)
    elif o == "gpus-per-node":
        gtype, count = _gpu_count(v, "--gpus-per-node")
        s.set("gpus_per_node", count, d)
        s.set("gpu_type", gtype, d)
    elif o == "gpus":
        gtype, count = _gpu_count(v, "--gpus")
        s.set("gpus_total", count, d)
        s.set("gpu_type", gtype, d)
    elif o == "gpus-per-task":
        gtype, count = _gpu_count(v, "--gpus-per-task")
        s.set("gpus_per_task", count, d)
        s.set("gpu_type", gtype, d)
    elif o == "exclusive":
        if d.value not in (None, ""):
            raise ValueError("only plain --exclusive (whole nodes) is supported")
        s.set("exclusive", True, d)
    elif o == "constraint":
        if not re.fullmatch(r"[A-Za-z0-9_.\-&|\[\]*:()!,]{1,256}", v):
            raise ValueError(f"{v!r} is not a feature expression")
        s.set("constraint", v, d)
    elif o == "mail-type":
        if not re.fullmatch(r"[A-Z_0-9,]{1,200}", v.upper()):
            raise ValueError(f"{v!r} is not a mail type list")
        s.set("mail_type", v.upper(), d)
    elif o == "mail-user":
        if not re.fullmatch(r"[^\s,;\"'\\]{1,254}", v):
            raise ValueError(f"{v!r} is not a mail address")
        s.set("mail_user", v, d)
    elif o == "array":
        s.set("array", parse_array(v), d)
    elif o == "dependency":
        s.set("dependency", parse_dependency(v), d)
    elif o == "chdir":
        if not v.startswith("/") or any(ord(c) < 32 for c in v):
            raise ValueError("the working directory must be an absolute path")
        s.set("working_directory", v, d)
    else:
        raise UnsupportedDirective(d.line, d.text, f"{d.written} cannot be priced or checked by the broker")


def read_script(script: str) -> _Script:
    """The script's directives mapped to request values (raises UnsupportedDirective)."""
    s = _Script()
    for d in scan(script):
        try:
            _map(d, s)
        except UnsupportedDirective:
            raise
        except ValueError as exc:
            raise UnsupportedDirective(d.line, d.text, str(exc)) from None
    return s


def effective_request(
    *, script: str, json_values: Mapping[str, Any], json_set: Iterable[str],
) -> EffectiveRequest:
    """JSON fields the client set override the script's directives; the rest come
    from the script, then the defaults. Raises :class:`UnsupportedDirective`, and
    ValueError (→ 422 validation_error) for a request that is not complete."""
    if "\r\n" in script:
        line = script[:script.index("\r\n")].count("\n") + 1
        raise ValueError(f"the script has DOS line breaks (\\r\\n, first on line {line}); sbatch refuses "
                         "such scripts: convert it with dos2unix")
    s = read_script(script)
    if len(s.gpu_forms) > 1:
        d = list(s.gpu_forms.values())[-1]
        raise UnsupportedDirective(d.line, d.text, "GPUs asked in more than one way ("
                                   + ", ".join(sorted(s.gpu_forms)) + "); use one of them")
    json_set = set(json_set)
    sources: dict[str, str] = {}
    vals: dict[str, Any] = {}
    for key in JSON_FIELDS:
        if key in json_set and json_values.get(key) is not None:
            vals[key] = json_values[key]
            sources[key] = "json"
        elif key in s.values:
            vals[key] = s.values[key]
            sources[key] = f"script:{s.where[key].line}"
        elif json_values.get(key) is not None:
            vals[key] = json_values[key]
            sources[key] = "default"
    for key in ("min_nodes", "ntasks", "gpu_type", "exclusive", "constraint", "mail_type", "mail_user",
                "array", "dependency"):
        if key in s.values:
            vals[key] = s.values[key]
            sources[key] = f"script:{s.where[key].line}"
    if "array" in json_set and json_values.get("array") is not None:  # as sbatch's command line
        try:
            vals["array"] = parse_array(str(json_values["array"]))
        except ValueError as exc:
            raise ValueError(f"array {json_values['array']!r}: {exc}") from None
        sources["array"] = "json"
    if "nodes" in json_set:  # a JSON node count replaces the script's range too
        vals.pop("min_nodes", None)
        sources.pop("min_nodes", None)
    if "time_limit_minutes" not in vals:
        raise ValueError("time_limit_minutes is required (in the request or as #SBATCH --time)")
    if "gpus_per_node" in json_set:  # the JSON count replaces the script's typed request
        vals.pop("gpu_type", None)
        sources.pop("gpu_type", None)
    if "account" in s.values:
        d = s.where["account"]
        vals["account"] = (s.values["account"], d.line, d.text)
    per_unit: dict[str, tuple[int, str]] = {}
    if "gpus_per_node" not in json_set and "gpus_per_node" not in s.values:
        per_unit.update({k: (s.values[k], f"script:{s.where[k].line}")
                         for k in ("gpus_total", "gpus_per_task") if k in s.values})
    if "memory_per_node_mb" not in json_set:
        per_unit.update({k: (s.values[k], f"script:{s.where[k].line}")
                         for k in ("mem_per_cpu", "mem_per_gpu") if k in s.values})
    req = EffectiveRequest(script=neutralise(script), **vals, sources=sources, notes=tuple(s.notes),
                           per_unit=per_unit)
    return _derive(req)


def _derive(req: EffectiveRequest) -> EffectiveRequest:
    """Turn the total/per-task/per-CPU forms (``req.per_unit``) into the per-node
    request the broker submits, for the current node count."""
    changes: dict[str, Any] = {}
    sources = dict(req.sources)
    nodes, unit = req.nodes, req.per_unit
    tasks_per_node = req.ntasks_per_node
    if req.ntasks is not None:
        if sources.get("ntasks_per_node", "default") not in ("default", "broker"):
            if req.ntasks_per_node * nodes < req.ntasks:
                raise ValueError(f"{req.ntasks} tasks do not fit {nodes} node(s) × {req.ntasks_per_node} "
                                 "tasks per node; ask for more --nodes")
        else:
            tasks_per_node = changes["ntasks_per_node"] = math.ceil(req.ntasks / nodes)
            sources["ntasks_per_node"] = "broker"
    gpus = req.gpus_per_node
    if "gpus_total" in unit:
        gpus = changes["gpus_per_node"] = math.ceil(unit["gpus_total"][0] / nodes)
        sources["gpus_per_node"] = f"{unit['gpus_total'][1]} (--gpus over {nodes} node(s))"
    if "gpus_per_task" in unit:
        gpus = changes["gpus_per_node"] = unit["gpus_per_task"][0] * tasks_per_node
        sources["gpus_per_node"] = f"{unit['gpus_per_task'][1]} (--gpus-per-task × tasks per node)"
    if "mem_per_cpu" in unit:
        changes["memory_per_node_mb"] = unit["mem_per_cpu"][0] * tasks_per_node * req.cpus_per_task
        sources["memory_per_node_mb"] = f"{unit['mem_per_cpu'][1]} (--mem-per-cpu × CPUs per node)"
    elif "mem_per_gpu" in unit:
        if not gpus:
            raise ValueError("--mem-per-gpu without GPUs")
        changes["memory_per_node_mb"] = unit["mem_per_gpu"][0] * gpus
        sources["memory_per_node_mb"] = f"{unit['mem_per_gpu'][1]} (--mem-per-gpu × GPUs per node)"
    if not changes:  # the common case (nothing given per task/CPU/GPU): no copy of ~30 fields
        return req
    return replace(req, **changes, sources=sources)


def check_account(req: EffectiveRequest, allocation_account: str) -> EffectiveRequest:
    """A script's ``--account`` must name the allocation's own account (then it is
    redundant); any other account is refused — the broker chooses who pays."""
    if req.account is None:
        return req
    value, line, text = req.account
    if canonical_account(value) != canonical_account(allocation_account):  # Slurm folds the case
        raise UnsupportedDirective(line, text, f"jobs of this allocation are charged to account "
                                               f"{allocation_account!r}; the broker chooses it")
    return replace(req, sources={**req.sources, "account": f"script:{line} (same as the allocation's)"})


def with_partition_defaults(req: EffectiveRequest, partition: Mapping[str, Any] | None) -> EffectiveRequest:
    """``--mem=0`` (all of a node's memory) made explicit from the discovered
    partition, and a ``--nodes=min-max`` range capped at the partition's node count
    (Slurm cannot allocate more nodes than the partition has)."""
    p = partition or {}
    count = int(p.get("nodes") or 0)
    if req.min_nodes is not None and count and req.min_nodes <= count < req.nodes:
        req = _derive(replace(req, nodes=count, min_nodes=req.min_nodes if req.min_nodes < count else None,
                              sources={**req.sources, "nodes": req.sources.get("nodes", "") +
                                       f" (range capped at the partition's {count} nodes)"}))
    if req.ntasks is not None and req.sources.get("nodes", "default") == "default":
        # --ntasks without --nodes: the fewest nodes that hold the tasks, submitted
        # explicitly so that Slurm cannot spread them over more nodes than priced
        cpus, gpus = int(p.get("cpus_per_node") or 0), int(p.get("gpus_per_node") or 0)
        need = max(1, math.ceil(req.cpus / cpus) if cpus else 1)
        if "gpus_per_task" in req.per_unit and gpus:
            need = max(need, math.ceil(req.ntasks * req.per_unit["gpus_per_task"][0] / gpus))
        if need != req.nodes:
            req = _derive(replace(req, nodes=need, sources={**req.sources, "nodes": "broker (fewest nodes for "
                                                            "--ntasks)"}))
    if req.memory_per_node_mb == 0:
        node_mem = int((partition or {}).get("memory_per_node_mb") or 0)
        if not node_mem:
            raise ValueError("--mem=0 (all memory) needs the partition's node memory, which is not known")
        sources = {**req.sources, "memory_per_node_mb": req.sources.get("memory_per_node_mb", "") +
                   " (--mem=0: the whole node's memory)"}
        return replace(req, memory_per_node_mb=node_mem, sources=sources)
    return req


def describe(directives: Sequence[Directive]) -> list[str]:
    """Human-readable list of directives (for messages and tests)."""
    return [f"{d.line}: {d.option}={d.value}" for d in directives]
