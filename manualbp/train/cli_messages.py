"""What ``manualbp fit/validate/test`` say to a person: a short ``--help`` and one-line errors.

LightningCLI's own help lists every Trainer argument (hundreds of lines) and leaves out the
keys of the DataModule; its errors print the whole usage before the one line that matters, and
jsonargparse explains a wrong type as a tree of union subtypes. :func:`short_help` lists the
keys people change, with the data keys; :func:`short_parse_error` and
:func:`short_instantiation_error` turn an error into ``KEY: expected WHAT, got VALUE``.
"""

from __future__ import annotations

import difflib
import re
import textwrap
import types
import typing
from argparse import SUPPRESS, Action
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["short_help", "short_instantiation_error", "short_parse_error"]

DESCRIPTIONS = {
    "fit": "Train a manual network beside its autograd twin, then test both.",
    "validate": "Evaluate a checkpoint (default: the latest fit's last.ckpt) on validation data.",
    "test": "Evaluate a checkpoint (default: the latest fit's last.ckpt) on the test data.",
}

# The keys people change, by section: (key, kind of value or None for the type hint's, help or
# None for the docstring's first sentence). The rest: --help-all.
Entry = tuple[str, "str | None", "str | None"]
SECTIONS: tuple[tuple[str, tuple[Entry, ...]], ...] = (
    (
        "run",
        (
            ("seed_everything", "INT", "seed of the weights and the batches; true: a random one"),
            ("ckpt_path", "PATH", None),  # help by subcommand: CKPT_PATH_HELP
            ("test_after_fit", None, None),
        ),
    ),
    (
        "trainer (lightning.pytorch.Trainer)",
        (
            ("trainer.max_epochs", None, "epochs to train"),
            ("trainer.accelerator", "auto|cpu|gpu|mps", "where to run (auto: CUDA when present)"),
            ("trainer.devices", "INT|auto", "how many devices (processes with DDP)"),
            ("trainer.strategy", "auto|ddp", "how to use several devices"),
            ("trainer.precision", "32-true|64-true|bf16-mixed", "numeric precision"),
            ("trainer.log_every_n_steps", None, "steps between logged training losses"),
            ("trainer.limit_train_batches", "INT|FLOAT", "batches per epoch (float: fraction)"),
            ("trainer.limit_val_batches", "INT|FLOAT", "validation batches (float: fraction)"),
            ("trainer.limit_test_batches", "INT|FLOAT", "test batches (float: fraction)"),
            ("trainer.fast_dev_run", "true|INT", "run 1 (or INT) batches of each stage, no files"),
            ("trainer.enable_progress_bar", None, "progress bar (a line per epoch off a terminal)"),
        ),
    ),
    (
        "model (manualbp.train.module.TwinModule)",
        (
            (
                "model.net",
                "CLASS",
                "the manual network, e.g. manualbp.nn.MLP with --model.net.sizes [784,100,10]",
            ),
            ("model.loss", "CLASS", "the handwritten loss, e.g. manualbp.nn.MSELoss"),
            (
                "model.compare",
                None,
                "lockstep: train both twins; check: train the manual one "
                "and check its gradients; off: train one",
            ),
            ("model.check_every_n_steps", None, None),
            ("model.backend", None, None),
        ),
    ),
    (
        "optimizer and learning-rate scheduler (one of each per twin)",
        (
            ("optimizer", "CLASS", "e.g. torch.optim.Adam, its arguments as --optimizer.lr 0.001"),
            (
                "lr_scheduler",
                "CLASS",
                "e.g. torch.optim.lr_scheduler.StepLR with --lr_scheduler.step_size 5",
            ),
        ),
    ),
    (
        "gradient monitor",
        (
            ("gradient_monitor.norm_every_n_steps", None, "steps between per-layer gradient norms"),
            ("gradient_monitor.histogram_every_n_steps", None, "steps between histograms"),
        ),
    ),
)
CKPT_PATH_HELP = {
    "fit": "resume training from this checkpoint (in a new run directory)",
    "validate": "the checkpoint to evaluate (default: last.ckpt of the latest fit)",
    "test": "the checkpoint to evaluate (default: last.ckpt of the latest fit)",
}
FIT_ONLY = {
    "test_after_fit",
    "trainer.max_epochs",
    "trainer.log_every_n_steps",
    "trainer.limit_train_batches",
    "gradient_monitor.norm_every_n_steps",
    "gradient_monitor.histogram_every_n_steps",
    "optimizer",
    "lr_scheduler",
}
EVALUATION_ONLY = {"trainer.limit_test_batches"}
WIDTH = 100


