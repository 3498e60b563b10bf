"""The `krunch` command line.

Bad input (a KrunchError) is reported as one line naming the input and the
reason, exit status 2; a server that does not answer, exit status 3; any other
failure as one line, exit status 1; Ctrl-C, 130. `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from krunch import __version__
from krunch.app_env import apply_application_defaults
from krunch.errors import KrunchError

EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="krunch", description="Compress PyTorch models with tensor networks and quantization.")
    parser.add_argument("--version", action="version", version=f"krunch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    evaluate = commands.add_parser("eval", help="evaluate a model on real data and print its metrics")
    evaluate.add_argument("model", help="zoo:NAME, hf:DIR, file:PATH (with --factory), krunch:DIR or models:/NAME@ALIAS")
    evaluate.add_argument("--task", help="perplexity, embedding, ocr or image-agreement (default: the model's own)")
    evaluate.add_argument("--data", help="text for perplexity: 'wikipedia' (default), 'news' (held-out news articles) or a path to a UTF-8 text file")
    evaluate.add_argument("--tokens", type=int, default=4096, help="perplexity tokens from the evaluation split (default 4096)")
    evaluate.add_argument("--items", type=int, help="cap on words (ocr) or images (image-agreement), for quick runs")
    evaluate.add_argument("--compiled-decode", action="store_true", help="perplexity: also decode through krunch.runtime."
                          "greedy_decode, one compiled step per token (compiling takes tens of seconds)")
    evaluate.add_argument("--reference", help="reference model for fidelity / agreement (default: the model itself)")
    evaluate.add_argument("--factory", help="module:callable building the architecture of a file: model (or of the file: "
                          "source a krunch: or models:/ model was compressed from; never read from its manifest)")
    evaluate.add_argument("--reference-factory", help="module:callable for a file: reference")
    evaluate.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    evaluate.add_argument("--json", type=Path, metavar="OUT", help="also write the metrics as JSON to OUT")
    evaluate.set_defaults(handler=run_eval)

    compress = commands.add_parser("compress", help="run a CompressionJob file on this machine")
    compress.add_argument("job", type=Path, help="CompressionJob YAML (the same file kubectl applies)")
    compress.add_argument("--out", type=Path, help="output directory (default: results/<metadata.name>)")
    compress.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    compress.add_argument("--no-track", action="store_true", help="skip MLflow: no run, no registered version")
    compress.add_argument("--dry-run", action="store_true", help="validate the job and print the plan; no Ray, no MLflow, nothing written")
    compress.set_defaults(handler=run_compress)

    models = commands.add_parser("models", help="registered models in MLflow (MLFLOW_TRACKING_URI, or ./mlflow.db)")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    listing = models_commands.add_parser("list", help="the versions of a registered model: aliases, ratio, quality, source")
    listing.add_argument("name", help="registered model name (spec.registry.name)")
    listing.add_argument("--json", type=Path, metavar="OUT", help="also write the rows as JSON to OUT")
    listing.set_defaults(handler=run_models_list)

    zoo = commands.add_parser("zoo", help="list the packaged pretrained models")
    zoo.set_defaults(handler=run_zoo)

    for sub in (evaluate, compress, zoo, listing):
        sub.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def text_data_reference(value: str | None) -> str | None:
    """`--data` takes a built-in corpus name or a path; paths become file: references."""
    from krunch.data.text import BUILTIN_CORPORA

    if value is None or value in BUILTIN_CORPORA or value.startswith("file:"):
        return value
    return f"file:{value}"


def set_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            raise KrunchError("--threads", f"must be at least 1, got {threads}")
        torch.set_num_threads(threads)


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from krunch.evaluation import EvalOptions, Task, default_task, evaluate, parse_task
    from krunch.sources import load_model

    set_threads(args.threads)
    if args.items is not None and args.items < 1:
        raise KrunchError("--items", f"must be at least 1, got {args.items}")
    task = parse_task(args.task) if args.task else None

    def refuse_compiled_decode(task: Task | None) -> None:
        if args.compiled_decode and task not in (None, Task.PERPLEXITY):
            raise KrunchError("--compiled-decode", f"measures a causal LM's decode (task perplexity), not task {task.value}")

    refuse_compiled_decode(task)  # before loading when --task says it; else once the model's own task is known
    model = load_model(args.model, args.factory)
    task = task or default_task(model)
    refuse_compiled_decode(task)
    reference = load_model(args.reference, args.reference_factory) if args.reference else None
    options = EvalOptions(data=text_data_reference(args.data), tokens=args.tokens, items=args.items, compiled_decode=args.compiled_decode)
    metrics = evaluate(model, task, options, reference)

    report = {
        "model": args.model,
        "task": task.value,
        "parameters": model.parameter_count,
        "metrics": metrics,
        "krunch_version": __version__,
        "torch_version": torch.__version__,
    }
    print(format_table(report))
    if args.json:
        write_json(args.json, report)
    return 0


def write_json(path: Path, document: object) -> None:
    """`--json OUT` of every command and script: indented, UTF-8, parent directories created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")


def format_table(report: dict) -> str:
    rows = [("model", report["model"]), ("task", report["task"]), ("parameters", f"{report['parameters']:,}")]
    rows += [(name, value) for name, value in report["metrics"].items()]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  {'-' * 12}"]
    lines += [f"{name.ljust(width)}  {value}" for name, value in rows]
    return "\n".join(lines)


