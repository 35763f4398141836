"""The ``graceful`` command line (typer): run, cycle, backfill, index, report, search, pin,
serve, config."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows.config import (
    MAX_EPOCHS,
    BackfillConfig,
    GateConfig,
    IndexConfig,
    ServeConfig,
    TrainConfig,
)

try:  # typer vendors its own click (0.2x); older ones use click itself
    from typer._click import exceptions as _click_errors
    from typer._click.core import ParameterSource
except ImportError:  # pragma: no cover
    from click import exceptions as _click_errors
    from click.core import ParameterSource

err = Console(stderr=True)
out = Console()

# the options' defaults are the typed configs' (flows.config: no torch, cheap to import)
_TRAIN, _GATE, _BACKFILL, _SERVE = TrainConfig(), GateConfig(), BackfillConfig(), ServeConfig()


class _OneLineErrors(typer.core.TyperGroup):
    """Click's own refusals (an out-of-range or malformed option value, an unknown option,
    a missing argument) as the contract's one ``error:`` line and exit 2, not a box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **kw):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **kw)
        try:
            code = super().main(args, prog_name, complete_var, False, **kw)
        except _click_errors.NoArgsIsHelpError:  # no command: the help, as before
            return super().main(args, prog_name, complete_var, True, **kw)
        except _click_errors.ClickException as exc:
            where = exc.ctx.command_path if getattr(exc, "ctx", None) else "graceful"
            message = " ".join(exc.format_message().split()).rstrip(".")  # one line
            err.print(
                f"[bold red]error:[/] {escape(message)}; see `{escape(where)} --help`",
                soft_wrap=True,
            )
            sys.exit(exc.exit_code)
        except typer.Abort:
            err.print("[bold red]error:[/] aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, cls=_OneLineErrors)
_debug = {"on": False}  # --debug: an error line comes after its traceback


@app.callback()
def _global(
    debug: Annotated[
        bool,
        typer.Option("--debug", help="print the traceback behind an error line (contract)"),
    ] = False,
) -> None:
    _debug["on"] = debug or os.environ.get("GRACEFUL_DEBUG", "") == "1"


def _env_defaults() -> None:
    """Settings that make the embedded default work on a small machine."""
    # the ephemeral Prefect API needs more than its 20 s default on 2 cores
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Ray: token auth on and loopback only, set up in workers.runtime.ensure_ray
    # the rich progress bar is the console view; the flow logs still reach the Prefect UI
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


class _KnownFailures:
    """A console-log filter: a run that fails on a known error is reported once, by the CLI's
    ``error:`` line; Prefect's own failure records of it still reach the API (the UI)."""

    RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names

    def filter(self, record) -> bool:
        if record.levelno < logging.ERROR or not record.name.startswith(self.RUN_LOGGERS):
            return True
        text = record.getMessage()
        return not any(f"{n}(" in text or f"{n}:" in text for n in self.names)


# known errors' subclasses, by name (their messages name them)
_SUBCLASSES = (
    "SourceError",
    "SourceUnreachable",
    "CollectionError",
    "LockHeld",
    "ChampionChanged",
    "UnknownGeneration",
    "CollectionStoreError",
    "TrainingDiverged",
    "RayUnavailable",
)


def _quiet_known_failures() -> None:
    """Install :class:`_KnownFailures` on Prefect's console handler (once)."""
    from prefect.logging.configuration import setup_logging

    root = logging.getLogger()
    if not any(type(h).__name__ == "PrefectConsoleHandler" for h in root.handlers):
        setup_logging()
    names = tuple(e.__name__ for e in _known_errors()) + _SUBCLASSES
    for handler in root.handlers:
        if type(handler).__name__ == "PrefectConsoleHandler" and not any(
            isinstance(f, _KnownFailures) for f in handler.filters
        ):
            handler.addFilter(_KnownFailures(names))


def _fail(problem: str | BaseException, code: int = 2) -> None:
    if _debug["on"] and isinstance(problem, BaseException):
        err.print("".join(traceback.format_exception(problem)), markup=False, highlight=False)
    message = _error_text(problem) if isinstance(problem, BaseException) else problem
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)  # one line, however long
    raise typer.Exit(code)


