#!/usr/bin/env python
"""Scaling of the decomposition stage: in process vs Ray at 1..N workers, on SmolLM2's 210 linears.

One run, one machine, each row in a fresh process (a local Ray instance
started per Ray row, its start-up time reported separately), the same fixed
recipe for every row: truncated SVD at
rank 128 plus int8 on every linear of the 30 decoder layers. Reports wall time,
speedup over Ray at 1 worker, parallel efficiency, Ray's overhead at 1 worker
over in-process, whether the factors are bit-identical to in-process, and the
driver's peak RSS while decomposing next to the fp32 size of the source
weights and the driver's fixed overhead (RSS before the model is loaded). The
weights are paged in before the stage, as a real job's calibration would:
the driver itself never reads them on the Ray path, so this is the worst case.

With `--driver` it measures a whole job instead: SmolLM2 int8 (examples/smollm2-int8.yaml's recipe, perplexity
on 4096 tokens before and after, layer tasks on a local Ray instance of 2 workers), once with the driver
holding the whole model and once streamed (`resources.stream`), each in a fresh process: the driver's peak
RSS over its fixed overhead (interpreter, torch, transformers, tokenizer, Ray driver: RSS before any weight
is read), per source weight byte, for the compression stages and for the whole job (which ends by loading
the compressed model, file-mapped for a streamed job, and pickling it as MLflow's pickle flavour does). `--model zoo:qwen2.5-coder-1.5b` (3.6 GB of bf16 weights,
`scripts/setup_large_model.sh`) runs the same on a model ten times bigger; `--cap F` puts each driver alone in a
cgroup v1 memory group capped at F times the source's weight bytes, the Ray instance (started here) outside it,
and reports whether the job finished under the cap. `--bytes-ratio R` budgets the decoder layers at R of their
bytes (dense or low-rank, int8 or int4 per layer) instead of int8 everywhere; `--recipe gptq` (or
`gptq-propagated`) runs examples/smollm2-int4.yaml's calibrated recipe, which a streamed driver runs block by block.

With `--two-node` it runs the stage in process, on Ray on one node, and on a loopback cluster of two (head
127.0.0.2 without CPUs, worker 127.0.0.3) whose worker node cannot see the source directory (an empty tmpfs
over it in its own mount namespace, root only): where the tasks got their tensors, and whether the factors are
bit-identical to in-process.

With `--gpus-per-task G` (on a machine with GPUs) it adds Ray rows whose tasks
each ask for G GPUs and decompose in CUDA; GPU factors are not bit-identical to
CPU ones (different kernels), so every row also reports how far its per-layer
relative reconstruction errors are from in-process ones.

    .venv/bin/python scripts/bench_scaling.py [--json results/bench_scaling.json]
    .venv/bin/python scripts/bench_scaling.py --driver --json docs/bench_driver.json
    .venv/bin/python scripts/bench_scaling.py --two-node --json docs/bench_two_node.json
    .venv/bin/python scripts/bench_scaling.py --driver --model zoo:qwen2.5-coder-1.5b --cap 0.333 --rows streamed --json docs/bench_driver_qwen.json
    .venv/bin/python scripts/bench_scaling.py --driver --model zoo:qwen2.5-coder-1.5b --cap 0.333 --rows streamed --bytes-ratio 0.25 --json docs/bench_driver_qwen_bytes.json
    .venv/bin/python scripts/bench_scaling.py --driver --model zoo:qwen2.5-coder-1.5b --cap 0.333 --rows streamed --recipe gptq --calibration-tokens 4096 --json docs/bench_driver_qwen_gptq.json
    python scripts/bench_scaling.py --workers 1,4,16 --gpus-per-task 0.25 --gpu-workers 4 --repeat 1
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from krunch.cli import write_json  # noqa: E402
from krunch.execution.executors import Execution, InProcessExecutor, RayExecutor  # noqa: E402
from krunch.execution.session import ray_session  # noqa: E402
from krunch.plan import make_plan  # noqa: E402
from krunch.spec import Recipe  # noqa: E402

ROW_TIMEOUT_S = 3600
CGROUP = Path("/sys/fs/cgroup/memory")
RECIPE = {"rules": [{"match": "model.layers.*", "method": "svd", "rank": {"fixed": 128}}], "quantize": {"bits": 8}}


class PeakRss:
    """Samples this process's RSS every few milliseconds while active: the driver's peak during a stage."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
        self._process = psutil.Process()

    def __enter__(self) -> PeakRss:
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def digest(execution: Execution) -> str:
    """A hash of every factor, bit for bit: rows run in separate processes compare through it."""
    sha = hashlib.sha256()
    for result in execution.results:
        for key, value in sorted(result.module.state_dict().items()):
            sha.update(key.encode())
            sha.update(value.contiguous().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def measure_row(mode: str, workers: int, gpus_per_task: float, source: str | None = None, address: str | None = None) -> dict:
    """One row, in a fresh process, so that no row's memory or warm caches leak into another's. `source`: an `hf:`
    directory of SmolLM2 to read instead of the zoo's; `address`: a running cluster of two nodes to join."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from krunch.sources import load_model

    process = psutil.Process()
    ray_start = time.perf_counter()
    with ray_session(address) if mode.startswith("ray") else nullcontext():
        ray_start_s = time.perf_counter() - ray_start if mode.startswith("ray") else 0.0
        if address:
            wait_for_nodes(2)
        import transformers.models.llama.modeling_llama  # noqa: F401  the model's code is fixed overhead, its weights are not

        gc.collect()
        baseline_rss = process.memory_info().rss  # interpreter, torch, transformers, the Ray driver
        model = load_model(source or "zoo:smollm2-135m")
        for param in model.module.parameters():  # page the weights in, as calibration or the before-evaluation
            float(param.detach().sum())  # of a real job would (the worst case); a reduction allocates nothing
        gc.collect()
        ready_rss = process.memory_info().rss
        plan = make_plan(model.module, Recipe.model_validate(RECIPE))
        executor = RayExecutor(workers=workers, gpus_per_task=gpus_per_task if mode == "ray-gpu" else 0) if mode.startswith("ray") else InProcessExecutor(threads=1)
        gc.collect()
        with PeakRss() as rss:
            start = time.perf_counter()
            execution = executor.run(model, plan, {}, {})
            wall = time.perf_counter() - start
    return {"mode": mode, "workers": workers, "wall_s": round(wall, 3), "task_s": round(sum(r.seconds for r in execution.results), 3),
            "driver_peak_rss_bytes": rss.peak, "driver_baseline_rss_bytes": baseline_rss, "driver_ready_rss_bytes": ready_rss, "ray_start_s": round(ray_start_s, 2),
            "layers": len(execution.results), "factors_sha256": digest(execution), "device": execution.info["device"],
            "nodes": execution.info.get("nodes", 1), "weights_from": execution.info.get("weights_from", "driver"),
            "tensors_via_object_store": execution.info.get("tensors_via_object_store", 0),
            "tensors_read_by_workers": execution.info.get("tensors_read_by_workers", 0),
            "rel_errors": [result.rel_error for result in execution.results],
            "source_weight_bytes": sum(p.numel() for p in model.module.parameters()) * 4}  # fmt: skip


DRIVER_RECIPE = {"rules": [{"match": "*", "method": "none"}], "quantize": {"bits": 8, "symmetric": True}}


GPTQ_QUANTIZE = {"bits": 4, "groupSize": 64, "symmetric": False, "grid": "fitted", "rounding": "gptq"}


def driver_recipe(bytes_ratio: float | None, recipe: str = "int8", calibration_tokens: int = 8192, layers: str | None = None) -> dict:
    """int8 everywhere; with a bytes ratio, the decoder layers under that budget (dense or low-rank, int8 or int4 per
    layer) and the rest int8, as bench_inference's `bytesRatio 0.2` row; `gptq` / `gptq-propagated`:
    examples/smollm2-int4.yaml's recipe (decoder int4 g64 gptq on the fitted grid, embedding and head int8), with
    the original model's Grams or error-propagating; `layers`: only the decoder layers that pattern matches, the rest
    (embedding and head included) left as they are."""
    if recipe.startswith("gptq"):
        embedding = {"method": "none", "quantize": {"bits": 8, "grid": "fitted"}}
        decoder = [{"match": layers or "model.layers.*", "method": "none"}]
        rules = decoder if layers else [{"match": "model.embed_tokens", **embedding}, {"match": "lm_head", **embedding}, *decoder]
        return {"rules": rules,
                "quantize": GPTQ_QUANTIZE, "calibration": {"tokens": calibration_tokens, "propagate": recipe == "gptq-propagated"}}  # fmt: skip
    if bytes_ratio is None:
        return DRIVER_RECIPE
    return {"rules": [{"match": "model.layers.*", "method": "svd"}, {"match": "*", "method": "none"}],
            "target": {"bytesRatio": bytes_ratio}, "quantize": {"bits": 8, "symmetric": True}}  # fmt: skip


def recipe_label(args: argparse.Namespace) -> str:
    if args.recipe != "int8":
        return f"{args.recipe} ({args.calibration_tokens} calibration tokens{', layers ' + args.layers if args.layers else ''})"
    return f"bytesRatio {args.bytes_ratio}" if args.bytes_ratio else "int8"


def measure_driver(model: str, streamed: bool, address: str | None, recipe: dict) -> dict:
    """One whole job in this (fresh) process; peaks sampled for the compression stages and for the whole job."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import krunch.streaming.job as streamed_job
    from krunch.run import run_compression
    from krunch.sources import load_model
    from krunch.sources.hf import architecture_only
    from krunch.spec import parse_job

    document = {"apiVersion": "krunch.dev/v1alpha1", "kind": "CompressionJob", "metadata": {"name": "driver-memory"},
                "spec": {"model": {"source": model}, "recipe": recipe,
                         "evaluation": {"task": "perplexity", "tokens": 4096}, "resources": {"stream": streamed, "workers": 2}}}  # fmt: skip
    job = parse_job(document, "bench")
    process = psutil.Process()
    executor = RayExecutor(workers=2, address=address)
    with executor.session(), tempfile.TemporaryDirectory() as scratch:
        with architecture_only(keep_files=True):  # the code and tokenizer are fixed overhead, the weights are not
            source = load_model(model)
        weight_bytes = sum(path.stat().st_size for path in source.weight_files)
        del source
        gc.collect()
        fixed = process.memory_info().rss
        stages = {}
        whole_load = streamed_job.load_compressed

        def load(directory: Path, *args: object, streamed: bool = False, **kwargs: object):  # noqa: ANN202
            if not streamed:  # the final load for MLflow: the compression stages are over
                stages["peak"] = rss.peak
            return whole_load(directory, *args, streamed=streamed, **kwargs)

        streamed_job.load_compressed = load
        with PeakRss() as rss:
            start = time.perf_counter()
            result = run_compression(job, Path(scratch) / "out", executor=executor)
            wall = time.perf_counter() - start
            torch.save(result.model.module, Path(scratch) / "model.pth")  # what MLflow's pickle flavour writes
    report = result.report
    stage_peak = stages.get("peak", rss.peak)  # the whole-model job has no final load: its model is in memory already
    return {"driver": "streamed" if streamed else "whole model", "wall_s": round(wall, 1), "fixed_rss_bytes": fixed,
            "stages_peak_rss_bytes": stage_peak, "job_peak_rss_bytes": rss.peak, "source_weight_bytes": weight_bytes,
            "stages_over_fixed_per_source_byte": round((stage_peak - fixed) / weight_bytes, 3),
            "job_over_fixed_per_source_byte": round((rss.peak - fixed) / weight_bytes, 3),
            "perplexity_before": report["metrics_before"]["perplexity"], "perplexity_after": report["metrics_after"]["perplexity"],
            "bytes_after": report["bytes_after"], "shards": report["execution"].get("shards", 1),
            "source_dtype": report.get("source_dtype", "float32"), "target": report.get("target")}  # fmt: skip


def driver_table(rows: list[dict], model: str, recipe: str = "int8") -> str:
    header = f"{'driver':<12} {'wall s':>7} {'fixed MiB':>9} {'stages peak MiB':>15} {'(peak-fixed)/src':>16} {'job peak MiB':>12} {'(job-fixed)/src':>15} {'ppl before':>10} {'ppl after':>9} {'shards':>6}"
    capped = "cap_bytes" in rows[0]
    if capped:
        header += f" {'cap MiB':>8} {'cgroup peak MiB':>15} {'under cap':>9}"
    lines = [header, "-" * len(header)]
    for row in rows:
        cap = (f" {row['cap_bytes'] / 2**20:>8.0f} {row['cgroup_peak_bytes'] / 2**20:>15.0f} {str(row['finished_under_cap']):>9}" if capped else "")
        if "wall_s" not in row:  # killed under the cap
            lines.append(f"{row['driver']:<12} {'killed':>7}" + " " * (len(header) - len(cap) - 20) + cap)
            continue
        lines.append(f"{row['driver']:<12} {row['wall_s']:>7.1f} {row['fixed_rss_bytes'] / 2**20:>9.0f} {row['stages_peak_rss_bytes'] / 2**20:>15.0f} "
                     f"{row['stages_over_fixed_per_source_byte']:>16.3f} {row['job_peak_rss_bytes'] / 2**20:>12.0f} "
                     f"{row['job_over_fixed_per_source_byte']:>15.3f} {row['perplexity_before']:>10.4f} {row['perplexity_after']:>9.4f} {row['shards']:>6}" + cap)  # fmt: skip
    measured = rows[0]
    lines.append(f"{model} {recipe}, source weights {measured['source_weight_bytes'] / 2**20:.0f} MiB ({measured.get('source_dtype', 'as stored')}); each job in a fresh "
                 "process with 2 Ray workers outside it; fixed: the driver's RSS before any weight is read")  # fmt: skip
    return "\n".join(lines)


def run_capped(command: list[str], limit: int, name: str) -> tuple[int, int]:
    """Run `command` alone in a fresh cgroup v1 memory group capped at `limit` bytes: its exit code and the group's
    peak usage (page cache included, as the kernel counts it against the cap)."""
    group = CGROUP / name
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        wrapped = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *command]
        code = subprocess.run(wrapped, timeout=ROW_TIMEOUT_S).returncode
        return code, int((group / "memory.max_usage_in_bytes").read_text())
    finally:
        group.rmdir()


