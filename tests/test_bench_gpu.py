"""bench/gpu.py's CPU smoke mode (``--tiny``): the GPU benchmark's code path, end to end, on a tiny Llama.

The GPU run happens only where a GPU is lent; this keeps the script from rotting in between: every
configuration builds and trains through the same functions (random weights loaded and quantized through
transformers' bitsandbytes path, plain TRL, kubetune's load_model/sft_config_kwargs/pack/data_collator),
and the JSON it writes has every field the GPU report is read from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.trainer

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "gpu.py"
DATA = ROOT / "bench" / "data" / "guanaco_like.npz"

TOP_FIELDS = {"bench", "tiny", "machine", "model", "data", "settings", "configs", "ratios", "elapsed_seconds"}
MEASURED_FIELDS = {
    "name",
    "description",
    "status",
    "setup_seconds",
    "config_seconds",
    "attention",
    "notes",
    "dataset_rows",
    "warmup_steps",
    "steps_measured",
    "seconds_measured",
    "step_seconds_mean",
    "real_tokens",
    "padded_tokens",
    "loss_tokens",
    "trainer_tokens_seen",
    "tokens_agree",
    "largest_batch_tokens",
    "tokens_per_second",
    "padded_tokens_per_second",
    "padding_efficiency",
    "mfu",
    "losses",
    "optimizer_state_bytes",
    "paged_optimizer_bytes",
    "allocated_before_bytes",
    "static_allocated_bytes",
    "max_memory_allocated",
    "max_memory_reserved",
    "device_used_bytes",
    "measured_peak_bytes",
    "estimate",
    "estimate_allocated_bytes",
    "estimate_total_bytes",
    "estimate_error",
    "estimate_step_seconds",
    "estimate_step_error",
}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench-gpu") / "gpu.json"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--steps", "1", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "config" in proc.stdout and "real tok/s" in proc.stdout  # the table
    return dict(json.loads(out.read_text()))


def test_every_configuration_reports_every_field(report: dict[str, Any]) -> None:
    assert set(report) >= TOP_FIELDS
    assert report["tiny"] is True
    by_name = {c["name"]: c for c in report["configs"]}
    assert list(by_name) == ["trl-padded", "kubetune-bfd", "kubetune-padded", "kubetune-bfd-liger"]
    for name in ("trl-padded", "kubetune-bfd", "kubetune-padded"):
        c = by_name[name]
        assert c["status"] == "ok", (name, c.get("error"), c.get("traceback"))
        missing = MEASURED_FIELDS - set(c)
        assert not missing, (name, sorted(missing))
        assert c["steps_measured"] == 1 and c["warmup_steps"] == 1
        assert c["real_tokens"] > 0 and c["tokens_per_second"] > 0
        assert 0 < c["padding_efficiency"] <= 1
        # The batches the collator built are the ones the trainer stepped on.
        assert c["tokens_agree"], (name, c["real_tokens"], c["trainer_tokens_seen"])
        # The planner estimated the same spec (no measured GPU peak on the CPU).
        assert c["estimate_allocated_bytes"] > 0 and "components" in c["estimate"]
        assert c["max_memory_allocated"] is None and c["estimate_error"] is None
    # No GPU here: Liger is skipped with the reason, not failed.
    liger = by_name["kubetune-bfd-liger"]
    assert liger["status"] == "skipped" and liger["reason"]
    assert "kubetune-bfd / trl-padded tokens/s" in report["ratios"]


def test_kubetune_bfd_goes_through_kubetunes_packing(report: dict[str, Any]) -> None:
    by_name = {c["name"]: c for c in report["configs"]}
    bfd, padded = by_name["kubetune-bfd"], by_name["kubetune-padded"]
    assert bfd["attention"].startswith("packing bfd")  # packing.attention_plan, recorded by load_model
    assert bfd["dataset_rows"] < padded["dataset_rows"]  # rows packed into fewer bins
    assert padded["attention"].startswith("padded rows")


def test_the_carried_data_is_the_documented_distribution() -> None:
    sys.path.insert(0, str(ROOT / "hack"))
    try:
        import make_bench_data
    finally:
        sys.path.remove(str(ROOT / "hack"))
    lengths, tokens = make_bench_data.generate()
    with np.load(DATA) as data:
        assert np.array_equal(data["lengths"], lengths)  # regenerate with hack/make_bench_data.py
        assert np.array_equal(data["tokens"], tokens)
    assert 250 < np.median(lengths) < 350 and lengths.max() <= 4096
    assert tokens.max() < 128256 and not (tokens == 128004).any()  # Llama 3 ids, never the pad id
    ends = np.cumsum(lengths.astype(np.int64))
    assert (tokens[ends - lengths] == 128000).all() and (tokens[ends - 1] == 128001).all()


def test_the_device_command_fits_the_device_tool() -> None:
    out = subprocess.run(
        [sys.executable, str(BENCH), "--device-command"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert len(out) <= 2000 and "\n" not in out  # the device tool's limit, one line
    # The wheels hack/gpu_carry.sh downloads, installed where dill treats them as installed packages.
    assert "--target /tmp/site-packages .whl/*.whl" in out and "python3 bench/gpu.py" in out
    lines = BENCH.read_text().split("\n")
    first = next(i for i, line in enumerate(lines) if line.strip().startswith("set -o pipefail"))
    shown = lines[first : lines.index("", first)]
    assert " ".join(line.strip() for line in shown) == out  # the docstring shows the same command