def _error_text(exc: BaseException) -> str:
    """One line for an error; pydantic's several-line report becomes ``field: problem``."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')} "
            f"(got {e.get('input')!r})"
            for e in exc.errors()
        )
    return str(exc)


def _check_inputs(dataset: str | None, training: bool = False, existing: bool = False) -> None:
    """Reject bad input before anything is created or stored; ``existing``: the command
    works on a lineage that must be there already (it never starts one: a missing
    GRACEFUL_HOME, or one without a lineage, is bad input, and nothing is created)."""
    from store.settings import StoreError, graceful_home, require_lineage
    from workers.data.datasets import DatasetError, parse_spec
    from workers.data.sources import SourceUnreachable, check_readable
    from workers.runtime import train_resources

    with _failing(2, (StoreError, DatasetError, ValueError)), _failing(1, SourceUnreachable):
        graceful_home(create=False)
        if existing:
            require_lineage()
        if dataset is not None:
            parse_spec(dataset)
            if training:  # a missing folder or a file that is no Parquet: before Prefect
                check_readable(dataset)
        if training:
            train_resources()  # GRACEFUL_TRAIN_RESOURCES, when set, is a JSON object


def _exit_code(exc: BaseException) -> int:
    """2 for bad input (a data set, source or collection spec that cannot be used),
    1 for any other failure."""
    from flows.data import LineageOptionError
    from workers.data.datasets import DatasetError
    from workers.data.sources import SourceUnreachable

    if isinstance(exc, SourceUnreachable):  # the store is down: retry, not fix the input
        return 1
    return 2 if isinstance(exc, DatasetError | LineageOptionError) else 1


def _known_errors() -> tuple[type[BaseException], ...]:
    from pydantic import ValidationError

    from store.settings import StoreError
    from workers.data.datasets import DatasetError
    from workers.learning.models import CheckpointError

    return (StoreError, DatasetError, CheckpointError, ValidationError, ValueError, RuntimeError)


@contextlib.contextmanager
def _failing(code: int = 2, errors: type | tuple[type, ...] | None = None):
    """A known error inside (``errors``, else :func:`_known_errors`) is one ``error:`` line
    and exit ``code``; nested, the inner one's errors take its code (an inner one's exit
    passes the outer)."""
    try:
        yield
    except Exception as exc:  # the known ones are looked up only now (they import torch)
        if isinstance(exc, typer.Exit) or not isinstance(exc, errors or _known_errors()):
            raise
        _fail(exc, code)


def _budget(value: float) -> float:
    """``--budget`` / ``--backfill-budget``: a finite number, at least 0 (``inf``, ``nan``
    and ``-1`` are no budget: one error line naming the option, exit 2)."""
    if not math.isfinite(value) or value < 0:
        raise typer.BadParameter(
            f"{value} is no budget: give a fraction of the collection from 0 to 1, or a count "
            "of items (a whole number above 1), e.g. 0.3 or 500"
        )
    return value


def _opt(kind: Any, panel: str | None, help: str | None, *names: str, **more: Any) -> Any:
    """An option's annotation, ``Annotated[kind, typer.Option(...)]``, in help panel ``panel``."""
    return Annotated[kind, typer.Option(*names, help=help, rich_help_panel=panel, **more)]


MethodOpt = _opt(
    str,
    "Training",
    "none | bct | pct | bct+pct | bct+pct+emb | hoc | bct+hoc | bct+pct+hoc | bct+pct+emb+hoc",
)
AncestorWeightsOpt = _opt(
    str,
    "Training",
    "each: every ancestor gets each kind's weight; share: the ancestors share it",
    hidden=True,
)
AgainstOpt = _opt(
    str, "Training", "all | last: constrain against every active ancestor or the last"
)
PolicyOpt = _opt(str, "Backfill", "random | oldest-first | uncertainty | representative")
EpochsOpt = _opt(
    int,
    "Training",
    f"training epochs per generation (1-{MAX_EPOCHS}); an interrupted generation resumed by "
    "this cycle takes a changed value if no epoch of it finished, else keeps its own",
    min=1,
    max=MAX_EPOCHS,
)
ImageSizeOpt = _opt(
    int | None,
    "Data",
    "side of the square images are decoded to (default: the first evaluation image's size, "
    "at most 32 a side); a lineage keeps the size it began with",
)
ArchitectureOpt = _opt(
    str | None,
    "Training",
    "JSON keys over the default architecture, e.g. '{\"width\": 24}' or your own backbone: "
    '\'{"kind": "import", "factory": "mypkg.nets:build", "options": {}}\'',
    hidden=True,
)
BudgetOpt = _opt(
    float, "Backfill", "a fraction (0 to 1) or a count of items (> 1)", callback=_budget
)
RetireOpt = _opt(
    float,
    "Backfill",
    "backfill first the generations holding at most this share of the collection, so they retire",
    min=0.0,
    max=1.0,
    hidden=True,
)
SeedOpt = _opt(int, "Training", "seed of initialisation and epoch order")
NoGateOpt = _opt(bool, "Gate", "promote every generation", "--no-gate")
MaxNfrOpt = _opt(float, "Gate", "gate: reject NFR above this beyond doubt", min=0.0, max=1.0)
TolOpt = _opt(float, "Gate", "gate: accuracy >= champion's - this", min=0.0, hidden=True)
EccOpt = _opt(
    bool, "Gate", "gate: reject when C(g,k) - C(k,k) < -ecc-margin beyond doubt", hidden=True
)
EccMarginOpt = _opt(
    float, "Gate", "gate: C(g,k) may trail C(k,k) by this", min=0.0, max=1.0, hidden=True
)
ConfidenceOpt = _opt(
    float,
    "Gate",
    "gate: level of its intervals",
    "--gate-confidence",
    min=0.5,
    max=0.9999,
    hidden=True,
)
IncompatibleOpt = _opt(
    str,
    "Gate",
    "targeted | backfill | reject: an update not compatible with an ancestor holding collection "
    "items is promoted re-embedding only the classes that would regress (at most "
    "gate.max_backfill of the collection), or all that ancestor's items, or rejected",
    "--gate-on-incompatible",
)
MaxBackfillOpt = _opt(
    float,
    "Gate",
    "gate: the most a targeted backfill may re-embed (share of the collection)",
    "--gate-max-backfill",
    min=0.0,
    max=1.0,
    hidden=True,
)
ResamplesOpt = _opt(
    int, "Gate", "gate: paired bootstrap resamples for C(g,k) - C(k,k)", min=100, hidden=True
)
NoWaitOpt = _opt(bool, "Run", "refuse, instead of waiting, while a cycle runs", "--no-wait")
WeightOpt = _opt(
    list[str] | None,
    "Training",
    "KIND=W, repeatable: a constraint kind's weight (influence, focal, embedding, contrastive); "
    "kinds not given keep their default",
    "--weight",
    hidden=True,
)
BatchRowsOpt = _opt(int, "Backfill", "backfill: items per committed part", min=1, hidden=True)