def driver_rows(args: argparse.Namespace) -> int:
    """Each driver in a fresh process; under `--cap`, alone in a memory cgroup and joined to a Ray instance outside it."""
    from krunch.sources import load_model
    from krunch.sources.hf import architecture_only

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with architecture_only(keep_files=True):
        weight_bytes = sum(path.stat().st_size for path in load_model(args.model).weight_files)  # builds a cache entry once
    limit = int(args.cap * weight_bytes) if args.cap else None
    if limit and not os.access(CGROUP, os.W_OK):
        raise SystemExit(f"--cap needs a writable cgroup v1 memory controller at {CGROUP}")
    rows = []
    with ray_outside(limit is not None) as address:
        for row in args.rows.split(","):
            with tempfile.TemporaryDirectory() as scratch:
                out = Path(scratch) / "row.json"
                command = [sys.executable, __file__, "--driver", "--row", row, "--model", args.model, "--json", str(out)]
                command += ["--bytes-ratio", str(args.bytes_ratio)] if args.bytes_ratio else []
                command += ["--recipe", args.recipe, "--calibration-tokens", str(args.calibration_tokens)]
                command += ["--layers", args.layers] if args.layers else []
                if limit is None:
                    subprocess.run(command, check=True, timeout=ROW_TIMEOUT_S)
                    rows.append(json.loads(out.read_text()))
                    continue
                code, peak = run_capped([*command, "--ray-address", address], limit, f"krunch-bench-{os.getpid()}-{row}")
                result = (json.loads(out.read_text()) if code == 0 else
                          {"driver": "streamed" if row == "streamed" else "whole model", "source_weight_bytes": weight_bytes})  # fmt: skip
                rows.append(result | {"cap_bytes": limit, "finished_under_cap": code == 0, "exit_code": code, "cgroup_peak_bytes": peak})
    print(driver_table(rows, args.model, recipe_label(args)))
    if args.json:
        write_json(args.json, {"model": args.model, "recipe": driver_recipe(args.bytes_ratio, args.recipe, args.calibration_tokens, args.layers), "cpus": os.cpu_count(), "cap_fraction": args.cap, "rows": rows})
    return 0


