"""The streamed driver (`spec.resources.stream`) on the real SmolLM2: a model whose weights stay in their files
computes what the loaded model computes, a streamed job writes what the whole-model job writes, what it does not
do yet is refused by name, and under a memory cap that kills the whole-model job it finishes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import krunch
from krunch.artifact import MANIFEST, weight_files
from krunch.execution.executors import InProcessExecutor, RayExecutor
from krunch.execution.tasks import torch_threads
from krunch.run import run_compression
from krunch.sources import load_model
from krunch.sources.hf import architecture_only
from krunch.spec import SpecError, parse_job
from krunch.streaming.store import TensorStore
from krunch.runtime.kernels import transient_dtype
from krunch.streaming.units import block_bytes, compute_dtype_for, stream, subtree_bytes
from krunch.streaming.writer import ShardWriter

pytestmark = pytest.mark.slow
INT8 = {"rules": [{"match": "*", "method": "none"}], "quantize": {"bits": 8, "symmetric": True}}


def job(stream_weights: bool, recipe: dict | None = None, source: str = "zoo:smollm2-135m", tokens: int = 1024):
    return parse_job({"apiVersion": "krunch.dev/v1alpha1", "kind": "CompressionJob", "metadata": {"name": "streamed"},
                      "spec": {"model": {"source": source}, "recipe": recipe or INT8,
                               "evaluation": {"task": "perplexity", "tokens": tokens},
                               "resources": {"stream": stream_weights}}})  # fmt: skip


def streamed_smollm2():
    with architecture_only(keep_files=True):
        model = load_model("zoo:smollm2-135m")
    return model, stream(model.module, TensorStore(model.weight_files))


def test_a_streamed_model_computes_what_the_loaded_one_does(smollm2):
    model, units = streamed_smollm2()
    assert units["model.embed_tokens"] == "rows" and units["lm_head"] == "rows"  # each bigger than a block
    assert units["model.layers.0.mlp.down_proj"] == "whole" and units["model.layers.29.self_attn"] == "whole"
    assert all(subtree_bytes(model.module.get_submodule(u)) <= block_bytes(model.module) // 4 for u, how in units.items() if how == "whole")
    ids = torch.tensor([smollm2.tokenizer("The capital of France is Paris, and the capital of Italy is")["input_ids"]])
    with torch.inference_mode():
        assert torch.equal(model.module(input_ids=ids).logits, smollm2.module(input_ids=ids).logits)
    assert all(t.is_meta for t in model.module.state_dict(keep_vars=True).values())  # nothing stayed behind


def test_a_bf16_model_streams_in_the_dtype_this_cpu_multiplies_fastest(tmp_path, smollm2):
    """A bf16 checkpoint computes in float32 where oneDNN has no native bf16 (an AVX2 CPU: 4.6x faster), else in
    bf16: either way, the logits the loaded model gives in that dtype, bit for bit in float32; in bf16 as close
    to the float32 logits of the same weights as the loaded bf16 model's are (bf16 forwards that differ in GEMM
    shapes, such as the head's vocabulary runs, round differently: about 1% apart after 30 layers)."""
    source = tmp_path / "smollm2-bf16"
    smollm2.module.save_pretrained(source, state_dict={k: v.to(torch.bfloat16) for k, v in smollm2.module.state_dict().items()})
    smollm2.tokenizer.save_pretrained(source)
    with architecture_only(keep_files=True):
        model = load_model(f"hf:{source}")
    dtype = compute_dtype_for(model.module)
    assert dtype is (torch.float32 if transient_dtype() is torch.float32 else None)
    stream(model.module, TensorStore(model.weight_files))
    whole = load_model(f"hf:{source}").module
    ids = torch.tensor([smollm2.tokenizer("def fibonacci(n): return n if n < 2 else")["input_ids"]])
    with torch.inference_mode():
        streamed = model.module(input_ids=ids).logits
        assert streamed.dtype == (dtype or torch.bfloat16)
        reference = whole.to(dtype or torch.bfloat16)(input_ids=ids).logits
    if dtype is torch.float32:
        assert torch.equal(streamed, reference)
    else:
        with torch.inference_mode():
            exact = whole.float()(input_ids=ids).logits  # the same weights, multiplied in float32
        assert relative(streamed, exact) <= 1.5 * relative(reference, exact)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_a_streamed_job_writes_what_the_whole_model_job_writes(tmp_path, smollm2):
    whole = run_compression(job(False), tmp_path / "whole", executor=InProcessExecutor())
    streamed = run_compression(job(True), tmp_path / "streamed", executor=InProcessExecutor())
    files = weight_files(tmp_path / "streamed")
    assert len(files) > 1 and streamed.report["execution"]["shards"] == len(files)  # written shard by shard
    tensors = {k: v for path in files for k, v in load_file(str(path)).items()}
    expected = load_file(str(tmp_path / "whole" / "model.safetensors"))
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    manifests = [json.loads((tmp_path / d / MANIFEST).read_text())["layers"] for d in ("whole", "streamed")]
    assert manifests[0] == manifests[1]
    for key in ("params_before", "params_after", "bytes_before", "bytes_after", "source_dtype", "compression_ratio"):
        assert streamed.report[key] == whole.report[key], key
    assert [r["kernels"] for r in streamed.report["layers"]] == [r["kernels"] for r in whole.report["layers"]]
    before, after = streamed.report["metrics_before"], streamed.report["metrics_after"]
    assert before["perplexity"] == pytest.approx(whole.report["metrics_before"]["perplexity"], rel=1e-4)
    assert after["perplexity"] == pytest.approx(whole.report["metrics_after"]["perplexity"], rel=5e-3)
    assert "decode_tokens_per_s" not in after and "not measured" in streamed.report["execution"]["inference_figures"]
    reloaded = krunch.load(tmp_path / "streamed")  # an ordinary compressed model for a consumer
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.inference_mode():
        assert torch.equal(reloaded(input_ids=ids).logits, krunch.load(tmp_path / "whole")(input_ids=ids).logits)