def _weights(items: list[str] | None) -> dict[str, float]:
    """``["focal=0.5", ...]`` as a mapping; a malformed item is bad input."""
    weights: dict[str, float] = {}
    for item in items or []:
        kind, _, value = item.partition("=")  # no "=": value "" is not a number
        try:
            weights[kind.strip()] = float(value)
        except ValueError:
            _fail(f"--weight takes KIND=W, e.g. --weight focal=0.5; got {item!r}")
    return weights


def _architecture(text: str | None) -> dict | None:
    """``--architecture`` JSON as a mapping; anything else is bad input."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        _fail(f"--architecture takes a JSON object, e.g. '{{\"width\": 24}}': {exc}")
    if not isinstance(value, dict):
        _fail(f"--architecture takes a JSON object, got {text!r}")
    return value


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="a TOML file of the typed config: top-level keys (dataset, ...) and \\[train], "
        "\\[gate], \\[backfill], \\[serve]; options given on the command line override it; "
        "every setting is a key there, options hidden from this help included "
        "(`graceful config --show` prints them all)",
        rich_help_panel="Run",
    ),
]

# a cycle command's option -> where it goes in the typed config: (section or None for the
# top level, key); the options named in _NEGATED set the opposite of the flag
_OPTION_KEYS: dict[str, tuple[str | None, str]] = {
    "dataset": (None, "dataset"),
    "stages": (None, "stages"),
    "force": (None, "force"),
    "strict": (None, "strict"),
    "reevaluate": (None, "reevaluate"),
    "no_wait": (None, "wait_for_lock"),
    "method": ("train", "method"),
    "against": ("train", "against"),
    "ancestor_weights": ("train", "ancestor_weights"),
    "epochs": ("train", "epochs"),
    "seed": ("train", "seed"),
    "weight": ("train", "weights"),
    "class_capacity": ("train", "class_capacity"),
    "image_size": ("train", "image_size"),
    "architecture": ("train", "architecture"),
    "no_gate": ("gate", "enabled"),
    "max_nfr": ("gate", "max_nfr"),
    "accuracy_tolerance": ("gate", "accuracy_tolerance"),
    "require_ecc": ("gate", "require_ecc"),
    "ecc_margin": ("gate", "ecc_margin"),
    "confidence": ("gate", "confidence"),
    "bootstrap_resamples": ("gate", "bootstrap_resamples"),
    "on_incompatible": ("gate", "on_incompatible"),
    "max_backfill": ("gate", "max_backfill"),
    "backfill_budget": ("backfill", "budget"),
    "backfill_policy": ("backfill", "policy"),
    "backfill_batch_rows": ("backfill", "batch_rows"),
    "backfill_retire_share": ("backfill", "retire_share"),
}
_NEGATED = {"no_wait", "no_gate"}


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was given (on the command line or by its environment
    variable), not left at its default."""
    source = ctx.get_parameter_source(name)
    return source not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


