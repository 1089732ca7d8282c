import subprocess
import sys
import time

import torch
from torch import nn

from torchslim.evaluate.latency import measure_latency, paired_latency
from torchslim.evaluate.metrics import accuracy, agreement, fp32_safetensors_bytes


def test_accuracy_and_agreement_on_a_fixed_model():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    loader = [(x, torch.tensor([0, 1, 1, 1]))]
    assert accuracy(model, loader) == 0.75
    flipped = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        flipped.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert agreement(model, flipped, loader) == 0.0


def test_fp32_bytes_are_the_real_safetensors_size():
    model = nn.Linear(100, 10)
    size = fp32_safetensors_bytes(model)
    assert 4 * 1010 < size < 4 * 1010 + 256


def test_latency_reports_medians_with_batch_and_threads():
    lat = measure_latency(nn.Linear(32, 32), torch.zeros(4, 32), threads=1, warmup=2, repeats=9)
    assert lat.batch == 4 and lat.threads == 1 and lat.repeats == 9
    assert 0 < lat.p10_ms <= lat.median_ms <= lat.p90_ms


def test_paired_latency_alternates_blocks_and_ranks_the_faster_side():
    calls = []

    def side(name: str, seconds: float):
        def run(_x):
            calls.append(name)
            time.sleep(seconds)

        return run

    fast_ms, slow_ms = paired_latency(side("fast", 0.002), side("slow", 0.006), None, rounds=4, block_s=0.02)
    assert 1.5 < fast_ms < 10 and 2 < slow_ms / fast_ms < 4
    # timed in blocks, not call by call: after the warm-up (2 runs, then 3 calls each in turn) a
    # round is a run of calls of one side then of the other, the order swapped every round
    runs = [name for i, name in enumerate(calls) if i == 0 or calls[i - 1] != name]
    assert runs[8:] == ["fast", "slow", "fast", "slow", "fast"]
    assert len(calls) >= 8 + 4 * 2 * 5


def test_import_is_lean():
    code = (
        "import sys, torchslim; "
        "print(','.join(m for m in ('onnx','onnxruntime','ray','optuna','matplotlib','transformers','sklearn', "
        "'flwr','torch.distributed.run','torch.distributed.elastic') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
