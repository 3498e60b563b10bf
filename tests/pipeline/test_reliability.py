"""Bad paths and oversized inputs are refused before any work; a run writes its output whole or not at all."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.pipeline.test_cli import assert_one_line_error, krunch, KRUNCH

JOB = """apiVersion: krunch.dev/v1alpha1
kind: CompressionJob
metadata: {{name: {name}}}
spec:
  model: {{source: zoo:mobilenet-v2}}
  recipe:
    rules:
      - {{match: "classifier.1", method: svd, rank: {{fixed: 64}}}}
  evaluation: {{items: 4}}
  {extra}
"""


def job_file(tmp_path: Path, name: str = "rel", extra: str = "") -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(JOB.format(name=name, extra=extra))
    return path


@pytest.mark.parametrize("name", ['"../../escaped"', '"/tmp/absolute"', '"a/b"', '"Upper_Case"', '"nul\\0byte"', '"a..b"'])
@pytest.mark.parametrize("dry_run", [True, False])
def test_names_that_are_not_kubernetes_names_are_refused(tmp_path, name, dry_run):
    result = krunch("compress", str(job_file(tmp_path, name)), *(["--dry-run"] if dry_run else []), "--no-track")
    assert_one_line_error(result, "metadata.name")
    assert not Path("/tmp/absolute").exists() and not (tmp_path.parent / "escaped").exists()


def test_output_paths_that_cannot_work_are_refused_before_any_work(tmp_path):
    job = job_file(tmp_path)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert_one_line_error(krunch("compress", str(job), "--out", str(a_file), "--no-track"), "is a file, not a directory")
    long_name = tmp_path / ("n" * 300)
    assert_one_line_error(krunch("compress", str(job), "--out", str(long_name), "--no-track"), "the file system allows")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    result = krunch("compress", str(job), "--out", str(foreign), "--dry-run")
    assert_one_line_error(result, "not a previous output of job rel")
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_a_read_only_file_system_is_refused_before_any_work(tmp_path):
    target = tmp_path / "ro"
    target.mkdir()
    script = f"mount -t tmpfs -o ro tmpfs {target} && exec {KRUNCH} compress {job_file(tmp_path)} --out {target}/out --no-track"
    try:
        result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        pytest.skip("no unshare here")
    if "mount:" in result.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    assert_one_line_error(result, "read-only file system")


@pytest.mark.parametrize(
    ("extra", "fragment", "reason"),
    [
        ("resources: {workers: 1000000000}", "spec.resources.workers", "less than or equal to 4096"),
        ("resources: {cpusPerTask: .inf}", "spec.resources.cpusPerTask", "finite number"),
        ("evaluation: {tokens: 1000000000000}", "spec.evaluation.tokens", "less than or equal"),
    ],
)
def test_numbers_beyond_any_machine_are_refused(tmp_path, extra, fragment, reason):
    job = job_file(tmp_path, extra=extra).read_text().replace("  evaluation: {items: 4}\n", "")
    (tmp_path / "job.yaml").write_text(job)
    assert_one_line_error(krunch("compress", str(tmp_path / "job.yaml"), "--dry-run"), fragment, reason)


def test_alias_bombs_and_huge_job_files_are_refused_without_parsing_them(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    lines = ["apiVersion: krunch.dev/v1alpha1", "kind: CompressionJob", "metadata:", "  name: bomb",
             '  a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']  # fmt: skip
    lines += [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb.write_text("\n".join(lines) + "\nspec: {}\n")
    assert bomb.stat().st_size < 1000
    assert_one_line_error(krunch("compress", str(bomb), "--dry-run", timeout=60), "anchors and aliases")
    huge = tmp_path / "huge.yaml"
    huge.write_text(job_file(tmp_path).read_text() + "".join(f"# padding line {i}\n" for i in range(80_000)))
    assert_one_line_error(krunch("compress", str(huge), "--dry-run", timeout=60), "larger than 1024 KiB")


@pytest.mark.slow
def test_a_rerun_replaces_its_output_whole_and_ctrl_c_leaves_it_untouched(tmp_path):
    job, out = job_file(tmp_path), tmp_path / "out"
    first = krunch("compress", str(job), "--out", str(out), "--no-track", timeout=600)
    assert first.returncode == 0, first.stderr
    (out / "budget.json").write_text(json.dumps({"stale": True}))  # what an earlier job with a bytes target left
    second = krunch("compress", str(job), "--out", str(out), "--no-track", timeout=600)
    assert second.returncode == 0, second.stderr
    assert not (out / "budget.json").exists() and {p.name for p in out.iterdir()} == {"model.safetensors", "manifest.json", "report.json"}
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    # Ctrl-C as a terminal delivers it, whatever this test process's own SIGINT disposition is: a suite started
    # in the background of a non-interactive shell ignores SIGINT, and an ignored signal is inherited across exec
    process = subprocess.Popen([str(KRUNCH), "compress", str(job), "--out", str(out), "--no-track"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.partial-*")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    time.sleep(3)  # into the work: Ray up, the model loading or compressing
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith(("(", "[", "20"))]
    assert lines == ["krunch: interrupted; the partial output was removed and nothing more was registered"], stderr
    assert not list(tmp_path.glob(".out.*")), "a staging directory was left behind"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    shutil.rmtree(out)


@pytest.mark.parametrize(
    ("evaluation", "fragments"),
    [
        ("{tokens: 100000}", ["spec.evaluation.tokens", "perplexity task only"]),
        ("{data: file:/nonexistent/text.txt}", ["spec.evaluation.data", "perplexity task only"]),
        ("{task: perplexity, data: file:/nonexistent/text.txt}", ["spec.evaluation.task", "needs a causal-lm model"]),
    ],
)
def test_evaluation_fields_the_task_would_ignore_are_refused(tmp_path, evaluation, fragments):
    job = job_file(tmp_path).read_text().replace("evaluation: {items: 4}", f"evaluation: {evaluation}")
    (tmp_path / "job.yaml").write_text(job)
    assert_one_line_error(krunch("compress", str(tmp_path / "job.yaml"), "--dry-run"), *fragments)


def test_missing_calibration_files_are_refused_by_the_dry_run(tmp_path):
    job = job_file(tmp_path).read_text().replace(
        '      - {match: "classifier.1", method: svd, rank: {fixed: 64}}',
        '      - {match: "classifier.1", method: svd, activationAware: true, rank: {fixed: 64}}\n'
        "    calibration: {data: file:/nonexistent/images}",
    )
    (tmp_path / "job.yaml").write_text(job)
    assert_one_line_error(krunch("compress", str(tmp_path / "job.yaml"), "--dry-run"), "spec.recipe.calibration.data", "file not found")


def test_staging_left_by_a_killed_process_is_removed_by_the_next_run(tmp_path):
    import os

    from krunch.outputs import staged

    out = tmp_path / "out"
    dead = subprocess.Popen(["true"])
    dead.wait()
    abandoned = tmp_path / f".out.partial-{dead.pid}-abc"
    running = tmp_path / f".out.partial-{os.getpid()}-def"  # another live run's: left alone
    for directory in (abandoned, running):
        directory.mkdir()
    with staged(out) as staging:
        (staging / "report.json").write_text("{}")
    assert not abandoned.exists() and running.exists() and (out / "report.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("text", "tokens", "fragment"),
    [
        ("one paragraph only, no blank line to split it", 64, "needs at least two paragraphs"),
        ("first paragraph.\n\nsecond paragraph.\n", 100000, "has only"),
        (None, 64, "not a UTF-8 text file"),
    ],
)
def test_the_dry_run_reads_the_calibration_text_it_would_use(tmp_path, text, tokens, fragment):
    data = tmp_path / "calibration.txt"
    if text is None:
        data.write_bytes(bytes(range(256)) * 4)
    else:
        data.write_text(text)
    job = f"""apiVersion: krunch.dev/v1alpha1
kind: CompressionJob
metadata: {{name: text-data}}
spec:
  model: {{source: zoo:minilm-l6}}
  recipe:
    rules:
      - {{match: "encoder.layer.0.intermediate.dense", method: svd, activationAware: true, rank: {{fixed: 64}}}}
    calibration: {{data: "file:{data}", tokens: {tokens}}}
"""
    (tmp_path / "job.yaml").write_text(job)
    assert_one_line_error(krunch("compress", str(tmp_path / "job.yaml"), "--dry-run"), "spec.recipe.calibration", fragment)
