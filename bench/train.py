"""Training-step benchmark: step time, samples/s and MFU of one optimizer step (forward, backward,
grad clip, AdamW), plain PyTorch ops vs the fused Triton kernels, and the Triton kernels with
every transformer block compiled (`Echoes.compile_blocks`, train.py --compile).

- GPU: the `paper` preset under bf16 autocast at the largest batch that fits, found by doubling
  the batch until CUDA runs out of memory (nanoGPT's `bench.py` times a step the same way);
- CPU: the `demo` preset, fp32 and bf16 autocast (the CPU path of a demo training run).

Each row is the median over --steps timed steps after --warmup untimed ones. After the last GPU
row's timing (the profiler can slow the launches of whatever runs after it), one more of its steps
runs under the profiler: its GPU busy time (summed kernel durations) against the step time says how
long the GPU waits for the host, and the kernels that take the most time are listed under the
table. Inputs are random token ids: the step, not the data loader, is what is measured (train.py
reads memory-mapped shards, whose cost is negligible next to a step). The optimizer, autocast and
FLOP count are train.py's own (`configure_optimizer`, `autocast`, `peak_tflops`,
`model.flops_per_sample`).

    python bench/train.py                   # whatever this machine has; ~6 s on 2 cores
    python bench/train.py --out train.md    # also write the table as markdown
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # fewer OOMs
# the repository root first: bench/kernels.py would otherwise shadow the `kernels` package
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dataclasses  # noqa: E402
import functools  # noqa: E402
import importlib.util  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import kernels  # noqa: E402
from echoes.cli import (UserError, check_at_least, check_out_file, device_name,  # noqa: E402
                        parse_settings, run_cli, setting, write_text)
from echoes.model import Echoes, EchoesConfig  # noqa: E402


def load_by_path(name, path):
    """A script as a module: train.py (at the root) and bench/kernels.py (whose file name is the
    `kernels` package's)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


trainer = load_by_path("echoes_train", ROOT / "train.py")
kernel_bench = load_by_path("echoes_bench_kernels", ROOT / "bench" / "kernels.py")


@dataclasses.dataclass
class Settings:
    """`bench/train.py` settings (each one is a --flag; see --help)."""
    preset: str = setting("auto", "auto: paper on the GPU and demo on the CPU; or one preset "
                          "on every device", choices=["auto", "paper", "demo"])
    device: str = setting("auto", "auto (the GPU when present, and the CPU), cuda or cpu",
                          choices=["auto", "cuda", "cpu"])
    batch: int = setting(0, "batch per step; 0 = largest power of two that fits on the GPU "
                         "(up to --max-batch), 16 on the CPU")
    max_batch: int = setting(1024, "upper end of the GPU batch search (from 8, doubling)")
    steps: int = setting(5, "timed steps per row (the median is reported)")
    warmup: int = setting(2, "untimed steps first (allocator, cuBLAS and Triton autotuning)")
    kernels: str = setting("both", "plain PyTorch ops, the fused Triton ops (+compile: with "
                           "compiled blocks), or all three on a GPU",
                           choices=["both", "torch", "triton", "triton+compile"])
    cpu_amp: str = setting("both", "CPU precision: fp32, bf16 autocast or both",
                           choices=["both", "fp32", "bf16"])
    threads: int = setting(0, "CPU threads (0 = torch's default)")
    out: str = setting("", "also write the table as markdown to this file")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_step(model, optimizer, batch, device, amp, generator):
    audio, image = batch
    with trainer.autocast(device, amp):
        loss, _ = model.training_loss(audio, image, generator)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def random_batch(config, B, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    audio = torch.randint(0, config.audio_codebook, (B, config.audio_len), generator=g)
    image = torch.randint(0, config.image_codebook, (B, config.image_len), generator=g)
    return audio.to(device), image.to(device)  # (B, La), (B, Lv)


def fits(model, optimizer, config, B, device, amp, generator):
    """One step at batch B; False when CUDA runs out of memory (the state is cleaned up)."""
    try:
        one_step(model, optimizer, random_batch(config, B, device), device, amp, generator)
        sync(device)
        return True
    except torch.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return False


def bench_row(preset, device, backend, amp, s, batch=0, profile=False):
    """Build the model on `device` with `backend` ops ("+compile": blocks compiled), pick the
    batch (`batch`, else --batch, else the largest that fits), time the steps; with `profile`,
    then one step's GPU busy time and kernels."""
    config = EchoesConfig.preset(preset)
    torch.manual_seed(0)
    with device:  # built in place: initialising 400 M parameters on the CPU takes seconds
        model = Echoes(config, ops=kernels.select(backend.removesuffix("+compile")))
    if backend.endswith("+compile"):
        model.compile_blocks()
    optimizer = trainer.configure_optimizer(model, 1e-4, 0.05, (0.9, 0.95), device.type)
    generator = torch.Generator(device).manual_seed(0)
    B = batch or s.batch or (16 if device.type == "cpu" else 0)
    if B == 0:  # double until out of memory
        b = 8
        while b <= s.max_batch and fits(model, optimizer, config, b, device, amp, generator):
            B, b = b, 2 * b
        if B == 0:
            raise UserError(f"the {preset} preset does not fit at batch 8 on {device}")
    batch = random_batch(config, B, device, seed=1)
    times = []
    for i in range(s.warmup + s.steps):
        sync(device)
        t0 = time.perf_counter()
        one_step(model, optimizer, batch, device, amp, generator)
        sync(device)
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times[s.warmup:])
    busy, parts = None, []
    if profile:
        try:
            busy, parts = kernel_bench.busy_us(
                functools.partial(one_step, model, optimizer, batch, device, amp, generator), [],
                calls=1)
        except Exception as e:  # the profiler is a diagnostic: never lose the row for it
            print(f"  profiler failed: {type(e).__name__}: {e}", flush=True)
        if busy is not None and not 0 < busy <= 1.2e6 * dt:  # an empty or broken trace
            print(f"  profiler: no usable trace (busy {busy:.0f} us)", flush=True)
            busy, parts = None, []
    flops = model.flops_per_sample(train=True) * B / dt
    peak = trainer.peak_tflops(device)
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"preset": preset, "device": device_name(device), "kernels": backend, "amp": amp,
            "batch": B, "step_ms": 1000 * dt, "samples_s": B / dt, "tflops": flops / 1e12,
            "mfu": flops / (peak * 1e12) if peak else None,
            "busy_ms": None if busy is None else busy / 1e3, "kernels_us": parts}


