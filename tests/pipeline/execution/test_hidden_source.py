"""Workers on any node: a two-node Ray cluster on loopback (head 127.0.0.2, worker 127.0.0.3) whose worker
node cannot see the source directory (an empty tmpfs over it in the worker's own mount namespace). The
layer tasks find that out before they start, get their tensors through Ray's object store instead of the
file, say so in the execution record, and give the factors the single-node run gives, bit for bit.

The job runs in a subprocess connected to that cluster, so this test process keeps its own Ray connection.
A tiny random-weight Llama (SmolLM2's tokenizer) keeps it short: this checks where tensors come from."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import krunch
from krunch.execution.executors import InProcessExecutor
from krunch.sources import load_model
from tests.ray_cluster import WORKER_IP, can_hide_directories, local_ray_head, local_ray_worker

pytestmark = pytest.mark.slow
RECIPE = {"rules": [{"match": "model.layers.*.mlp.*", "method": "svd", "rank": {"fixed": 8}}, {"match": "*", "method": "none"}],
          "quantize": {"bits": 8}}  # fmt: skip
JOB = """
import json, sys, time
import ray
import krunch
from krunch.execution.executors import RayExecutor
from krunch.sources import load_model

address, source, out, recipe = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
ray.init(address=address, logging_level="WARNING")
deadline = time.monotonic() + 90
while sum(1 for node in ray.nodes() if node["Alive"]) < 2:  # the worker node joins after the head
    if time.monotonic() > deadline:
        raise SystemExit("the worker node did not join within 90 s")
    time.sleep(0.5)
result = krunch.compress(load_model("hf:" + source), recipe, executor=RayExecutor(workers=2), progress=False)
krunch.save(result, out)
print("EXECUTION " + json.dumps(result.execution))
"""


def tiny_llama_directory(directory, tokenizer) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def test_a_worker_node_that_cannot_see_the_source_gets_its_tensors_through_the_object_store(tmp_path, tmp_path_factory, monkeypatch, smollm2):
    if not can_hide_directories():
        pytest.skip("needs root with private mount namespaces (unshare -m) and tmpfs")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the head, the worker node and the job's driver must agree
    private = tmp_path / "private"
    source = private / "model"
    tiny_llama_directory(source, smollm2.tokenizer)
    out = tmp_path / "out"
    ray_dir = tmp_path_factory.mktemp("ray2")  # short: Ray's socket paths must stay under 108 bytes
    with local_ray_head(ray_dir / "t", cpus=0, object_store_bytes=300_000_000) as head:
        with local_ray_worker(head, ray_dir / "worker.log", cpus=2, hidden=private):
            done = subprocess.run([sys.executable, "-c", JOB, head, str(source), str(out), json.dumps(RECIPE)],
                                  capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    execution = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("EXECUTION "))[10:])
    assert execution["nodes"] == 2
    assert execution["weights_from"] == "object store"
    assert execution["source_seen_by"][WORKER_IP] is False and execution["tensors_read_by_workers"] == 0
    assert execution["tensors_via_object_store"] > 0

    single = krunch.compress(load_model(f"hf:{source}"), RECIPE, executor=InProcessExecutor(), progress=False)
    expected, got = single.module.state_dict(), krunch.load(out).state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