def test_a_streamed_bytes_budget_chooses_and_writes_what_the_whole_model_job_does(tmp_path, smollm2):
    """target.bytesRatio streamed: each layer's candidate table is a task reading the layer from its file; the
    choices, budget and written tensors are the whole-model job's."""
    recipe = {"rules": [{"match": "model.layers.2.mlp.*", "method": "svd"}], "target": {"bytesRatio": 0.3}}
    whole = run_compression(job(False, recipe), tmp_path / "whole", executor=InProcessExecutor())
    streamed = run_compression(job(True, recipe), tmp_path / "streamed", executor=InProcessExecutor())
    budgets = [json.loads((tmp_path / d / "budget.json").read_text()) for d in ("whole", "streamed")]
    assert budgets[0] == budgets[1] and len(budgets[0]["choices"]) == 3
    assert streamed.report["target"] == whole.report["target"]
    tensors = {k: v for path in weight_files(tmp_path / "streamed") for k, v in load_file(str(path)).items()}
    expected = load_file(str(tmp_path / "whole" / "model.safetensors"))
    assert tensors.keys() == expected.keys() and all(torch.equal(tensors[k], expected[k]) for k in expected)


def calibrated(propagate: bool) -> dict:
    """gptq on the asymmetric grid fitted to the inputs, on the first two blocks (every statistic a block has)."""
    quantize = {"bits": 4, "groupSize": 64, "rounding": "gptq", "grid": "fitted", "symmetric": False}
    return {"rules": [{"match": "model.layers.[01].*", "method": "none", "quantize": quantize}],
            "calibration": {"tokens": 1024, "propagate": propagate}}  # fmt: skip


def written_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for path in weight_files(directory) for k, v in load_file(str(path)).items()}


@pytest.mark.parametrize("propagate", [True, False])
def test_a_streamed_calibrated_job_writes_what_the_whole_model_job_writes(tmp_path, smollm2, propagate):
    """Block by block, the statistics in each block's task: the whole-model job's tensors bit for bit, with error
    propagation (each stage refitted for the compressed model's inputs) and without (the original's Grams)."""
    whole = run_compression(job(False, calibrated(propagate)), tmp_path / "whole", executor=InProcessExecutor())
    streamed = run_compression(job(True, calibrated(propagate)), tmp_path / "streamed", executor=InProcessExecutor())
    tensors, expected = written_tensors(tmp_path / "streamed"), written_tensors(tmp_path / "whole")
    assert tensors.keys() == expected.keys() and all(torch.equal(tensors[k], expected[k]) for k in expected)
    assert streamed.report["execution"]["calibration"] == ("propagated" if propagate else "independent")
    assert streamed.report["execution"]["calibrated_blocks"] == 2  # none ran after the last block with layers
    assert [r["rel_error"] for r in streamed.report["layers"]] == [r["rel_error"] for r in whole.report["layers"]]