def _plain(text: str | None) -> str:
    """The first sentence of a docstring-derived help text, without reST markup."""
    if not text or text == SUPPRESS:
        return ""
    text = re.sub(r":\w+:`~?(?:[\w.]+\.)?([\w]+)`", r"\1", text)  # :class:`~a.b.C` → C
    text = text.replace("``", "").replace("`", "")
    text = " ".join(text.split())
    first = re.split(r"(?<=[.;])\s", text, maxsplit=1)[0]
    return first.rstrip(".;")


def _kind(hint: Any) -> str:
    """A short name of the values a type hint admits (``INT``, ``{a,b}``, ``true|false``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        kinds = [_kind(arg) for arg in args if arg is not type(None)]
        return "|".join(dict.fromkeys(kinds)) or "null"
    if origin is typing.Literal:
        return "{" + ",".join(str(arg) for arg in args) + "}"
    if hint is bool:
        return "true|false"
    if isinstance(hint, type):
        if issubclass(hint, (int, float, str)):
            return hint.__name__.upper()
        return "CLASS"
    return "VALUE"


def _default(action: Action) -> str:
    value = action.default
    if value is None or value == SUPPRESS or not isinstance(value, (bool, int, float, str)):
        return ""
    if isinstance(value, bool):
        value = str(value).lower()
    return f" (default: {value})"


def _line(option: str, kind: str, text: str, column: int = 38) -> str:
    """``  --option KIND   help``, the help wrapped at :data:`WIDTH` from ``column``."""
    head = f"  {option} {kind}"
    body = textwrap.wrap(text, WIDTH - column) or [""]
    indent = " " * column
    if len(head) >= column - 1:
        return "\n".join([head, *(indent + part for part in body)])
    lines = [f"{head:<{column}}{body[0]}", *(indent + part for part in body[1:])]
    return "\n".join(lines)


def _entry(action: Action, kind: str | None, text: str | None) -> str:
    hint = getattr(action, "_typehint", None)
    kind = kind or (_kind(hint) if hint is not None else "VALUE")
    return _line(f"--{action.dest}", kind, (text or _plain(action.help)) + _default(action))


def short_help(
    subcommand: str, actions: Sequence[Action], data_actions: Sequence[Action], data_class: str
) -> str:
    """The ``manualbp <subcommand> --help`` text: the common keys of the subcommand's parser
    (``actions``) and of the default DataModule (``data_actions``, dests ``data.<key>``)."""
    by_dest = {action.dest: action for action in actions}
    lines = [
        f"usage: manualbp {subcommand} [--config FILE] [--KEY VALUE ...]",
        "",
        DESCRIPTIONS.get(subcommand, ""),
        "Keys nest as in the YAML files of experiments/; the command line overrides --config.",
        "",
        "  --config FILE, -c FILE              a YAML config, e.g. experiments/mnist_mlp.yaml",
    ]
    skip = EVALUATION_ONLY if subcommand == "fit" else FIT_ONLY
    for title, entries in SECTIONS:
        present = [entry for entry in entries if entry[0] in by_dest and entry[0] not in skip]
        if present:
            lines += ["", f"{title}:"]
            for key, kind, text in present:
                if key == "ckpt_path":
                    text = CKPT_PATH_HELP.get(subcommand)
                lines.append(_entry(by_dest[key], kind, text))
    if data_actions:
        lines += ["", f"data ({data_class}; another DataModule: --data CLASS):"]
        lines += [
            _entry(action, "PATH" if action.dest == "data.data_dir" else None, None)
            for action in data_actions
        ]
    lines += [
        "",
        "logging:",
        _line("--trainer.logger.init_args.save_dir", "DIR", "where runs go (default: runs)"),
        _line("--trainer.logger.init_args.name", "NAME", "the experiment's folder in it"),
        "",
        f"Every option (Lightning's full list): manualbp {subcommand} --help-all",
        f"The resolved config: manualbp {subcommand} --config FILE --print_config",
    ]
    return "\n".join(lines)


_ARTICLES = {"int": "an int", "float": "a float", "bool": "true or false", "str": "a string"}


def _innermost(message: str) -> str:
    """The part of a jsonargparse error about its innermost key: from the last ``Parser key``
    line, the lines indented deeper than it (the outer levels' alternatives left out)."""
    lines = message.splitlines()
    starts = [i for i, line in enumerate(lines) if 'Parser key "' in line]
    if not starts:
        return message
    first = lines[starts[-1]]
    depth = len(first) - len(first.lstrip())
    inner = [first]
    for line in lines[starts[-1] + 1 :]:
        if line.strip() and len(line) - len(line.lstrip()) <= depth:
            break
        inner.append(line)
    return "\n".join(inner)


def _expected(message: str) -> tuple[list[str], bool]:
    """What the innermost failing type admits, and whether null is accepted too."""
    expected: list[str] = []
    nullable = False
    pattern = r"Expected a (?:<class '([\w.]+)'>|typing\.Literal\[(.*?)\])"
    for match in re.finditer(pattern, message):
        name, literal = match.groups()
        if literal is not None:
            expected.append(f"one of {literal}")
        elif name == "NoneType":
            nullable = True
        else:
            short = name.rsplit(".", 1)[-1]
            expected.append(_ARTICLES.get(short, f"a {short}"))
    return list(dict.fromkeys(expected)), nullable


def short_parse_error(message: str, options: Iterable[str] = ()) -> str:
    """One line (two with a suggestion) for a jsonargparse parse error ``message``:
    ``--KEY: expected WHAT, got VALUE`` or ``--KEY: no such option; did you mean ...?``.
    ``options`` are the parser's option strings, for the suggestion."""
    unknown = re.search(r"unrecognized arguments: (\S+)", message)
    if unknown:
        option = unknown.group(1).split("=", 1)[0]
        return _no_such_option(option, options)
    not_accepted = re.search(r"does not accept option '([^']+)'", message)
    if not_accepted:  # an unknown key in a config file
        return _no_such_option(f"--{not_accepted.group(1)}", options, where="config key")
    keys = re.findall(r'Parser key "([^"]+)"', message)
    if not keys:
        return message.strip().splitlines()[0]
    key = ".init_args.".join(keys)  # nested keys appear under a class_path's init_args
    inner = _innermost(message)
    expected, nullable = _expected(inner)
    value = re.search(r"(?:Got value|Given value): (.*)", inner)
    got = f", got {value.group(1).strip()!r}" if value else ""
    if not expected:
        problem = re.search(r"Problem with given class_path '[^']+':\s*\n\s*(\S.*)", inner)
        same_line = re.search(r'Parser key "[^"]+":[ \t]*(\S.*)', inner)
        rest = [line.strip(" -") for line in inner.splitlines()[1:] if line.strip(" -")]
        reason = (problem or same_line).group(1) if problem or same_line else None
        return f"--{key}: {reason or (rest[0] if rest else 'invalid value')}"
    what = " or ".join(expected) + (" (or null)" if nullable else "")
    return f"--{key}: expected {what}{got}"


def _no_such_option(option: str, options: Iterable[str], where: str = "option") -> str:
    """``option`` is unknown; the suggestion is a key of the same section whose last part is
    spelt alike (``--trainer.max_epoch`` → ``--trainer.max_epochs``)."""
    section, _, name = option.rpartition(".")
    siblings = {
        candidate.rpartition(".")[2]: candidate
        for candidate in options
        if candidate.startswith("--") and candidate.rpartition(".")[0] == section
    }
    close = difflib.get_close_matches(name, list(siblings), n=1, cutoff=0.75)
    hint = f"; did you mean {siblings[close[0]]}?" if close else ""
    return f"{option}: no such {where}{hint}"


def short_instantiation_error(error: BaseException) -> str:
    """The innermost message of an error raised while building the configured objects, with
    the class it came from when jsonargparse names one."""
    inner = error
    while inner.__cause__ is not None:
        inner = inner.__cause__
    text = str(inner).strip() or type(inner).__name__
    classes = re.findall(r"class_path='([\w.]+)'", str(error))
    prefix = f"{classes[0]}: " if classes and classes[0].rsplit(".", 1)[-1] not in text else ""
    return prefix + text.splitlines()[0]