def _read_config(path: Path | None) -> dict:
    """The ``--config`` file's tables, checked (an unreadable file, an unknown key or a bad
    value is one ``error:`` line naming the file and the key, exit 2); {} without one."""
    if path is None:
        return {}
    from flows.config_file import ConfigFileError, read_config_file

    with _failing(errors=ConfigFileError):
        return read_config_file(path)


def _cycle_config(opts: dict, file: dict, fallback: dict | None = None, **fixed):
    """One typed CycleConfig: the options given on the command line (click's
    ParameterSource) over the ``--config`` file's values, over the models' defaults (an
    option left at its default never overrides the file, and the defaults are the
    models'). ``fallback``: the command's own values for keys neither names (``run``'s
    ``--dataset digits``); ``fixed``: values the command decides (``run``'s stages)."""
    from flows.config import CycleConfig

    ctx = opts["ctx"]
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in file.items() if k != "serve"}
    for key, value in (fallback or {}).items():
        data.setdefault(key, value)
    for option, (section, key) in _OPTION_KEYS.items():
        if option not in opts or not _given(ctx, option):
            continue
        value = opts[option]
        if option in _NEGATED:
            value = not value
        elif option == "weight":  # kinds given override the file's, the others stay
            value = {**data.get("train", {}).get("weights", {}), **_weights(value)}
        elif option == "architecture":
            value = _architecture(value)
        (data.setdefault(section, {}) if section else data)[key] = value
    data.update(fixed)
    with _failing():
        # section by section, so a bad option's error names its field as the option does
        sections = {
            "train": TrainConfig(**data.pop("train", {})),
            "gate": GateConfig(**data.pop("gate", {})),
            "backfill": BackfillConfig(**data.pop("backfill", {})),
        }
        return CycleConfig(**data, **sections)


def _cycle_options(
    method: MethodOpt = str(_TRAIN.method),
    against: AgainstOpt = _TRAIN.against,
    ancestor_weights: AncestorWeightsOpt = _TRAIN.ancestor_weights,
    epochs: EpochsOpt = _TRAIN.epochs,
    seed: SeedOpt = _TRAIN.seed,
    backfill_budget: BudgetOpt = _BACKFILL.budget,
    backfill_policy: PolicyOpt = str(_BACKFILL.policy),
    backfill_retire_share: RetireOpt = _BACKFILL.retire_share,
    no_gate: NoGateOpt = False,
    max_nfr: MaxNfrOpt = _GATE.max_nfr,
    accuracy_tolerance: TolOpt = _GATE.accuracy_tolerance,
    require_ecc: EccOpt = _GATE.require_ecc,
    ecc_margin: EccMarginOpt = _GATE.ecc_margin,
    confidence: ConfidenceOpt = _GATE.confidence,
    bootstrap_resamples: ResamplesOpt = _GATE.bootstrap_resamples,
    on_incompatible: IncompatibleOpt = str(_GATE.on_incompatible),
    max_backfill: MaxBackfillOpt = _GATE.max_backfill,
    backfill_batch_rows: BatchRowsOpt = _BACKFILL.batch_rows,
    no_wait: NoWaitOpt = False,
    weight: WeightOpt = None,
    image_size: ImageSizeOpt = None,
    architecture: ArchitectureOpt = None,
    config: ConfigOpt = None,
) -> None:
    """The options ``run`` and ``cycle`` share, declared once (:func:`_with_cycle_options`)."""


def _with_cycle_options(fn: Callable[..., None]) -> Callable[..., None]:
    """``fn`` (taking ``**shared``) with :func:`_cycle_options`'s options after its own:
    typer reads one signature per command, so the shared ones join it here."""
    own = [
        p
        for p in inspect.signature(fn, eval_str=True).parameters.values()
        if p.kind != inspect.Parameter.VAR_KEYWORD
    ]
    shared = list(inspect.signature(_cycle_options, eval_str=True).parameters.values())

    @functools.wraps(fn)
    def command(**kwargs: Any) -> None:
        fn(**kwargs)

    command.__signature__ = inspect.Signature([*own, *shared])  # type: ignore[attr-defined]
    command.__annotations__ = {**_cycle_options.__annotations__, **fn.__annotations__}
    return command