def plan(s, notes):
    """[(preset, device, kernel backend, amp)] for this machine and the settings; what cannot
    run here is added to `notes`."""
    rows = []
    cuda = torch.cuda.is_available() and s.device in ("auto", "cuda")
    if s.device == "cuda" and not cuda:
        raise UserError("--device cuda, but no CUDA GPU is visible")
    backends = ["torch", "triton", "triton+compile"] if s.kernels == "both" else [s.kernels]
    if cuda:
        preset = "paper" if s.preset == "auto" else s.preset
        for backend in backends:
            if backend.startswith("triton") and not kernels.triton_available():
                notes.append("triton: not measured (Triton is not importable)")
                continue
            rows.append((preset, torch.device("cuda"), backend, "bf16"))
    if s.device in ("auto", "cpu"):
        preset = "demo" if s.preset == "auto" else s.preset
        for amp in (["fp32", "bf16"] if s.cpu_amp == "both" else [s.cpu_amp]):
            rows.append((preset, torch.device("cpu"), "torch", amp))
        if not cuda and s.kernels != "torch":
            notes.append("triton on the CPU: not measured (the kernels need CUDA; the "
                         "interpreter is a correctness tool, not a fast path)")
    return rows


def table(results):
    head = ("| preset | device | kernels | amp | batch | step ms | samples/s | TFLOP/s | MFU "
            "| GPU busy ms | busy % |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in results:
        busy = r["busy_ms"]
        lines.append(f"| {r['preset']} | {r['device']} | {r['kernels']} | {r['amp']} | "
                     f"{r['batch']} | {r['step_ms']:.1f} | {r['samples_s']:.1f} | "
                     f"{r['tflops']:.3f} | "
                     + (f"{100 * r['mfu']:.1f}% | " if r["mfu"] is not None else "- | ")
                     + (f"{busy:.1f} | {100 * busy / r['step_ms']:.0f}% |" if busy is not None
                        else "- | - |"))
    text = head + "\n".join(lines) + "\n"
    for r in results:
        if r["kernels_us"]:
            ms = [(name, us / 1e3) for name, us in r["kernels_us"]]
            text += (f"\nThe longest kernels of one {r['kernels']} step (ms, profiler): "
                     f"{kernel_bench.kernel_cell(ms, shown=8)}\n")
    return text


def main(argv=None):
    s = parse_settings(Settings, argv, description=" ".join(__doc__.split("\n\n")[0].split()))
    check_at_least(s, {"steps": 1, "warmup": 0, "batch": 0, "max_batch": 8, "threads": 0})
    if s.out:
        check_out_file(s.out)
    if s.threads:
        torch.set_num_threads(s.threads)
    results, notes = [], []
    batch = {}  # device type -> the batch of its first row: every row of a device uses it
    rows = plan(s, notes)
    footer = (f"\nFLOPs per training sample (model.flops_per_sample): demo "
              f"{flops_per_sample('demo') / 1e9:.2f} G, paper "
              f"{flops_per_sample('paper') / 1e12:.3f} T; MFU against train.py's PEAK_TFLOPS "
              "(dense bf16)\n")
    last_gpu = max((i for i, row in enumerate(rows) if row[1].type == "cuda"), default=None)
    for i, (preset, device, backend, amp) in enumerate(rows):
        print(f"{preset} on {device_name(device)}, {backend} ops, {amp} ...", flush=True)
        try:
            results.append(bench_row(preset, device, backend, amp, s, batch.get(device.type, 0),
                                     profile=i == last_gpu))
            batch.setdefault(device.type, results[-1]["batch"])
        except (ImportError, RuntimeError) as e:  # a kernel backend that cannot run here
            notes.append(f"{preset} {device} {backend}: not measured ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]})")
        if s.out:  # after every row: a run cut short keeps the rows it measured
            write_text(s.out, table(results) + "".join(f"\n{n}" for n in notes) + footer)
    text = table(results) + "".join(f"\n{n}" for n in notes) + footer
    print(text)
    if s.out:
        print(f"wrote {s.out}")


def flops_per_sample(preset):
    with torch.device("meta"):  # no memory for the weights: only the formula is wanted
        return Echoes(EchoesConfig.preset(preset), ops=kernels.select("torch")).flops_per_sample()


if __name__ == "__main__":
    run_cli(main)
