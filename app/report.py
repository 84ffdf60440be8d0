"""`tmrl report`: regenerate the generated blocks of a hand-written markdown report from MLflow runs.

The report stays prose; only what lies between a block's two marker lines is rewritten, from the runs the
opening marker names (arguments as in a shell: key=value, quoted where they hold spaces):

    <!-- tmrl report: curves parent=<run id> filter="params.env_steps = '40000'" figure=figures/a.png -->
    ...generated...
    <!-- /tmrl report -->

Kinds (``KINDS``; [optional] arguments):

    curves        parent=RUN [filter=F] [by="PARAM ..."] [figure=PNG] [title=T] [width=5000]
                  the fine-tuning runs of one pre-training run: mean eval/success_rate per method [95%
                  bootstrap interval over seeds] at each evaluation, final success and training successes
                  per seed, the base policy alone, the plot
    zero-shot     runs=RUN[,RUN...] [labels="A;B"]   success per sigma of pre-training runs
    success-at-k  runs=RUN[,RUN...] [labels="A;B"]   success and Success@k per sigma
    sigma         parent=RUN [filter=F] | runs=RUN,...  [figure=PNG]   TMRL's learned sigma over fine-tuning
    bench         file=MD                            a table written by `tmrl bench --out MD`, as it is
    runs          parent=RUN [filter=F] | runs=RUN,...  per run: steps, wall-clock, seed, threads, workers

Paths are relative to the report's folder. Regeneration is deterministic: runs are sorted (method, seed,
id), the bootstrap is seeded, the text holds no timestamps, and a figure is re-rendered only when its data
changed (the data's sha256 is kept in the PNG's text metadata), so two runs give the same bytes. A block
that cannot be made (a missing run) holds one error line; the rest is still regenerated and the file is
replaced atomically.
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from app.report_blocks import KINDS, BlockError, Context

OPEN = re.compile(r"^<!--\s*tmrl report:\s*(?P<kind>[\w-]+)(?P<args>.*?)\s*-->\s*$")
CLOSE = re.compile(r"^<!--\s*/tmrl report\s*-->\s*$")


@dataclass
class Block:
    """A generated block: its kind and arguments, and the line indices of its two markers."""

    kind: str
    args: str  # as written in the marker
    start: int
    end: int


def find_blocks(lines: list[str]) -> list[Block]:
    """Every block of the report's lines; a marker without its partner is the whole file's error."""
    blocks, opened = [], None
    for i, line in enumerate(lines):
        if m := OPEN.match(line):
            if opened is not None:
                raise ValueError(
                    f"line {i + 1}: a `tmrl report` block opens inside the block of line {opened[0] + 1}"
                )
            opened = (i, m)
        elif CLOSE.match(line):
            if opened is None:
                raise ValueError(f"line {i + 1}: `<!-- /tmrl report -->` closes no block")
            blocks.append(Block(opened[1]["kind"], opened[1]["args"], opened[0], i))
            opened = None
    if opened is not None:
        raise ValueError(
            f"line {opened[0] + 1}: the `tmrl report` block is not closed (`<!-- /tmrl report -->`)"
        )
    return blocks


def parse_args(kind: str, text: str) -> dict[str, str]:
    """key=value arguments of a marker, quoted as in a shell; refused: unknown kinds and keys."""
    if kind not in KINDS:
        raise BlockError(f"unknown kind {kind!r}; expected one of {sorted(KINDS)}")
    try:
        words = shlex.split(text)
    except ValueError as err:
        raise BlockError(f"arguments {text.strip()!r}: {err}") from None
    args = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or key not in KINDS[kind][1]:
            raise BlockError(
                f"argument {word!r}: expected key=value with key one of {sorted(KINDS[kind][1])}"
            )
        args[key] = value
    return args


def render(ctx: Context, block: Block) -> list[str]:
    """The block's generated lines."""
    args = parse_args(block.kind, block.args)
    return KINDS[block.kind][0](ctx, args)


def regenerate(text: str, ctx: Context) -> tuple[str, list[str]]:
    """(the text with every block regenerated, errors as "line N: kind block: message"); the text outside
    the blocks is kept byte for byte."""
    lines = text.splitlines(keepends=True)
    out, errors, done = [], [], 0
    for block in find_blocks(lines):
        out += lines[done : block.start + 1]
        try:
            body = render(ctx, block)
        except BlockError as err:
            body = [f"**tmrl report error:** {err}"]
            errors.append(f"line {block.start + 1}: {block.kind} block: {err}")
        out.append("\n" + "".join(line.rstrip() + "\n" for line in body) + "\n")
        done = block.end
    return "".join(out + lines[done:]), errors


@dataclass
class Outcome:
    blocks: int
    changed: bool  # the text differs (or would, under --check)
    figures: list[str]  # figures drawn (or that would be)
    errors: list[str]


def _replace(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a reader sees the old file or the new one, never a part."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(data)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.chmod(tmp.name, path.stat().st_mode & 0o7777)
    os.replace(tmp.name, path)


def report(uri: str, file: str | Path, check: bool = False) -> Outcome:
    """Regenerate the blocks of ``file`` from the runs in ``uri`` and replace it if it changed; ``check``:
    write nothing, only tell whether the text or a figure would change."""
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"--file {str(path)!r}: no such report")
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        raise FileNotFoundError(f"no tracking store at {uri}: pass --uri")
    text = path.read_bytes().decode("utf-8")
    ctx = Context(MlflowClient(tracking_uri=uri), path.parent, write=not check)
    new, errors = regenerate(text, ctx)
    if new != text and not check:
        _replace(path, new.encode("utf-8"))
    return Outcome(len(find_blocks(text.splitlines(keepends=True))), new != text, ctx.figures, errors)