@contextmanager
def ray_outside(needed: bool) -> Iterator[str | None]:
    """A local Ray instance started by this process, outside any driver's cgroup; its address."""
    if not needed:
        yield None
        return
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def wait_for_nodes(count: int, timeout_s: float = 90) -> None:
    """Until `count` nodes are alive in the connected cluster (bounded)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while sum(1 for node in ray.nodes() if node["Alive"]) < count:  # the worker node joins after the head
        if time.monotonic() > deadline:
            raise SystemExit(f"fewer than {count} Ray nodes after {timeout_s} s")
        time.sleep(0.5)


def run_row_in_subprocess(mode: str, workers: int, gpus_per_task: float, source: Path | None = None, address: str | None = None) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "row.json"
        command = [sys.executable, __file__, "--row", f"{mode}:{workers}:{gpus_per_task}", "--json", str(out)]
        command += ["--source", f"hf:{source}"] if source else []
        command += ["--ray-address", address] if address else []
        subprocess.run(command, check=True, timeout=ROW_TIMEOUT_S)
        return json.loads(out.read_text())


ONE_NODE, TWO_NODES = "one node", "two nodes, source hidden from the worker"


def two_node_rows(args: argparse.Namespace) -> int:
    """The same stage on one node and on a loopback cluster of two (head 127.0.0.2 without CPUs, worker
    127.0.0.3 with 2) whose worker node cannot see the source directory (an empty tmpfs over it in its own
    mount namespace): its tasks get their tensors through Ray's object store; factors compared bit for bit."""
    import shutil

    from krunch.sources import load_model
    from krunch.sources.hf import architecture_only
    from tests.ray_cluster import can_hide_directories, local_ray_head, local_ray_worker

    if not can_hide_directories():
        raise SystemExit("--two-node needs root with private mount namespaces (unshare -m) and tmpfs")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # the head, the worker node and the row's driver must agree
    with architecture_only(keep_files=True):  # where the zoo's files are; their weights are read by the rows
        zoo_files = load_model("zoo:smollm2-135m").weight_files
    with tempfile.TemporaryDirectory(prefix="kb") as scratch:  # short: Ray's socket paths must stay under 108 bytes
        private = Path(scratch) / "private"
        shutil.copytree(zoo_files[0].parent, private / "model")  # SmolLM2's hf: directory, where only the head sees it
        source = private / "model"
        configs = [("inprocess", ONE_NODE), ("ray", ONE_NODE), ("ray", TWO_NODES)]
        runs = []
        for _ in range(args.repeat):
            for mode, cluster in configs:
                if cluster == ONE_NODE:
                    runs.append(run_row_in_subprocess(mode, 2 if mode == "ray" else 1, 0.0, source) | {"cluster": cluster})
                    continue
                with local_ray_head(Path(scratch) / "t", cpus=0, object_store_bytes=2**30) as head:
                    with local_ray_worker(head, Path(scratch) / "worker.log", cpus=2, hidden=private):
                        runs.append(run_row_in_subprocess(mode, 2, 0.0, source, head) | {"cluster": cluster})
    rows = [combine([run for run in runs if (run["mode"], run["cluster"]) == config]) for config in configs]
    reference = rows[0]["factors_sha256"][0]
    for row in rows:
        row["identical_to_inprocess"] = row["factors_sha256"] == [reference] * len(row["factors_sha256"])
        row["vs_inprocess"] = round(row["wall_s"] / rows[0]["wall_s"], 3)
    print(two_node_table(rows))
    if args.json:
        write_json(args.json, {"model": "zoo:smollm2-135m", "layers": rows[0]["layers"], "recipe": RECIPE, "cpus": os.cpu_count(), "rows": rows})
    return 0


