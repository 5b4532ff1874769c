"""bench/gpu.py's code on CPU: the tiny model, the HF engine's two loops, the sync legs with a
bit check, and the two-process broadcast over gloo (the GPU figures come from a GPU machine,
docs/performance.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_gpu_runs_on_cpu_and_reports_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "gpu.py"),
        "--size",
        "tiny",
        "--device",
        "cpu",
        "--prompts",
        "2",
        "--generate-prompts",
        "2",
        "--rounds",
        "1",
        "--max-new-tokens",
        "6",
        "--nccl-backend",
        "gloo",
        "--copy-mb",
        "16",
        "--workdir",
        str(tmp_path),
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    engines = [(g["engine"], g["prompts"]) for g in report["generation"]]
    assert engines == [("hf lean", 2), ("hf generate", 2)]
    for g in report["generation"]:
        # random weights never end a completion early: 2 prompts x G=8 x 6 tokens
        assert g["tokens_per_call"] == 2 * 8 * 6 and g["tokens_per_s"] > 0
    for way in ("staged", "views"):
        assert report["sync"][way]["bucket_gb_per_s"] > 0 and report["sync"][way]["load_gb_per_s"] > 0
    assert report["broadcast"]["received_right"] is True and report["broadcast"]["gb_per_s"] > 0
    assert "vLLM is not installed" in proc.stdout
    assert "sync legs" in proc.stdout
    assert set(report["engine_load_gb_per_s"]) == {"the engine's", "direct from pageable"}  # "pages pinned in place": CUDA only
    for name in ("hf lean", "hf generate"):
        a = report["logprob_agreement"][name]
        # float32 on CPU: the decoding loop and the full forward agree to rounding
        assert a["tokens"] == 2 * 8 * 6 and a["max_abs"] < 1e-3


def test_bench_gpu_without_a_gpu_says_so():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "no CUDA device here" in proc.stderr and "Traceback" not in proc.stderr