def test_streamed_calibrated_blocks_on_ray_equal_the_in_process_run(tmp_path, smollm2, ray_cluster):
    """Each block one Ray task holding the CPUs of all the workers, its hidden outputs handed to the next block's
    task by reference: the in-process run at that thread count, bit for bit."""
    remote = run_compression(job(True, calibrated(True)), tmp_path / "ray", executor=RayExecutor(address=ray_cluster))
    execution = remote.report["execution"]
    assert execution["mode"] == "ray" and execution["weights_from"] == "source files"
    with torch_threads(execution["block_cpus"]):
        run_compression(job(True, calibrated(True)), tmp_path / "local", executor=InProcessExecutor(execution["block_cpus"]))
    tensors, expected = written_tensors(tmp_path / "ray"), written_tensors(tmp_path / "local")
    assert tensors.keys() == expected.keys() and all(torch.equal(tensors[k], expected[k]) for k in expected)


@pytest.mark.parametrize(("recipe", "source", "field"), [
    ({**INT8, "heal": {"steps": 2}}, "zoo:smollm2-135m", "spec.recipe.heal"),
    ({"rules": [{"match": "model.layers.*.mlp.*", "method": "svd"}], "target": {"paramRatio": 0.8}}, "zoo:smollm2-135m",
     "spec.recipe.target"),
    (INT8, "zoo:mobilenet-v2", "spec.resources.stream"),
])  # fmt: skip
def test_what_a_streamed_driver_does_not_do_is_refused_by_name(tmp_path, recipe, source, field):
    with pytest.raises(SpecError) as caught:
        run_compression(job(True, recipe, source), tmp_path / "out", executor=InProcessExecutor())
    assert caught.value.subject == field
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_shard_writer_cuts_shards_and_indexes_them(tmp_path):
    writer = ShardWriter(tmp_path, shard_bytes=1000)
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}  # 400 bytes each: two per shard
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    with pytest.raises(ValueError, match="t0 written twice"):
        writer.add("t0", tensors["t0"])
    files = writer.close()
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 2000 and len(index["weight_map"]) == 5
    read = {k: v for f in files for k, v in load_file(str(f)).items()}
    assert all(torch.equal(read[k], v) for k, v in tensors.items())
    big = ShardWriter(tmp_path / "big", shard_bytes=1000)
    big.add("table", torch.zeros(300))  # 1200 bytes: a shard of its own, written at once rather than held
    assert not big.pending and len(big.parts) == 1


CGROUP = Path("/sys/fs/cgroup/memory")
DRIVER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from krunch.execution.executors import RayExecutor
    from krunch.run import run_compression
    from krunch.spec import parse_job
    import json
    job = parse_job(json.loads(sys.argv[1]), "test")
    run_compression(job, Path(sys.argv[2]), executor=RayExecutor(address=sys.argv[3]))
""")
FIXED = textwrap.dedent("""
    import psutil, ray, sys
    from krunch.sources import load_model
    from krunch.sources.hf import architecture_only
    import krunch.run, krunch.streaming.job  # what the driver imports
    with architecture_only(keep_files=True):
        load_model("zoo:smollm2-135m")
    ray.init(address=sys.argv[1])
    print(psutil.Process().memory_info().rss)