def two_node_table(rows: list[dict]) -> str:
    header = f"{'cluster':<40} {'mode':<10} {'nodes':>5} {'wall s':>8} {'vs inproc':>9} {'weights from':<13} {'via store':>9} {'read by workers':>15} {'identical':>9}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['cluster']:<40} {row['mode']:<10} {row['nodes']:>5} {row['wall_s']:>8.2f} {row['vs_inprocess']:>9.2f} {row['weights_from']:<13} "
                     f"{row['tensors_via_object_store']:>9} {row['tensors_read_by_workers']:>15} {str(row['identical_to_inprocess']):>9}")  # fmt: skip
    lines.append(f"SmolLM2-135M, {rows[0]['layers']} decoder linears, truncated SVD rank 128 + int8; 2 workers; fastest of the repeats")
    return "\n".join(lines)


def combine(runs: list[dict]) -> dict:
    """Repeats of one row: the fastest wall time (noise only ever adds), the worst memory."""
    fastest = min(runs, key=lambda run: run["wall_s"])
    return fastest | {"wall_s_all": [run["wall_s"] for run in runs], "factors_sha256": [run["factors_sha256"] for run in runs],
                      "driver_peak_rss_bytes": max(run["driver_peak_rss_bytes"] for run in runs),
                      "driver_baseline_rss_bytes": max(run["driver_baseline_rss_bytes"] for run in runs),
                      "driver_ready_rss_bytes": min(run["driver_ready_rss_bytes"] for run in runs)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    parser.add_argument("--max-workers", type=int, default=os.cpu_count() or 1, help="Ray worker counts 1..N (default: CPUs)")
    parser.add_argument("--workers", help="Ray worker counts to run instead, comma-separated (1 is always added)")
    parser.add_argument("--gpus-per-task", type=float, default=0.0, help="add Ray rows whose tasks ask for this many GPUs")
    parser.add_argument("--gpu-workers", default="1", help="worker counts for the GPU rows, comma-separated (default 1)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per row, interleaved; the fastest counts (default 2)")
    parser.add_argument("--driver", action="store_true", help="the driver's memory over a whole job, whole model vs streamed")
    parser.add_argument("--model", default="zoo:smollm2-135m", help="with --driver: the source (default zoo:smollm2-135m)")
    parser.add_argument("--cap", type=float, help="with --driver: cap each driver's memory at this fraction of the source's weight bytes")
    parser.add_argument("--bytes-ratio", type=float, help="with --driver: budget the decoder layers at this fraction of their bytes (default: int8 everywhere)")
    parser.add_argument("--recipe", choices=("int8", "gptq", "gptq-propagated"), default="int8",
                        help="with --driver: int8 everywhere (default), or examples/smollm2-int4.yaml's gptq recipe, without or with propagation")
    parser.add_argument("--calibration-tokens", type=int, default=8192, help="with --recipe gptq*: calibration tokens (default 8192)")
    parser.add_argument("--layers", help="with --recipe gptq*: only the decoder layers this pattern matches (default: all, embedding and head int8)")
    parser.add_argument("--rows", default="whole,streamed", help="with --driver: which drivers (default whole,streamed)")
    parser.add_argument("--two-node", action="store_true", help="one node against a loopback cluster of two whose worker node cannot see the source")
    parser.add_argument("--source", help=argparse.SUPPRESS)  # internal: the row's source instead of the zoo's SmolLM2
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: MODE:WORKERS, one row in this process
    parser.add_argument("--ray-address", help=argparse.SUPPRESS)  # internal: the Ray instance a row joins (a capped driver's, the two nodes)
    args = parser.parse_args()
    if args.driver and args.row:
        recipe = driver_recipe(args.bytes_ratio, args.recipe, args.calibration_tokens, args.layers)
        args.json.write_text(json.dumps(measure_driver(args.model, args.row == "streamed", args.ray_address, recipe)))
        return 0
    if args.driver:
        return driver_rows(args)
    if args.row:
        mode, workers, gpus = args.row.split(":")
        args.json.write_text(json.dumps(measure_row(mode, int(workers), float(gpus), args.source, args.ray_address)))
        return 0
    if args.two_node:
        return two_node_rows(args)

    counts = sorted({1, *map(int, args.workers.split(","))}) if args.workers else range(1, args.max_workers + 1)
    configs = [("inprocess", 1)] + [("ray", n) for n in counts]
    if args.gpus_per_task > 0:
        configs += [("ray-gpu", int(n)) for n in args.gpu_workers.split(",")]
    runs = [run_row_in_subprocess(mode, workers, args.gpus_per_task) for _ in range(args.repeat) for mode, workers in configs]  # interleaved
    rows = [combine([run for run in runs if (run["mode"], run["workers"]) == config]) for config in configs]
    one_worker = next(row["wall_s"] for row in rows if row["mode"] == "ray" and row["workers"] == 1)
    inprocess = rows[0]
    source_weight_bytes = inprocess["source_weight_bytes"]
    for row in rows:
        row["speedup"] = round(one_worker / row["wall_s"], 3)
        row["efficiency"] = round(row["speedup"] / row["workers"], 3)
        row["vs_inprocess"] = round(row["wall_s"] / inprocess["wall_s"], 3)
        row["peak_over_baseline_per_source_byte"] = round((row["driver_peak_rss_bytes"] - row["driver_baseline_rss_bytes"]) / source_weight_bytes, 3)
        row["stage_added_per_source_byte"] = round((row["driver_peak_rss_bytes"] - row["driver_ready_rss_bytes"]) / source_weight_bytes, 3)
        row["identical_to_inprocess"] = row["factors_sha256"] == [inprocess["factors_sha256"][0]] * len(row["factors_sha256"])
        row["max_rel_error_diff_vs_inprocess"] = max(abs(a - b) for a, b in zip(row["rel_errors"], inprocess["rel_errors"], strict=True))

    result = {"model": "zoo:smollm2-135m", "layers": inprocess["layers"], "recipe": RECIPE, "cpus": os.cpu_count(),
              "gpus_per_task": args.gpus_per_task, "source_weight_bytes": source_weight_bytes, "rows": rows}  # fmt: skip
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
    return 0


def format_table(result: dict) -> str:
    header = f"{'mode':<10} {'workers':>7} {'device':>6} {'wall s':>8} {'task s':>8} {'speedup':>8} {'effic.':>7} {'vs inproc':>9} {'peak RSS MiB':>12} {'(peak-base)/src':>15} {'stage/src':>9} {'identical':>9} {'|d rel err|':>11}"
    lines = [header, "-" * len(header)]
    for row in result["rows"]:
        lines.append(f"{row['mode']:<10} {row['workers']:>7} {row['device']:>6} {row['wall_s']:>8.2f} {row['task_s']:>8.2f} {row['speedup']:>8.2f} {row['efficiency']:>7.2f} "
                     f"{row['vs_inprocess']:>9.2f} {row['driver_peak_rss_bytes'] / 2**20:>12.0f} "
                     f"{row['peak_over_baseline_per_source_byte']:>15.2f} {row['stage_added_per_source_byte']:>9.2f} "
                     f"{str(row['identical_to_inprocess']):>9} {row['max_rel_error_diff_vs_inprocess']:>11.1e}")  # fmt: skip
    ray_rows = [row for row in result["rows"] if row["mode"].startswith("ray")]
    lines.append(f"each run in a fresh process, fastest of {len(result['rows'][0]['wall_s_all'])} per row; source weights {result['source_weight_bytes'] / 2**20:.0f} MiB fp32; "
                 f"driver baseline RSS before loading the model (the fixed overhead) "
                 f"{max(row['driver_baseline_rss_bytes'] for row in result['rows']) / 2**20:.0f} MiB at most; "
                 f"Ray start-up {max(row['ray_start_s'] for row in ray_rows):.1f} s at most (not in wall s); "
                 "task s: sum of the layers' own compute time; stage/src: what the decomposition stage adds to the "
                 "driver's RSS once the model is loaded and resident, per source byte; |d rel err|: largest difference of a layer's "
                 "relative reconstruction error from in-process")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