def run_compress(args: argparse.Namespace) -> int:
    from krunch.outputs import check_output, output_dir, source_bytes
    from krunch.spec import load_job

    set_threads(args.threads)
    job = load_job(args.job)
    out_dir = output_dir(job.metadata.name, args.out)
    check_output(out_dir, job.metadata.name, source_bytes(job.spec.model.source))
    if args.dry_run:
        return dry_run(job)
    if args.no_track:
        compress_and_save(job, out_dir)
        return 0
    from krunch.registry.tracking import TrackingError, configure, job_turn, preflight, track
    from krunch.registry.lineage import job_identity

    uri = configure()
    with job_turn(uri, job_identity(job)):  # on a sqlite store, runs of this job take turns
        checked = preflight(job, uri)  # the server answers and the job is new, before any work
        if checked.existing_version:
            done = "completed the pending registration of" if checked.completed else "already registered as"
            print(f"{job.metadata.name}: {done} {job.spec.registry.name} version {checked.existing_version} "
                  f"(job {checked.identity}); nothing to do. Change the job to make a new version.")  # fmt: skip
            return 0
        result = compress_and_save(job, out_dir)
        try:
            tracked = track(job, result, out_dir, checked)
        except TrackingError as err:  # the work is not lost: the model is on disk and the job can be re-run
            raise type(err)(err.subject, f"{err.reason}; the compressed model is kept in {out_dir}/") from None
    print(f"MLflow run {tracked.run_id} at {checked.tracking_uri}")
    if tracked.version:
        at = f"@{tracked.alias}" if tracked.alias else f"/{tracked.version}"
        print(f"registered {job.spec.registry.name} version {tracked.version}; load with "
              f"mlflow.pytorch.load_model('models:/{job.spec.registry.name}{at}')")  # fmt: skip
    return 0


def compress_and_save(job, out_dir: Path):  # noqa: ANN001, ANN201 - a CompressionJob and its result, imported lazily
    """Run the job into a staging directory that replaces `out_dir` whole at the end."""
    from krunch.outputs import OutputError, staged
    from krunch.report import format_summary
    from krunch.run import run_compression

    try:
        with staged(out_dir) as staging:  # a failure or Ctrl-C leaves no partial directory, a rerun no stale file
            result = run_compression(job, staging)
    except Exception as err:
        if (cause := storage_cause(err)) is None:
            raise
        raise OutputError(f"--out {out_dir}", f"{cause.strerror} while writing the model; the partial output was removed") from err
    result.model.reference = f"krunch:{out_dir}"
    print(format_summary(result.report))
    print(f"wrote {out_dir}/ (model.safetensors, manifest.json, report.json); reload with: krunch eval krunch:{out_dir}")
    return result


def dry_run(job) -> int:  # noqa: ANN001 - a CompressionJob, imported lazily
    """Everything that can be checked without compressing: the spec, the source model, the rules' matches,
    fixed ranks against break-even. The same job file `kubectl apply` takes."""
    from krunch.report import format_plan, format_stages
    from krunch.run import prepare_job
    from krunch.execution.tasks import remote_weights_note
    from krunch.sources.stated import describe_inputs

    prepared = prepare_job(job)
    print(format_plan(job.metadata.name, job.spec.model.source, prepared.plan))
    print(describe_inputs(prepared.model))
    if note := remote_weights_note(job.spec.model.source, os.environ.get("RAY_ADDRESS")):
        print(note)
    if stages := format_stages(job.spec.recipe):
        print(stages)
    print("dry run: the job is valid; nothing was compressed, tracked or written")
    return 0


def run_models_list(args: argparse.Namespace) -> int:
    from krunch.registry.tracking import list_versions

    rows = list_versions(args.name)
    columns = ("version", "aliases", "ratio", "metric", "before", "after", "delta", "source", "methods", "state")
    widths = {c: max([len(c)] + [len(str(row[c])) for row in rows]) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns))
    if args.json:
        write_json(args.json, rows)
    return 0


def run_zoo(args: argparse.Namespace) -> int:
    from krunch.zoo import zoo_names

    for name in zoo_names():
        print(f"zoo:{name}")
    return 0


def storage_cause(err: BaseException | None) -> OSError | None:
    """The full or read-only disk behind an error, however deep in its chain (a sqlite store on a full disk
    reports its own 'database or disk is full' on top of the OSError that started it)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
            return err
        if "database or disk is full" in str(err):
            return OSError(errno.ENOSPC, "no space left on device (the sqlite tracking store)")
        if "No space left on device" in str(err):  # raised by a library that wraps the OSError (safetensors)
            return OSError(errno.ENOSPC, "No space left on device")
        err = err.__cause__ or err.__context__
    return None


def main(argv: Sequence[str] | None = None) -> int:
    apply_application_defaults()
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KrunchError as err:
        if args.debug:
            raise
        print(f"krunch: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("krunch: interrupted; the partial output was removed and nothing more was registered", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # anything else: one line, the traceback only on request
        if args.debug:
            raise
        if (cause := storage_cause(err)) is not None:
            where = cause.filename or "the output or tracking store"
            print(f"krunch: error: {where}: {cause.strerror}; nothing partial was kept in the output directory", file=sys.stderr)
            return EXIT_FAILURE
        detail = " ".join(str(err).split())[:400]
        print(f"krunch: error: {type(err).__name__}: {detail} (run again with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
