"""Run start-up overhead against plain TRL, from one run on this machine.

The same tiny QLoRA job (jobs/tiny-local.yaml's model, data and hyper-parameters, a few steps, evaluated
and saved at the last, no samples) through a plain TRL script as a user writes it (BitsAndBytesConfig +
LoraConfig + SFTTrainer: `plain_trl` below), through `kubetune run --local` on fresh caches, again on
warm ones, and through the trainer process alone. Each output line is stamped as it arrives; the table
gives the wall time of each phase, to the first optimizer step (its log line: both log step 1) and to
the exit, the CPU time, and the ratios to plain TRL. Where kubetune's start-up goes:

- CLI: `kubetune` starting up to its launching the trainer (imports, spec validation, GPU count);
- data step: `kubetune prepare` (the cached tokenization) in its own process, timed alone, cold (fresh
  caches) and warm (a cache hit), and in the runs where it has a process of its own (several GPUs);
- trainer: from its launch to the first step (imports, tokenizer and data, model, SFTTrainer).

First, each in fresh processes: `import torch; torch.cuda.device_count()` (how the CLI counted GPUs
before) against kubetune.gpus.count_gpus(), `kubetune --version`, and `kubetune run --local` up to the
launch (the trainer stubbed out).

Run: `.venv/bin/python bench/startup_train.py [--steps 10] [--repeat 1] [--log DIR]`. Nothing is
downloaded. On a loaded machine the wall times move a lot between runs: use --repeat and read the CPU
times beside them.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBETUNE = Path(sys.executable).with_name("kubetune")
SPEC = ROOT / "jobs/tiny-local.yaml"


@dataclass
class Timeline:
    """The lines a process wrote (stdout and stderr), each with seconds since it was started."""

    lines: list[tuple[float, str]] = field(default_factory=list)
    exit_s: float = 0.0
    code: int = 0
    cpu_s: float = 0.0
    """User + system CPU seconds of the process and the children it waited for (load-proof, unlike wall)."""

    def first(self, pattern: str) -> float | None:
        rx = re.compile(pattern)
        return next((t for t, line in self.lines if rx.search(line)), None)

    def last(self, pattern: str) -> float | None:
        rx = re.compile(pattern)
        return next((t for t, line in reversed(self.lines) if rx.search(line)), None)

    def tail(self, n: int = 40) -> str:
        return "\n".join(line for _, line in self.lines[-n:])


def timed(cmd: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> Timeline:
    """Run ``cmd``, stamping each line of its output as it arrives."""
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1"}
    tl = Timeline()
    lock = threading.Lock()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def read(stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            t = time.perf_counter() - start
            with lock:
                tl.lines.append((t, line.rstrip("\n")))

    readers = [threading.Thread(target=read, args=(s,), daemon=True) for s in (proc.stdout, proc.stderr)]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    tl.exit_s = time.perf_counter() - start
    tl.code = proc.returncode = os.waitstatus_to_exitcode(status)
    tl.cpu_s = usage.ru_utime + usage.ru_stime
    for r in readers:
        r.join()
    tl.lines.sort(key=lambda item: item[0])
    return tl


def write_spec(folder: Path, steps: int) -> Path:
    """jobs/tiny-local.yaml with absolute paths, ``steps`` steps (evaluated and saved at the last), and no
    samples (the plain script generates none)."""
    doc = yaml.safe_load(SPEC.read_text())
    spec = doc["spec"]
    spec["model"]["path"] = str((SPEC.parent / spec["model"]["path"]).resolve())
    spec["dataset"]["files"] = [str((SPEC.parent / f).resolve()) for f in spec["dataset"]["files"]]
    spec["training"].update(maxSteps=steps, saveSteps=steps, evalSteps=steps)
    spec.pop("samples", None)
    spec["output"]["path"] = str(folder / "out")
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def fresh(cmd: Sequence[str], runs: int) -> float | None:
    """Median wall time of ``cmd`` in a fresh process (the first, cold run is dropped); None if it fails."""
    times = []
    for _ in range(runs + 1):
        start = time.perf_counter()
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            return None
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def prepare_times(spec: Path, folder: Path, runs: int) -> tuple[float | None, float | None]:
    """Median wall time of `kubetune prepare` on a fresh cache (cold) and right after (warm: a cache hit)."""
    cold: list[float] = []
    warm: list[float] = []
    for r in range(runs):
        env = {
            **os.environ,
            "KUBETUNE_PREPARED_DIR": str(folder / f"prepare-{r}"),
            "HF_DATASETS_CACHE": str(folder / f"prepare-hf-{r}"),
        }
        for times in (cold, warm):
            start = time.perf_counter()
            if subprocess.run([str(KUBETUNE), "prepare", str(spec)], env=env, capture_output=True).returncode:
                return None, None  # no such command (before slice A) or a failure
            times.append(time.perf_counter() - start)
    return statistics.median(cold), statistics.median(warm)


# ---- the plain TRL script, as a user writes it (run in its own process by `--plain-trl`) ----------------

ALPACA = (
    "Below is an instruction that describes a task{ctx}. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n"
)


def plain_trl(model_path: str, data_file: str, out: str, steps: int) -> None:
    print("plain: started", flush=True)
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    print("plain: imported", flush=True)

    def to_prompt_completion(row: dict[str, str]) -> dict[str, str]:
        inp = row.get("input") or ""
        prompt = ALPACA.format(
            ctx=", paired with an input that provides further context" if inp else "",
            instruction=row["instruction"],
            input=f"### Input:\n{inp}\n\n" if inp else "",
        )
        return {"prompt": prompt, "completion": row["output"]}

    ds = load_dataset("json", data_files=data_file, split="train")
    ds = ds.filter(lambda r: bool(r["instruction"].strip() and r["output"].strip()))
    ds = ds.map(to_prompt_completion, remove_columns=ds.column_names)
    split = ds.train_test_split(test_size=0.1, seed=42)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    print("plain: data", flush=True)

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_path, quantization_config=bnb, dtype=torch.float32, device_map={"": "cpu"}
    )
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    print("plain: model", flush=True)
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    args = SFTConfig(
        output_dir=out,
        max_steps=steps,
        learning_rate=0.003,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        max_length=128,
        optim="paged_adamw_32bit",
        lr_scheduler_type="constant",
        warmup_steps=0.03,
        max_grad_norm=1.0,
        weight_decay=0.001,
        train_sampling_strategy="group_by_length",
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": False},
        bf16=False,
        fp16=False,
        seed=42,
        logging_steps=5,
        logging_first_step=True,
        save_steps=steps,
        save_total_limit=2,
        eval_strategy="steps",
        eval_steps=steps,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=split["train"],
        eval_dataset=split["test"],
        processing_class=tokenizer,
        peft_config=lora,
    )
    print("plain: trainer", flush=True)
    trainer.train()
    trainer.save_model(f"{out}/adapter")
    tokenizer.save_pretrained(f"{out}/adapter")


# ---- the measurement ---------------------------------------------------------------------------------


def kubetune_run(spec: Path, out: Path, env: dict[str, str], *, trainer_only: bool = False) -> Timeline:
    """`kubetune run --local`, or (``trainer_only``) the trainer process alone, as the CLI starts it."""
    if trainer_only:
        cmd = [sys.executable, "-m", "kubetune.trainer", "--spec", str(spec), "--output", str(out)]
    else:
        cmd = [str(KUBETUNE), "run", str(spec), "--local", "--output", str(out)]
    tl = timed(cmd, env)
    if tl.code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({tl.code}):\n{tl.tail()}")
    return tl


def plain_run(spec: Path, out: Path, steps: int) -> Timeline:
    doc = yaml.safe_load(spec.read_text())["spec"]
    cmd = [
        sys.executable,
        __file__,
        "--plain-trl",
        doc["model"]["path"],
        doc["dataset"]["files"][0],
        str(out),
        str(steps),
    ]
    tl = timed(cmd)
    if tl.code != 0:
        raise SystemExit(f"the plain TRL script failed ({tl.code}):\n{tl.tail()}")
    return tl


def kubetune_phases(tl: Timeline) -> dict[str, float | None]:
    """Time stamps of kubetune's phases, from its log lines (None: that line was not logged)."""
    launch = tl.first(r"^kubetune: run folder: ")  # the CLI's last line before it starts a process
    data = [t for t, line in tl.lines if re.search(r"^\[kubetune\] data: (prepared|cache hit) ", line)]
    # Two data lines: the data step's process, then the trainer's (a cache hit); one: the trainer's.
    prepared = data[0] if len(data) > 1 else None
    return {
        "launch": launch,
        "prepared": prepared,
        "trainer_start": prepared or launch or 0.0,
        "trainer_data": data[-1] if data else None,
        "imported": tl.first(r"^\[kubetune\] FineTuneJob "),
        "model": tl.first(r"^\[kubetune\] LoRA "),
        "built": tl.first(r"^\[kubetune\] trainable parameters"),
        "first_step": tl.first(r"^\[kubetune\] step 1/"),
        "last_step": tl.last(r"^\[kubetune\] step \d+/\d+ \(100%\) loss"),
        "end": tl.exit_s,
        "cpu": tl.cpu_s,
    }