""")


def _in_cgroup(name: str, limit: int, command: list[str], env: dict[str, str]) -> tuple[int, int]:
    """Run `command` alone in a fresh memory cgroup capped at `limit` bytes; its exit code and peak usage."""
    group = CGROUP / name
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        wrapped = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *command]
        code = subprocess.run(wrapped, env=env, capture_output=True, timeout=600).returncode
        return code, int((group / "memory.max_usage_in_bytes").read_text())
    finally:
        group.rmdir()


@pytest.mark.skipif(not os.access(CGROUP, os.W_OK), reason="no writable cgroup v1 memory controller")
def test_a_streamed_driver_finishes_under_a_cap_that_kills_the_whole_model_job(tmp_path, ray_cluster, smollm2):
    """The driver alone in the cgroup (the Ray workers outside it), capped at its fixed overhead plus half the
    source's fp32 weight bytes: the whole-model job is killed loading the source, the streamed one finishes, and
    so does a calibrated one (its blocks' statistics in Ray tasks)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    fixed = int(subprocess.run([sys.executable, "-c", FIXED, ray_cluster], env=env, capture_output=True, text=True,
                               timeout=300, check=True).stdout.split()[-1])  # fmt: skip
    weights = sum(path.stat().st_size for path in smollm2.weight_files)
    limit = fixed + weights // 2
    results = {}
    for row, document in [("whole", job(False)), ("streamed", job(True)), ("calibrated", job(True, calibrated(True)))]:
        text = json.dumps(document.model_dump(by_alias=True, mode="json", exclude_none=True))
        command = [sys.executable, "-c", DRIVER, text, str(tmp_path / row), ray_cluster]
        results[row] = _in_cgroup(f"krunch-test-{os.getpid()}-{row}", limit, command, env)
    assert results["whole"][0] != 0  # killed: the source alone does not fit
    for row in ("streamed", "calibrated"):  # data-free, and gptq with propagation in block tasks outside the cgroup
        code, peak = results[row]
        assert code == 0 and peak <= limit, row
    assert krunch.load(tmp_path / "streamed").model.layers[0].mlp.down_proj.weight_q.config.bits == 8
    report = json.loads((tmp_path / "calibrated" / "report.json").read_text())
    assert report["execution"]["calibration"] == "propagated" and report["execution"]["mode"] == "ray"


@pytest.mark.parametrize("quantize", [{"bits": 8, "symmetric": True}, {"bits": 4, "groupSize": 32, "symmetric": False}])
def test_a_quantized_head_bigger_than_a_block_runs_in_row_runs_on_its_own_kernel(tmp_path, smollm2, quantize):
    """SmolLM2's 49152-row tied table as a quantized LM head and embedding, streamed 4096 rows at a time: the same
    logits and rows as the whole layers, on the same kernel."""
    from safetensors.torch import save_file

    from krunch.runtime.quant import QuantFormat
    from krunch.runtime.quantized import QuantizedEmbedding, QuantizedLinear
    from krunch.spec import QuantizeConfig
    from krunch.streaming.units import RowChunkedQuantized

    fmt = QuantFormat.of(QuantizeConfig.model_validate(quantize))
    table = smollm2.module.get_input_embeddings()
    head = QuantizedLinear.from_dense(_as_linear(table.weight), fmt)
    embedding = QuantizedEmbedding.from_dense(table, fmt)
    path = tmp_path / "layers.safetensors"
    state = {f"head.{k}": v for k, v in head.state_dict().items()} | {f"embed.{k}": v for k, v in embedding.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    store = TensorStore([path])
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    ids = torch.tensor([[0, 4095, 4096, 49151, 17, 30000]])
    for layer, prefix, call in ((head, "head", x), (embedding, "embed", ids)):
        keys = {name: f"{prefix}.{name}" for name in layer.state_dict()}
        chunked = RowChunkedQuantized(layer, keys, store, rows=4096)
        assert chunked.rows == 4096 and len(list(chunked.spans())) == 12
        with torch.inference_mode():
            assert torch.equal(chunked(call), layer(call))
        if prefix == "head":
            assert chunked.chunk(0, 4096).kernels() == layer.kernels()


def _as_linear(weight: torch.Tensor) -> torch.nn.Linear:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False).requires_grad_(False)
    linear.weight.copy_(weight)
    return linear


def test_grams_of_a_streamed_lm_head_stop_the_pass_before_its_logits(smollm2):
    """A streamed job's calibrated layers outside the blocks get their Grams from forwards that end once every
    named layer has had its input: the same Grams, and the LM head never multiplies the whole vocabulary."""
    from krunch.calibration.grams import collect_grams
    from krunch.spec import Calibration

    names = ["model.layers.1.self_attn.q_proj", "lm_head"]
    model, _ = streamed_smollm2()
    head = model.module.lm_head
    calls = []
    handle = head.register_forward_hook(lambda *_: calls.append(1))
    try:
        stopped = collect_grams(model, names, Calibration(tokens=1024), stop_when_seen=True)
    finally:
        handle.remove()
    full = collect_grams(smollm2, names, Calibration(tokens=1024))
    assert calls == [] and stopped.keys() == full.keys()
    assert all(torch.equal(stopped[name], full[name]) for name in names)
