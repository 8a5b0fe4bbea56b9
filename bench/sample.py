"""Sampling speed: latency (batch 1) and throughput (batch 32) of image -> audio with the paper's
N = 30 steps and CFG s = 3 (Sec. 4.1), whose two passes run as one batch of 2B per step.

Rows: the `demo` preset on the CPU, always; the `paper` preset (random weights, bf16 autocast) on
the GPU when there is one. The GPU rows run the plain PyTorch path (`kernels.select("torch")`,
eager: the baseline), the same with the transformer's forward replayed from CUDA graphs, and,
where Triton is usable, the fused kernels without and with CUDA graphs. Two more latency rows
wait for the GPU after every step, as the sampler did before its steps stopped reading back from
the GPU: how much queueing the next step during the current one gains. Every row times whole
`generate` calls (features, CFG mix, draw, re-mask, random numbers) after one short warm-up run,
and reports the median of the repeats and the speed-up over the eager PyTorch row.

    python bench/sample.py                      # ~10 s on a 2-core CPU
    python bench/sample.py --steps 4 --repeats 1 --throughput-batch 8   # a quick look

On a CPU shared with other work, `--threads 1` often beats the default: idle-waiting OpenMP threads
slow small matrix products down when the cores are busy.
"""

import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kernels  # noqa: E402
from echoes import sampler  # noqa: E402
from echoes.cli import (check_at_least, check_out_file, check_rules, device_name,  # noqa: E402
                        parse_settings, run_cli, setting, write_text)
from echoes.model import Echoes, EchoesConfig  # noqa: E402
from echoes.sampler import generate  # noqa: E402


@dataclass
class Settings:
    steps: int = setting(30, "unmasking steps N (paper: 30)")
    guidance: float = setting(3.0, "CFG scale s (paper, image -> audio: 3; 1 = no second pass)")
    temperature: float = setting(9.0, "Gumbel choice temperature T (paper: 9)")
    latency_batch: int = setting(1, "batch of the latency rows")
    throughput_batch: int = setting(32, "batch of the throughput rows")
    repeats: int = setting(0, "timed runs per row, median reported; 0: 3, except 1 for the CPU "
                              "throughput row (the slowest)")
    threads: int = setting(0, "CPU threads for torch (0: its default)")
    gpu: bool = setting(True, "also bench the paper preset on the GPU when one is present")
    seed: int = setting(0, "seed of the random weights, inputs and sampling")
    out: str = setting("", "also write the table as markdown to this file")


def backends(device):
    """(name, op set or None, CUDA graphs on, wait after each step, why not): the plain path and,
    on a GPU, the plain path with CUDA graphs, the Triton path without and with them, and both
    graphed paths waiting for the GPU after every step."""
    if device.type != "cuda":
        return [("torch", kernels.select("torch"), False, False, "")]
    plain = kernels.select("torch")
    try:
        fused, why = kernels.select("triton"), ""
    except (ImportError, RuntimeError) as e:
        fused, why = None, f"{type(e).__name__}: {e}"
    return [("torch", plain, False, False, ""), ("torch + graphs", plain, True, False, ""),
            ("triton", fused, False, False, why), ("triton + graphs", fused, True, False, why),
            ("torch + graphs, wait each step", plain, True, True, ""),
            ("triton + graphs, wait each step", fused, True, True, why)]


def time_generate(model, image_ids, s, repeats, autocast_dtype, graphs, wait=False):
    """Median wall time of one `generate` call in i2a mode, and all the times. `wait`: the host
    waits for the GPU after every step."""
    device = image_ids.device
    callback = (lambda step, ids: torch.cuda.synchronize()) if wait else None

    def run(steps):
        g = torch.Generator().manual_seed(s.seed)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            generate(model, "i2a", image_ids=image_ids, steps=steps, temperature=s.temperature,
                     guidance=s.guidance, generator=g, cuda_graphs=graphs, callback=callback)
        if device.type == "cuda":
            torch.cuda.synchronize()

    run(min(2, s.steps))  # warm-up: allocator, kernel compilation and autotuning
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(s.steps)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def bench_preset(preset, device, autocast_dtype, s, table, save):
    """Time every kernel path on `preset`, appending a row to `table` and calling `save()`
    after each."""
    torch.manual_seed(s.seed)
    config = EchoesConfig.preset(preset, dropout=0.0)
    with device:  # initialise the weights where they will live (424 M of them for `paper`)
        model = Echoes(config).eval()
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    name = device_name(device)
    dtype = "bf16 autocast" if autocast_dtype is not None else "fp32"
    print(f"{preset}: {n_params:.1f} M parameters on {name} ({dtype})", flush=True)
    g = torch.Generator().manual_seed(s.seed)
    baseline = {}  # kind -> the eager PyTorch row's median
    for backend, ops, graphs, wait, why in backends(device):
        if ops is None:
            print(f"  {backend}: skipped ({why})", flush=True)
            continue
        model.ops = ops
        for kind, B in (("latency", s.latency_batch), ("throughput", s.throughput_batch)):
            if wait and kind == "throughput":  # bound by the matrix products: nothing to see
                continue
            repeats = s.repeats or (1 if device.type == "cpu" and kind == "throughput" else 3)
            image_ids = torch.randint(0, config.image_codebook, (B, config.image_len),
                                      generator=g).to(device)
            median, times = time_generate(model, image_ids, s, repeats, autocast_dtype, graphs,
                                          wait)
            baseline.setdefault(kind, median)
            table.append((preset, name, dtype, backend, kind, B, median, B / median,
                          1e3 * median / s.steps, baseline[kind] / median, len(times)))
            print(f"  {backend} {kind} B={B}: {median:.3f} s "
                  f"({', '.join(f'{t:.2f}' for t in times)})", flush=True)
            save()


def main(argv=None):
    s = parse_settings(Settings, argv, description=__doc__.split("\n\n")[0])
    check_at_least(s, {"steps": 1, "latency_batch": 1, "throughput_batch": 1, "repeats": 0,
                       "threads": 0})
    check_rules(s, {name: sampler.SAMPLING_RULES[name] for name in ("temperature", "guidance")})
    if s.out:
        check_out_file(s.out)
    if s.threads:
        torch.set_num_threads(s.threads)
    table = []

    def save():  # after every row: a run cut short keeps the rows it measured
        if s.out:
            write_text(s.out, markdown(table, s))

    bench_preset("demo", torch.device("cpu"), None, s, table, save)
    if s.gpu and torch.cuda.is_available():
        bench_preset("paper", torch.device("cuda"), torch.bfloat16, s, table, save)
    else:
        print("paper preset on a GPU (CUDA graphs, Triton kernels): skipped ("
              + ("--no-gpu" if not s.gpu else "no CUDA GPU here") + ")", flush=True)
    print("\n" + markdown(table, s), end="")
    if s.out:
        print(f"wrote {s.out}")


def markdown(table, s):
    passes = "one forward of 2B per step" if s.guidance != 1 else "no unconditional pass"
    title = (f"i2a, N = {s.steps}, CFG s = {s.guidance} ({passes}), T = {s.temperature}; "
             "median of the repeats")
    head = ("preset", "device", "dtype", "ops", "row", "batch", "s / call", "samples/s",
            "ms / step", "x eager torch", "runs")
    rows = [(p, d, dt, b, k, str(B), f"{m:.3f}", f"{sps:.2f}", f"{ms:.1f}", f"{x:.2f}", str(n))
            for p, d, dt, b, k, B, m, sps, ms, x, n in table]
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_cli(main)