def plain_phases(tl: Timeline) -> dict[str, float | None]:
    return {
        "trainer_start": 0.0,
        "imported": tl.first(r"^plain: data"),  # imports, then the data: as kubetune's "imported" line
        "model": tl.first(r"^plain: model"),
        "built": tl.first(r"^plain: trainer"),
        "first_step": tl.first(r"^\{'loss'"),
        "last_step": tl.first(r"'train_runtime'"),
        "end": tl.exit_s,
        "cpu": tl.cpu_s,
    }


def span(p: dict[str, float | None], a: str, b: str) -> float | None:
    x, y = p.get(a), p.get(b)
    return None if x is None or y is None else y - x


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f} s" if x < 1 else f"{x:.2f} s"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run (default 10)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each, medians reported (default 1)")
    parser.add_argument("--only", choices=["plain", "kubetune"], help="run one side only")
    parser.add_argument("--log", type=Path, help="write each run's time-stamped output to this folder")
    parser.add_argument("--runs", type=int, default=5, help="fresh interpreters per import timing")
    parser.add_argument(
        "--plain-trl", nargs=4, metavar=("MODEL", "DATA", "OUT", "STEPS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.plain_trl:
        model, data, out, steps = args.plain_trl
        plain_trl(model, data, out, int(steps))
        return

    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )
    py = [sys.executable, "-c"]
    bare = fresh([*py, "pass"], args.runs)
    count_torch = fresh([*py, "import torch; torch.cuda.device_count()"], args.runs)
    count_ours = fresh([*py, "from kubetune.gpus import count_gpus; count_gpus()"], args.runs)
    version = fresh([str(KUBETUNE), "--version"], args.runs)
    # `kubetune run --local` up to the trainer's launch: imports, spec validation, GPU count.
    stub = (
        "import sys; from kubetune import cli; cli.run_forwarding_signals = lambda argv, env: 0; "
        "cli.main(sys.argv[1:])"
    )
    with tempfile.TemporaryDirectory() as tmp:
        cli_run = fresh([*py, stub, "run", str(SPEC), "--local", "-o", tmp], args.runs)
    print(
        f"fresh process, median of {args.runs}: python -c pass {fmt(bare)}; "
        f"kubetune --version {fmt(version)}; GPU count: torch.cuda.device_count() {fmt(count_torch)}, "
        f"kubetune.gpus.count_gpus() {fmt(count_ours)}"
        + (f" ({count_torch / count_ours:.0f}x less)" if count_torch and count_ours else "")
        + f"; kubetune run --local up to the launch (trainer stubbed) {fmt(cli_run)}"
    )

    kinds = {
        "plain": "plain TRL",
        "cold": "kubetune",  # `kubetune run --local`, fresh caches
        "warm": "warm",  # again, on the caches the cold run filled
        "trainer": "trainer",  # the trainer process alone (warm): what the CLI and the data step add
    }
    rows: dict[str, list[dict[str, float | None]]] = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        folder = Path(tmp)
        spec = write_spec(folder, args.steps)
        cold, warm = prepare_times(spec, folder, args.runs)
        print(
            f"kubetune prepare (its own process), median of {args.runs}: cold {fmt(cold)}, warm {fmt(warm)}"
        )
        for i in range(args.repeat):
            # Private caches (datasets', and the prepared data's): each cold run starts from nothing.
            env = {
                **os.environ,
                "HF_DATASETS_CACHE": str(folder / f"hf-{i}"),
                "KUBETUNE_PREPARED_DIR": str(folder / f"prepared-{i}"),
            }
            # Alternate the order (the cold run first of its caches' users): a machine whose load changes
            # during the bench then favours no side.
            order = (
                ["plain", "cold", "warm", "trainer"] if i % 2 == 0 else ["cold", "trainer", "warm", "plain"]
            )
            for kind in order:
                if args.only and (kind == "plain") != (args.only == "plain"):
                    continue
                out = folder / f"{kind}-{i}"
                if kind == "plain":
                    tl = plain_run(spec, out, args.steps)
                else:
                    tl = kubetune_run(spec, out, env, trainer_only=kind == "trainer")
                if args.log:
                    args.log.mkdir(parents=True, exist_ok=True)
                    (args.log / f"{kind}-{i}.log").write_text("".join(f"{t:8.3f} {x}\n" for t, x in tl.lines))
                rows[kind].append(
                    {"zero": 0.0, **(plain_phases(tl) if kind == "plain" else kubetune_phases(tl))}
                )

    def med(kind: str, a: str, b: str) -> float | None:
        values = [v for v in (span(p, a, b) for p in rows[kind]) if v is not None]
        return statistics.median(values) if values else None

    print(
        f"\n{args.steps} steps of jobs/tiny-local.yaml (no samples), wall seconds from the start, median of "
        f"{args.repeat} run(s); kubetune = `kubetune run --local` on fresh caches, warm = again, trainer = "
        "`python -m kubetune.trainer` alone (warm)"
    )
    print(f"{'':40}" + "".join(f"{label:>10}" for label in kinds.values()))
    for label, a, b in (
        ("CLI: start -> launch", "zero", "launch"),
        ("data step (its own process)", "launch", "prepared"),
        ("trainer: imports + data", "trainer_start", "imported"),
        ("  of which tokenizer + data (+imports)", "trainer_start", "trainer_data"),
        ("model: 4-bit load, LoRA config", "imported", "model"),
        ("SFTTrainer built", "model", "built"),
        ("first optimizer step", "built", "first_step"),
        ("to the first step, in all", "zero", "first_step"),
        ("steps 2..N", "first_step", "last_step"),
        ("after the last step -> exit", "last_step", "end"),
        ("wall, in all", "zero", "end"),
        ("CPU time (user + sys), in all", "zero", "cpu"),
    ):
        print(f"{label:40}" + "".join(f"{fmt(med(kind, a, b)):>10}" for kind in kinds))
    first_p, end_p, cpu_p = (med("plain", "zero", k) for k in ("first_step", "end", "cpu"))
    for kind in ("cold", "warm", "trainer"):
        first, end, cpu = (med(kind, "zero", k) for k in ("first_step", "end", "cpu"))
        if first and first_p and end and end_p and cpu and cpu_p:
            print(
                f"{kinds[kind]} / plain TRL: to the first step {first / first_p:.2f}x "
                f"({first - first_p:+.2f} s), wall {end / end_p:.2f}x ({end - end_p:+.2f} s), "
                f"CPU {cpu / cpu_p:.2f}x ({cpu - cpu_p:+.2f} s)"
            )


if __name__ == "__main__":
    main()