RunDatasetOpt = _opt(str, "Data", "data-set spec, e.g. digits, fashion-mnist")
GenerationsOpt = _opt(int, "Run", "cycles to run (>= 1)", min=1)
CycleDatasetOpt = _opt(
    str | None,
    "Data",
    "imagefolder:DIR, parquet:PATH, or a scenario's data set (default: the lineage's)",
)
StagesOpt = _opt(
    int | None, "Data", "stages of the scenario (default: the lineage's, else 3)", min=1
)
ForceOpt = _opt(bool, "Run", "train even if nothing changed since the champion", "--force")
StrictOpt = _opt(
    bool, "Data", "refuse a source with unreadable items (else: skip them)", "--strict"
)
CapacityOpt = _opt(
    int | None,
    "Training",
    "head rows a new source lineage reserves (default max(64, 2 x classes))",
    min=2,
    hidden=True,
)
ReevaluateOpt = _opt(
    bool,
    "Data",
    "if the evaluation set changed: measure every kept generation on the new one",
    "--reevaluate",
)


@app.command()
@_with_cycle_options
def run(
    ctx: typer.Context,
    dataset: RunDatasetOpt = "digits",
    generations: GenerationsOpt = 3,
    **shared: Any,
) -> None:
    """Run N update cycles of the growing scenario in GRACEFUL_HOME (N: --generations,
    else the config file's stages, else 3)."""
    _env_defaults()
    file = _read_config(shared["config"])
    opts = {"ctx": ctx, "dataset": dataset, "generations": generations, **shared}
    n = generations if _given(ctx, "generations") else file.get("stages") or generations
    cfg = _cycle_config(opts, file, {"dataset": dataset}, stages=n)
    _run_cycles(cfg, n)


@app.command()
@_with_cycle_options
def cycle(
    ctx: typer.Context,
    dataset: CycleDatasetOpt = None,
    stages: StagesOpt = None,
    force: ForceOpt = False,
    strict: StrictOpt = False,
    class_capacity: CapacityOpt = None,
    reevaluate: ReevaluateOpt = False,
    **shared: Any,
) -> None:
    """Run one update cycle; an interrupted one resumes.

    On a source (imagefolder:DIR, parquet:PATH) it trains on a snapshot of the source as
    it is now; on any other data set, on the scenario's next stage. When the training
    data equals the champion's snapshot there is nothing new to learn: the cycle prints
    a line with ``skipped`` and exits 0, unless ``--force``.
    """
    _env_defaults()
    file = _read_config(shared["config"])
    opts = {k: v for k, v in locals().items() if k != "shared"} | shared
    cfg = _cycle_config(opts, file)
    _run_cycles(cfg, 1)


def _progress_bar(transient: bool = False):
    """The CLI's rich progress bar (on stderr: stdout stays the command's answer)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=err,
        transient=transient,
    )


def _run_cycles(cfg, n: int) -> None:
    _check_inputs(cfg.dataset, training=True)
    from flows import progress as step_progress
    from flows.cycle import update_cycle
    from workers.runtime import join_cluster

    with _failing(code=1):
        join_cluster()  # a RAY_ADDRESS that refuses this client: the error line alone
    with _progress_bar() as bar:
        total = bar.add_task(f"{n} update cycle(s)", total=n * 100)
        for i in range(n):

            def listen(name: str, pct: float, i: int = i) -> None:
                bar.update(total, completed=i * 100 + pct, description=f"cycle {i + 1}/{n}: {name}")

            step_progress.set_listener(listen)
            _quiet_known_failures()
            try:
                result = update_cycle(cfg)
            except _known_errors() as exc:
                bar.stop()
                _fail(exc, code=_exit_code(exc))
            finally:
                step_progress.set_listener(None)
            if job := result.get("resumed_backfill"):
                err.print(f"finished the interrupted backfill job {job['job']}")
            if result.get("skipped"):
                bar.stop()
                out.print(result["message"])
                break
            if result.get("resumed"):
                err.print(escape(result["resumed"]))
            verdict = "promoted" if result["promoted"] else "rejected"
            err.print(
                f"generation {result['generation']}: accuracy {result['accuracy']:.4f}, {verdict}"
            )
            if result.get("ray_node") and os.environ.get("RAY_ADDRESS"):  # a cluster's node
                err.print(
                    f"generation {result['generation']}: trained on Ray node "
                    f"{result['ray_node']} ({result['ray_node_ip']})",
                    soft_wrap=True,
                )
    _print_summary()


def _matrix_table(title: str, pairs: list, fmt: str = "{:.4f}") -> Table:
    ids = sorted({int(p[0]) for p in pairs} | {int(p[1]) for p in pairs})
    value = {(int(a), int(b)): v for a, b, v in pairs}
    table = Table(title=escape(title))  # "[a][b]" would read as rich markup
    table.add_column("a \\ b")
    for b in ids:
        table.add_column(str(b), justify="right")
    for a in ids:
        table.add_row(str(a), *[fmt.format(value[(a, b)]) if (a, b) in value else "" for b in ids])
    return table


def _gate_cell(gate: dict) -> str:
    """The gate's outcome in a word, with the targeted backfill's size."""
    outcome = gate.get("outcome")
    debt = (gate.get("targeted_backfill") or {}).get("items") or 0
    if outcome == "promote-with-backfill":
        return f"targeted {debt}"  # promoted, {debt} items re-embedded first
    return outcome or "-"


def _print_summary() -> None:
    from flows.report import build_report
    from store.lineage import Lineage

    rep = build_report(Lineage())
    gens = Table(title="Generations")
    for col in ("id", "status", "accuracy", "gate", "architecture", "constraints"):
        gens.add_column(col)
    for g in rep["generations"]:
        cons = ", ".join(
            f"{c['kind'][0]}→{c['target']}" + ("×" if c["status"] == "retired" else "")
            for c in g["constraints"]
        )
        arch = g["architecture"]
        gens.add_row(
            str(g["id"]) + (" ★" if g["champion"] else ""),
            g["status"],
            f"{g['accuracy']:.4f}" if g["accuracy"] is not None else "-",
            _gate_cell(g.get("gate") or {}),
            f"{arch.get('kind')} w{arch.get('width')} d{arch.get('depth')}",
            cons or "-",
        )
    out.print(gens)
    if rep["nfr"]:
        out.print(_matrix_table("NFR(a, b)", rep["nfr"]))
    out.print(_matrix_table("C[a][b] top-1 (a: queries, b: reference)", rep["compat_top1"]))
    out.print(
        f"AC={rep['ac']}  AM={rep['am']}  M_mix={rep['m_mix']}  "
        f"gallery={rep['gallery']['by_generation']}"
    )


@app.command()
def backfill(
    budget: BudgetOpt = _BACKFILL.budget,
    policy: PolicyOpt = str(_BACKFILL.policy),
    retire_share: RetireOpt = _BACKFILL.retire_share,
    batch_rows: Annotated[int, typer.Option(min=1)] = _BACKFILL.batch_rows,
    seed: SeedOpt = _BACKFILL.seed,
) -> None:
    """Re-embed part of the collection with the champion (resumes an unfinished job)."""
    _env_defaults()
    # bad values (an unknown policy, a budget of inf) are bad input, before anything
    with _failing():
        cfg = BackfillConfig(
            budget=budget,
            policy=policy,
            retire_share=retire_share,
            batch_rows=batch_rows,
            seed=seed,
        )
    _check_inputs(None, existing=True)
    from flows.backfill import backfill_flow

    _quiet_known_failures()
    with _failing(code=1):
        result = backfill_flow(**cfg.model_dump())
    out.print_json(json.dumps(result, default=str))


@app.command()
def report(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False,
) -> None:
    """The lineage, every metric, the collection and the backfills (it reads; it never writes:
    a GRACEFUL_HOME without a lineage is an error, not an empty report)."""
    _check_inputs(None, existing=True)
    from flows.report import build_report
    from store.lineage import Lineage

    with _failing():
        rep = build_report(Lineage())
    if as_json:
        sys.stdout.write(json.dumps(rep) + "\n")
    else:
        _print_summary()


@app.command()
def index(
    spec: Annotated[
        str | None,
        typer.Argument(
            help="images:DIR, imagefolder:DIR or parquet:PATH; default: the collection's own"
        ),
    ] = None,
    prune: Annotated[bool, typer.Option("--prune", help="remove items gone from SPEC")] = False,
    strict: Annotated[
        bool, typer.Option("--strict", help="refuse unreadable items instead of skipping them")
    ] = False,
    part_rows: Annotated[
        int, typer.Option(min=1, help="items per committed part")
    ] = IndexConfig().part_rows,
) -> None:
    """Add SPEC's new items to the collection, embedded by the champion; re-embed changed
    ones; with --prune remove the ones gone. A killed run resumes where it stopped."""
    _env_defaults()
    _check_inputs(None, existing=True)
    from flows.collection import index_flow
    from workers.collection.items import parse_collection_spec
    from workers.data.datasets import DatasetError

    with _failing():
        if spec is not None:
            parse_collection_spec(spec)
        cfg = IndexConfig(spec=spec, prune=prune, strict=strict, part_rows=part_rows)
    _quiet_known_failures()
    from flows import progress as step_progress

    with _progress_bar(transient=True) as bar:
        task = bar.add_task("indexing", total=100)
        step_progress.set_listener(
            lambda name, pct: bar.update(task, completed=pct, description=f"indexing: {name}")
        )
        try:
            result = index_flow(cfg)
        except DatasetError as exc:  # a bad collection or source too (their base class)
            bar.stop()
            _fail(exc)
        except _known_errors() as exc:
            bar.stop()
            _fail(exc, code=1)
        finally:
            step_progress.set_listener(None)
    for item in result["skipped_items"]:
        err.print(f"skipped unreadable item {escape(item['key'])}: {escape(item['reason'])}")
    out.print(
        f"indexed {escape(result['spec'])} with generation {result['generation']}: "
        f"{result['added']} added, {result['reembedded']} re-embedded, {result['pruned']} "
        f"pruned, {result['unchanged']} unchanged, {result['skipped']} skipped; "
        f"{result['items']} items"
    )


@app.command()
def search(
    item: Annotated[
        str | None,
        typer.Option(help="the key of a collection item (scenario: a position of the test split)"),
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", help="query image (PNG/JPEG) or .npy")
    ] = None,
    k: Annotated[int, typer.Option(min=1)] = 5,
    as_json: Annotated[
        bool, typer.Option("--json", help="one JSON list of {key, score, generation} on stdout")
    ] = False,
) -> None:
    """Nearest collection items (by key) for a query item or file, from the committed state.

    With GRACEFUL_SEARCH_URL set (a running `graceful search-server`) the service answers;
    otherwise this process searches (no Prefect, no data set loaded; a key the champion
    embedded needs no model either).
    """
    if (item is None) == (file is None):
        _fail("give exactly one of --item or --file")
    url = os.environ.get("GRACEFUL_SEARCH_URL")
    if url and (file is None or file.suffix.lower() != ".npy"):
        hits = _search_remote(url, item, file, k)
    else:
        _check_inputs(None, existing=True)
        from flows.query import search_file, search_item
        from store.collection import CollectionStoreError
        from store.lineage import Lineage

        # an unreadable collection: a failure (exit 1), not bad input
        with _failing(), _failing(1, CollectionStoreError):
            hits = (
                search_item(Lineage(), item, k) if file is None else search_file(Lineage(), file, k)
            )
    if as_json:
        sys.stdout.write(json.dumps(hits["neighbors"]) + "\n")
        return
    label = "" if hits["label"] is None else f" (label {hits['label']})"
    what = f"item {item}{label}" if file is None else str(file)
    table = Table(title=escape(f"nearest collection items to {what}"))
    for col in ("rank", "key", "generation", "label", "score"):
        table.add_column(col)
    for r, h in enumerate(hits["neighbors"], 1):
        lab = "-" if h["label"] is None else str(h["label"])
        table.add_row(str(r), escape(h["key"]), str(h["generation"]), lab, f"{h['score']:.4f}")
    out.print(table)


def _search_remote(url: str, item: str | None, file: Path | None, k: int) -> dict:
    """`graceful search` through a running service (urllib: nothing heavy to import)."""
    import urllib.error
    import urllib.request
    import uuid

    headers = {}
    token = os.environ.get("GRACEFUL_SEARCH_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if file is None:
        body = json.dumps({"key": item, "k": k}).encode()
        headers["Content-Type"] = "application/json"
    else:
        try:
            data = file.read_bytes()
        except OSError as exc:
            _fail(f"cannot read query file {file}: {exc}")
        boundary = uuid.uuid4().hex
        body = b"".join(
            [
                f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{k}\r\n'.encode(),
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                f'filename="{file.name}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n".encode(),
                data,
                f"\r\n--{boundary}--\r\n".encode(),
            ]
        )
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    request = urllib.request.Request(
        url.rstrip("/") + "/search", data=body, headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        _fail(f"{message} (search service {url}: HTTP {exc.code})", 2 if exc.code < 500 else 1)
    except (urllib.error.URLError, OSError) as exc:
        _fail(f"cannot reach the search service at {url} (GRACEFUL_SEARCH_URL): {exc}", 1)
    return {"label": None, "neighbors": answer["results"]}


@app.command("search-server")
def search_server(
    host: Annotated[str, typer.Option(help="address to bind (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8765,
    poll_seconds: Annotated[
        float, typer.Option(min=0.05, help="how often the champion and manifest are read")
    ] = 0.5,
) -> None:
    """Serve search over HTTP (and the search page at /): the champion's encoder and the
    collection's index loaded once, swapped when a promotion or a committed part moves them.
    A bind other than loopback needs GRACEFUL_SEARCH_TOKEN (checked on every request but
    /healthz)."""
    _check_inputs(None)
    from flows.search_service import server

    with _failing():
        srv = server(host, port, poll_seconds=poll_seconds, log_level="info")
    out.print(f"graceful search on http://{host}:{port}/ (API docs: /docs)")
    srv.run()


@app.command()
def pin(generation: int, unpin: Annotated[bool, typer.Option("--unpin")] = False) -> None:
    """Pin a generation: its constraint stays active even when its items left the collection."""
    _check_inputs(None, existing=True)
    from store.lineage import Lineage

    with _failing():
        Lineage().set_pinned(generation, not unpin)
    out.print(f"generation {generation} {'unpinned' if unpin else 'pinned'}")


@app.command()
def abandon(
    generation: int,
    reason: Annotated[
        str, typer.Option(help="why: recorded as the generation's error")
    ] = "abandoned by the user",
) -> None:
    """Abandon an interrupted generation: recorded as failed with the reason, its resume
    file removed, so the next cycle trains a new generation instead of resuming it."""
    _check_inputs(None, existing=True)
    from flows.recovery import abandon_generation
    from store.lineage import Lineage
    from store.locks import LockHeld

    with _failing(), _failing(1, LockHeld):  # an unknown generation (a StoreError) is exit 2
        removed = abandon_generation(Lineage(), generation, reason)
    for path in removed:
        err.print(f"removed {escape(path)}")
    out.print(
        f"generation {generation} abandoned (failed: abandoned: {escape(reason)}); "
        "the next cycle trains a new generation"
    )


@app.command()
def serve(
    ctx: typer.Context,
    interval_minutes: Annotated[
        float, typer.Option(help="schedule of the update cycle")
    ] = _SERVE.interval_minutes,
    cron: Annotated[str | None, typer.Option(help="cron schedule instead of an interval")] = None,
    dataset: Annotated[
        str, typer.Option(help="the source (imagefolder:DIR, parquet:PATH) or data set")
    ] = "digits",
    epochs: EpochsOpt = _TRAIN.epochs,
    name: Annotated[str, typer.Option(help="the update cycle deployment's name")] = _SERVE.name,
    collection: Annotated[
        str | None,
        typer.Option(help="the on-demand index deployment's default spec (images:DIR, ...)"),
    ] = None,
    search: Annotated[
        bool, typer.Option("--search", help="also run the search service (search-server)")
    ] = False,
    search_host: Annotated[str, typer.Option(help="the search service's address")] = "127.0.0.1",
    search_port: Annotated[int, typer.Option(help="the search service's port")] = 8765,
    config: ConfigOpt = None,
) -> None:
    """Serve the deployments (scheduled update cycle, on-demand backfill and index) to a
    Prefect server.

    Their parameters are the typed config: the --config file's (the whole cycle config for
    the update cycle, its [backfill] for the backfill's budget, policy, ...; its [serve]
    for the schedule, the name and the collection) under the options given here.
    A scheduled cycle on a source trains only when the source changed since the champion's
    snapshot; otherwise it logs ``skipped: no new data since generation g``.
    """
    _env_defaults()
    file = _read_config(config)
    opts = locals()
    cycle_config = _cycle_config(opts, file, {"dataset": dataset})
    schedule = _serve_config(opts, file)
    _check_inputs(cycle_config.dataset, training=True)
    from deploy.deployments import serve_all

    with _failing():
        if search:
            from flows.search_service import serve_in_thread

            serve_in_thread(search_host, search_port)
            out.print(f"graceful search on http://{search_host}:{search_port}/")
    serve_all(cycle_config, **schedule.model_dump())  # interval_minutes, cron, name, collection


def _serve_config(opts: dict, file: dict):
    """``serve``'s own settings: the options given over the file's ``[serve]``; an
    ``--interval-minutes`` given without ``--cron`` replaces the file's cron."""
    ctx = opts["ctx"]
    data = dict(file.get("serve", {}))
    for option in ServeConfig.model_fields:
        if _given(ctx, option):
            data[option] = opts[option]
    if _given(ctx, "interval_minutes") and not _given(ctx, "cron"):
        data.pop("cron", None)
    with _failing():
        return ServeConfig(**data)


@app.command("config")
def show_config(
    show: Annotated[bool, typer.Option("--show", help="print the effective configuration")] = False,
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of TOML")] = False,
) -> None:
    """The effective configuration: the --config file's values over the models' defaults,
    every key (TOML that `--config` reads back, or JSON). It reads; it never writes."""
    if not show:
        _fail(
            "nothing to do: give --show to print the effective configuration; "
            "see `graceful config --help`"
        )
    from flows.config import GracefulConfig
    from flows.config_file import to_toml

    effective = GracefulConfig.model_validate(_read_config(config))
    if as_json:
        sys.stdout.write(json.dumps(effective.model_dump(mode="json"), indent=1) + "\n")
    else:
        sys.stdout.write(to_toml(effective))


# typer keeps a docstring's line breaks after its first paragraph; each paragraph of a
# command's description becomes one, wrapped to the terminal ([serve] is text, not markup)
for _command in app.registered_commands:
    _doc = inspect.getdoc(_command.callback) or ""
    _command.help = escape("\n\n".join(" ".join(p.split()) for p in _doc.split("\n\n")))

if __name__ == "__main__":
    app()
