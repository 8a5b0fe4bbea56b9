"""Train the Visual Echoes transformer on token shards: one process, or many under torchrun.

The recipe is the paper's (Sec. 4.1) as MAGE trains (`main_pretrain.py`, `util/lr_sched.py`):
AdamW with betas (0.9, 0.95) and weight decay 0.05, lr = 1.5e-4 * global_batch / 256 with a linear
warmup then a cosine decay, grad-norm clip 3.0, bf16 autocast on GPU. The loop is laid out as
build-nanogpt's `train_gpt2.py` and nanochat's `base_train.py`: one distributed setup driven by
torchrun's environment, the global batch given once and gradient accumulation derived from it,
the gradient all-reduce on the last micro-step only, evaluation on every rank averaged with one
all-reduce, checkpoints from the unwrapped model with everything needed to resume exactly.

    python train.py --data shards --out runs/vgg                           # one process
    torchrun --nproc_per_node=8 train.py --data shards --out runs/vgg      # 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        train.py --data shards --out runs/vgg                              # 2 nodes
    python train.py --data shards --out runs/vgg --resume                  # continue a run

Checkpoint `OUT/ckpt.pt` (written atomically every --save-every steps, at the end, on SIGTERM
and on the first Ctrl-C):
    model       state dict of the unwrapped model      config     dataclasses.asdict(EchoesConfig)
    optimizer   AdamW state dict                       settings   the resolved settings below
    step        optimizer steps done                   data       loader position {epoch, index}
                                                                  (+ clips, micro_batch)
    rng         {"world_size", "ranks": per rank {"torch", "cuda", "python", "masking"}}
    tokenizers  the shard index's tokenizer settings (when it has them)
    sampling    sampling defaults for sample.py (when --sampling gives them)
    metrics     last training loss and evaluation loss
Log: one line per step on stdout and in `OUT/log.jsonl` (rank 0).
"""

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import kernels
from echoes import data
from echoes.cli import (UserError, check_at_least, check_finite, check_finite_weights,
                        check_writable, load_checkpoint, parse_settings, remove_temps, run_cli,
                        save_atomic, setting)
from echoes.model import Echoes, EchoesConfig
from echoes.sampler import check_sampling_defaults, sample_generators


@dataclass
class Settings:
    """`train.py` settings: each field is a --flag (see --help); stored in the checkpoint."""
    # data and output
    data: str = setting("", "folder of token shards (python -m echoes.prepare)")
    out: str = setting("runs/echoes", "folder for ckpt.pt and log.jsonl")
    resume: bool = setting(False, "continue from OUT/ckpt.pt up to --max-steps (starts from "
                           "step 0 when there is none yet, so a requeued job can always pass it)")
    train_split: str = setting("train", "split of the shards to train on")
    eval_split: str = setting("test", "split to evaluate on (skipped when the shards lack it)")
    # model
    preset: str = setting("paper", "model size (EchoesConfig presets)", choices=["paper", "demo"])
    model_overrides: str = setting("", "JSON object of EchoesConfig fields over the preset, "
                                   "e.g. '{\"enc_depth\": 2, \"dropout\": 0.0}'")
    kernels: str = setting("auto", "fused Triton ops or plain PyTorch (auto: Triton when CUDA "
                           "and Triton are present)", choices=["auto", "triton", "torch"])
    # optimisation: the paper recipe (Sec. 4.1, MAGE)
    global_batch: int = setting(512, "samples per optimizer step over all processes (paper: 512)")
    micro_batch: int = setting(0, "samples per process per forward pass; 0 = global-batch / "
                               "processes; accumulation steps = global / (micro x processes)")
    max_steps: int = setting(0, "total optimizer steps (a resumed run continues up to it); "
                             "0 = --epochs passes over the training split")
    run_steps: int = setting(0, "stop this invocation after this many steps (checkpoint saved), "
                             "keeping the schedule of --max-steps: for time-sliced jobs; 0 = "
                             "run to --max-steps")
    epochs: float = setting(1000.0, "passes over the training split when --max-steps is 0 "
                            "(paper: 1000)")
    base_lr: float = setting(1.5e-4, "learning rate per 256 samples (MAE/MAGE scaling)")
    lr: float = setting(0.0, "peak learning rate; 0 = base-lr * global-batch / 256")
    warmup_steps: int = setting(-1, "linear warmup steps; -1 = 2.5%% of max-steps (MAGE warms up "
                                "40 of 1600 epochs)")
    min_lr_ratio: float = setting(0.0, "floor of the cosine decay, as a fraction of the peak")
    weight_decay: float = setting(0.05, "AdamW weight decay (on the parameters --decay-group "
                                  "names)")
    decay_group: str = setting("mage", "parameters with weight decay: mage = every weight and "
                               "embedding, none on biases and LayerNorm parameters (MAGE's "
                               "grouping); linear = Linear weights only (nanoGPT's)",
                               choices=["mage", "linear"])
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    grad_clip: float = setting(3.0, "clip the global gradient norm to this (0 = off)")
    amp: str = setting("auto", "autocast precision: auto = bf16 on a GPU that has it, else fp32",
                       choices=["auto", "bf16", "fp32"])
    compile: str = setting("auto", "torch.compile each transformer block (fuses norms, GELU and "
                           "residual adds; the first steps compile): auto = on a GPU, where it "
                           "makes a training step about a tenth faster, off on CPUs",
                           choices=["auto", "on", "off"])
    # research tricks at the data level (they helped the demo), off in the paper recipe
    repair_within_class: bool = setting(False, "each step, pair every clip's audio with the "
                                        "image of a random clip of the same class")
    # bookkeeping
    seed: int = setting(0, "seed of the model init, data order, masking and dropout")
    device: str = setting("auto", "auto (CUDA when present), cuda or cpu; under torchrun each "
                          "process takes cuda:LOCAL_RANK")
    log_every: int = setting(1, "steps between log lines")
    eval_every: int = setting(1000, "steps between evaluations on --eval-split (0 = at the end)")
    eval_samples: int = setting(0, "clips of the eval split to use (0 = all)")
    save_every: int = setting(1000, "steps between checkpoints (and one at the end)")
    sampling: str = setting("", "JSON of sampling defaults stored in the checkpoint for "
                            "sample.py, e.g. '{\"guidance\": {\"i2a\": 3.0}}' (a plain number "
                            "holds for every guided mode, a2i included); a resumed run without "
                            "it keeps the stored ones")
    progress: bool = setting(True, "show a progress bar on rank 0")


# dense bf16 tensor-core peak of one device in TFLOP/s (vendor data sheets); the first name that
# is contained in torch.cuda.get_device_name() wins, so the specific entries come first. A device
# not listed gets no MFU rather than a wrong one.
PEAK_TFLOPS = [
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0),
    ("H100", 989.0), ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("V100", 125.0),  # fp16 tensor cores: the V100 has no bf16
    ("MI300X", 1307.0),
]


def peak_tflops(device):
    """Peak TFLOP/s of a device (PEAK_TFLOPS), or None for the CPU and unknown GPUs."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


# -----------------------------------------------------------------------------
# distributed setup (nanochat `compute_init`)


@dataclass
class Dist:
    """This process's place in the run (world size 1 for a single process)."""
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    master: bool


def print0(*args, **kwargs):
    """print on global rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def setup_distributed(device="auto"):
    """One process group from torchrun's RANK / WORLD_SIZE / LOCAL_RANK (NCCL on CUDA, gloo on
    the CPU). Without torchrun the same path runs with world size 1 on an in-process store."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA GPU is visible; use --device cpu",
                        node_wide=True)
    if cuda and local >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise UserError(f"process {local} of this node needs GPU {local}, but the node shows "
                        f"{n} GPU(s); start torchrun with --nproc_per_node={n} or fewer, or use "
                        "--device cpu")
    if cuda:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend, device_id=dev if cuda else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(rank, local, world, dev, rank == 0)


# -----------------------------------------------------------------------------
# optimisation


def decay_groups(model, rule="mage"):
    """[decayed, not decayed] trainable parameters. "mage": MAGE's grouping (`main_pretrain.py`
    calls timm's `add_weight_decay`, which exempts biases and 1-D parameters only): the Linear
    weights, the token embedding tables (also the MLM heads' weights), the positional and
    modality embeddings and the decoder's mask embedding (MAGE's is a (1, 1, D) parameter) are
    decayed; biases and LayerNorm parameters are not. "linear": the Linear weights alone
    (nanoGPT's `configure_optimizers`)."""
    if rule == "linear":
        decay = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    else:
        norms = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm)
                 for p in m.parameters()}
        decay = {id(p) for name, p in model.named_parameters()
                 if not name.endswith("bias") and id(p) not in norms}
    params = [p for p in model.parameters() if p.requires_grad]
    return [[p for p in params if id(p) in decay], [p for p in params if id(p) not in decay]]


def configure_optimizer(model, lr, weight_decay, betas, device_type, rule="mage"):
    """AdamW over `decay_groups(model, rule)`, weight decay on the first group only."""
    decayed, other = decay_groups(model, rule)
    groups = [{"params": decayed, "weight_decay": weight_decay},
              {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")


def lr_at(step, peak, warmup, total, min_ratio=0.0):
    """Linear warmup over `warmup` steps, then a half cosine from `peak` to `min_ratio * peak`
    at `total` (MAGE `util/lr_sched.py`, per step instead of per fractional epoch)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def autocast(device, amp):
    """bf16 autocast (no loss scaling needed), or nothing for fp32."""
    if amp == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def scale_and_clip_(params, scale, max_norm):
    """Multiply the gradients by `scale`, then clip their global norm to `max_norm` (0: no
    clipping) as clip_grad_norm_ would, both in a single multiply of the gradients; returns the
    norm of the scaled gradients before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) * scale
    coef = scale * torch.clamp(max_norm / (norm + 1e-6), max=1.0) if max_norm > 0 else scale
    torch._foreach_mul_(grads, coef)
    return norm.item()


class LossModule(nn.Module):
    """Makes the training loss the forward pass, which is what DDP hooks into: Eq. 1's token
    losses summed (not averaged; train() scales the gradients to the step's mean) and stats."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, audio_ids, image_ids, generator):
        return self.model.training_loss(audio_ids, image_ids, generator, reduction="sum")


def masked_sums(stats):
    """(4,) float64: per modality the summed token loss and the masked count of one batch (from
    `training_loss`'s stats), to be added over batches and ranks: sum_a, n_a, sum_v, n_v."""
    n_a, n_v = stats["masked_audio"].double(), stats["masked_image"].double()  # exact counts
    return torch.stack([stats["loss_audio"] * n_a, n_a, stats["loss_image"] * n_v, n_v])


@torch.no_grad()
def evaluate(model, dataset, batch_size, d, amp, seed, limit=0):
    """Eq. 1's loss on an evaluation split, every rank on its share, summed over ranks with one
    all-reduce (build-nanogpt). Each clip's masks come from a CPU generator of its own, seeded
    from (seed, clip) as the sampler seeds its samples, and the middle frame is used, so
    evaluations at different steps, on any device, number of processes or batch size, see the
    same corruption."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=d.device)  # sum_a, n_a, sum_v, n_v
    for clips, audio, image in data.eval_batches(dataset, batch_size, d.rank, d.world_size, limit):
        # one per clip, whatever batch and rank it falls in
        gens = [sample_generators(seed, 1, offset=int(i))[0] for i in clips]
        with autocast(d.device, amp):
            _, st = model.training_loss(audio.to(d.device), image.to(d.device), gens)
        totals += masked_sums(st)
    dist.all_reduce(totals)
    model.train()
    sa, na, sv, nv = totals.tolist()
    # a modality without masked tokens (a tiny split where every clip hides the other) has no
    # loss: None, not a perfect 0
    return {"eval_loss": (sa + sv) / max(na + nv, 1), "eval_loss_audio": sa / na if na else None,
            "eval_loss_image": sv / nv if nv else None}


def loss_text(x):
    """A logged per-modality loss: n/a where no token of the modality was masked."""
    return "n/a" if x is None else f"{x:.4f}"


# -----------------------------------------------------------------------------
# checkpoints


def stream_seed(seed, rank, offset=0):
    """The seed of one of a rank's random streams: runs (seed), ranks and streams (offset: the
    masking generator's is 7919, a resumed run's adds its step) never share one."""
    return seed * 1_000_003 + rank + offset


def rng_state(generator, device):
    """Every random stream of this rank: dropout draws from the global torch (CPU / CUDA) state,
    masks from `generator`; python's for completeness (numpy's global state is never used: data
    draws are seeded by position, see echoes/data.py)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "python": random.getstate(), "masking": generator.get_state()}


def set_rng_state(state, generator, device):
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(state["python"])
    generator.set_state(state["masking"])


def save_checkpoint(path, d, model, optimizer, config, s, step, loader, generator, extra):
    """Gather every rank's RNG state and write the checkpoint from rank 0 (atomically: a run
    killed while saving keeps the previous file). All ranks must call this together."""
    states = [None] * d.world_size
    dist.all_gather_object(states, rng_state(generator, d.device))
    if d.master:
        save_atomic({"model": model.state_dict(), "config": dataclasses.asdict(config),
                     "settings": dataclasses.asdict(s), "optimizer": optimizer.state_dict(),
                     "step": step, "data": loader.state_dict(),
                     "rng": {"world_size": d.world_size, "ranks": states}, **extra}, path)


def _trim_log(path, step):
    """Keep the log records up to `step`: a resumed run redoes the steps after its checkpoint."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError):  # a line cut short by a kill
                pass
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


# -----------------------------------------------------------------------------
# the run


def resolve_config(s):
    """The preset with --model-overrides applied; unknown fields and wrong types are errors."""
    base = EchoesConfig.preset(s.preset)
    try:
        overrides = json.loads(s.model_overrides) if s.model_overrides else {}
    except json.JSONDecodeError as e:
        raise UserError(f"--model-overrides is not valid JSON ({e})") from e
    if not isinstance(overrides, dict):
        raise UserError("--model-overrides must be a JSON object, e.g. '{\"enc_depth\": 2}'")
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(EchoesConfig)}
    for key, value in overrides.items():
        if key not in fields:
            raise UserError(f"--model-overrides: unknown field {key!r} (fields: "
                            f"{', '.join(fields)})")
        want = type(fields[key])
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if not ok and not (want is float and isinstance(value, int) and
                           not isinstance(value, bool)):
            raise UserError(f"--model-overrides: {key} must be {want.__name__}, got {value!r}")
    try:
        return EchoesConfig.preset(s.preset, **overrides)
    except ValueError as e:
        raise UserError(f"--model-overrides: {e}") from e


def check_settings(s, world):
    """Everything a user can get wrong, checked before any process group exists, on every rank.
    Returns (config, micro batch, accumulation steps)."""
    config = resolve_config(s)
    check_finite(s)
    if not s.data or not os.path.isdir(s.data):
        raise UserError(f"--data {s.data!r} is not a folder; make shards with "
                        "`python -m echoes.prepare` and pass their folder")
    index = data.read_index(s.data)
    if data.split_sizes(index).get(s.train_split, 0) == 0:
        raise UserError(f"{s.data} holds no shards of split {s.train_split!r} "
                        f"(it has: {', '.join(data.split_sizes(index)) or 'none'})")
    if (index["audio_len"], index["image_len"]) != (config.audio_len, config.image_len):
        raise UserError(f"the shards hold {index['audio_len']} audio and {index['image_len']} "
                        f"image ids per clip, the {s.preset} model takes {config.audio_len} and "
                        f"{config.image_len}; pick the matching --preset or --model-overrides")
    for kind, size in (("audio", config.audio_codebook), ("image", config.image_codebook)):
        book = (index.get("tokenizers") or {}).get(kind, {}).get("codebook")
        if book is not None and book != size:  # sample.py needs them equal
            raise UserError(f"the {kind} tokenizer has {book} codes, the model's codebook "
                            f"{size}; set {kind}_codebook to {book} in --model-overrides")
    check_at_least(s, {"global_batch": 1, "micro_batch": 0})
    micro = s.micro_batch or s.global_batch // world
    if micro < 1:
        raise UserError(f"--global-batch {s.global_batch} is smaller than the {world} processes; "
                        "give every process at least one sample")
    if s.global_batch % (micro * world):
        if not s.micro_batch:  # the split was ours: global batch / processes
            raise UserError(f"impossible batch split: --global-batch {s.global_batch} does not "
                            f"divide evenly over {world} processes; give a multiple of {world}")
        raise UserError(f"impossible batch split: --global-batch {s.global_batch} is not a "
                        f"multiple of --micro-batch {micro} x {world} processes")
    check_at_least(s, {"log_every": 1, "save_every": 1, "eval_every": 0, "eval_samples": 0,
                       "max_steps": 0, "run_steps": 0, "warmup_steps": -1, "lr": 0,
                       "weight_decay": 0, "grad_clip": 0})
    if not 0 <= s.min_lr_ratio <= 1:
        raise UserError(f"--min-lr-ratio must be in [0, 1], got {s.min_lr_ratio}")
    for name in ("base_lr", "epochs"):
        if not getattr(s, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be above 0, got {getattr(s, name)}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(s, name) < 1:
            raise UserError(f"--{name} must be in [0, 1), got {getattr(s, name)}")
    if not 0 <= s.seed < 2 ** 32:  # stream seeds (seed * 1_000_003 + ...) stay in 64 bits
        raise UserError(f"--seed must be in [0, 2**32), got {s.seed}")
    if s.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {s.device!r}: use auto, cpu or cuda (under torchrun each "
                        "process takes cuda:LOCAL_RANK)")
    try:
        kernels.resolve(s.kernels)
    except (RuntimeError, ValueError) as e:
        raise UserError(str(e)) from e
    if s.sampling:
        try:
            check_sampling_defaults(json.loads(s.sampling))
        except json.JSONDecodeError as e:
            raise UserError("--sampling must be a JSON object, e.g. "
                            "'{\"guidance\": {\"i2a\": 3.0}}'") from e
        except ValueError as e:
            raise UserError(f"--sampling: {e}") from e
    check_writable(s.out)  # last: a run refused for another reason leaves no folder behind
    return config, micro, s.global_batch // (micro * world)


def check_same_codebooks(old, new, path, data_dir):
    """A `UserError` when the checkpoint's shards and these shards recorded different codebook
    fingerprints (`python -m echoes.prepare` records them): the ids would mean other codes."""
    def fingerprint(record, m):
        entry = record.get(m) if isinstance(record, dict) else None
        return entry.get("fingerprint") if isinstance(entry, dict) else None

    for m in ("image", "audio"):
        a, b = fingerprint(old, m), fingerprint(new, m)
        if a and b and a != b:
            raise UserError(f"{path} was trained on shards of another {m} VQGAN than {data_dir}'s "
                            f"(codebook {a} there, {b} here); resume on its shards or use "
                            "another --out")


def resume(ckpt, path, s, d, config, model, optimizer, loader, generator):
    """Load a checkpoint into the fresh model, optimizer, loader and RNG streams; returns its
    step. A checkpoint of another model configuration is a one-line error."""
    for key in ("model", "config", "optimizer", "step", "data", "rng"):
        if key not in ckpt:
            raise UserError(f"{path} is not a train.py checkpoint (no {key!r} key)")
    step = ckpt["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise UserError(f"{path} holds step {step!r}, not a count of steps; it is damaged: use "
                        "an earlier copy or another --out")
    if isinstance(ckpt["model"], dict):
        check_finite_weights(ckpt["model"], str(path))
    want = dataclasses.asdict(config)
    # a field newer than the checkpoint was at its default there (off, for the research fields)
    stored = {**{f.name: f.default for f in dataclasses.fields(EchoesConfig)}, **ckpt["config"]}
    diff = {k: (stored.get(k), v) for k, v in want.items() if stored.get(k) != v}
    if diff:
        raise UserError(f"{path} was trained with another model configuration ("
                        + ", ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in diff.items())
                        + "); pass the same --preset and --model-overrides or another --out")
    try:
        model.load_state_dict(ckpt["model"])
        # the optimizer state holds the grouping the checkpoint was trained with: it stays
        sizes = [len(g["params"]) for g in ckpt["optimizer"]["param_groups"]]
        other = "linear" if s.decay_group == "mage" else "mage"
        groups = decay_groups(model, other)
        if (sizes != [len(g["params"]) for g in optimizer.param_groups]
                and sizes == [len(g) for g in groups]):
            for group, params in zip(optimizer.param_groups, groups):
                group["params"] = params
            print0(f"note: the checkpoint's optimizer was grouped by --decay-group {other}, not "
                   f"{s.decay_group}: the run keeps its grouping")
            s.decay_group = other  # the settings the next checkpoint records
        for group in ckpt["optimizer"]["param_groups"]:  # before loading: the state's step
            group["fused"] = optimizer.defaults["fused"]  # counters go where fused AdamW wants
        optimizer.load_state_dict(ckpt["optimizer"])
        loader.load_state_dict(ckpt["data"])
        rng = ckpt["rng"]
        if len(rng["ranks"]) != rng["world_size"]:  # checked alike on every rank
            raise ValueError(f"{len(rng['ranks'])} ranks' states for {rng['world_size']} ranks")
        ranks, why = rng["ranks"][d.rank] if rng["world_size"] == d.world_size else None, (
            f"the checkpoint ran on {rng['world_size']} process(es), this run on {d.world_size}")
        # a CPU generator's state is not a GPU generator's: a run moved between the two
        if ranks is not None and ranks["masking"].numel() != generator.get_state().numel():
            ranks, why = None, f"the checkpoint's random states are not of {d.device.type} streams"
        if ranks is not None:
            set_rng_state(ranks, generator, d.device)
    except (RuntimeError, KeyError, IndexError, TypeError, ValueError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise UserError(f"{path} does not fit this run ({type(e).__name__}: {first}); resume it "
                        "with the code and settings that wrote it, or use another --out") from e
    # AdamW's settings are this run's, as the learning rate is (set every step): only the
    # moments come from the checkpoint
    for group, decay in zip(optimizer.param_groups, (s.weight_decay, 0.0)):
        group["weight_decay"], group["betas"] = decay, (s.beta1, s.beta2)
    old = ckpt.get("settings", {})
    for key in ("seed", "global_batch", "data"):
        if key in old and old[key] != getattr(s, key):
            print0(f"warning: --{key.replace('_', '-')} was {old[key]!r} in the checkpoint, "
                   f"now {getattr(s, key)!r}: the run continues but not as it would have")
    clips = ckpt["data"].get("clips")
    if clips is not None and clips != len(loader.dataset):
        print0(f"warning: the {s.train_split!r} split had {clips} clips at the checkpoint, now "
               f"{len(loader.dataset)}: the run continues on them, but its steps, learning-rate "
               "schedule and clip order are not what they would have been")
    was = ckpt["data"].get("micro_batch")
    if ranks is not None and was is not None and was != loader.batch_size:
        print0(f"note: the checkpoint ran micro-batches of {was}, this run {loader.batch_size}: "
               "frame and mask draws follow the micro-batches, so the resume is not exact")
    if ranks is None:  # fresh streams: the data position still holds, the random draws differ
        print0(f"note: {why}: random streams are re-seeded, so the resume is not exact")
        torch.manual_seed(stream_seed(s.seed, d.rank, ckpt["step"]))
        generator.manual_seed(stream_seed(s.seed, d.rank, 7919 + ckpt["step"]))
    print0(f"resumed {path} at step {ckpt['step']} (epoch {loader.epoch}, clip {loader.index})")
    return int(ckpt["step"])


def main(argv=None):
    """train.py's command line: settings, the distributed set-up, the run; its exit code."""
    s = parse_settings(Settings, argv, description=__doc__.split("\n")[0])
    try:
        config, micro, accum = check_settings(s, int(os.environ.get("WORLD_SIZE", 1)))
    except UserError as e:
        e.node_wide = True  # every process checks the same settings and files
        raise
    ckpt_path = os.path.join(s.out, "ckpt.pt")
    if os.path.exists(ckpt_path) and not s.resume:
        raise UserError(f"{ckpt_path} exists; pass --resume to continue it or pick another --out",
                        node_wide=True)
    d = setup_distributed(s.device)
    try:
        code = train(s, d, config, micro, accum, ckpt_path)
        if d.world_size > 1:  # leave together: a gloo rank whose peer tore down first can abort
            dist.barrier()
        return code
    finally:
        dist.destroy_process_group()


def train(s, d, config, micro, accum, ckpt_path):
    """The run on this process: data, model, resume, the loop with its logs, evaluations,
    checkpoints and signal stops; returns the exit code (0 done, 1 non-finite loss, 128 + n
    stopped by signal n)."""
    amp = s.amp if s.amp != "auto" else (
        "bf16" if d.device.type == "cuda" and torch.cuda.is_bf16_supported(
            including_emulation=False) else "fp32")  # a V100 emulates bf16: fp32 there
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 parts of a bf16 run
        torch.backends.cudnn.allow_tf32 = True
    books = (config.audio_codebook, config.image_codebook)  # ids past them: a one-line error
    train_set = data.TokenShards(s.data, s.train_split, train=True, seed=s.seed, codebooks=books)
    eval_set = None
    if data.split_sizes(data.read_index(s.data)).get(s.eval_split):
        eval_set = data.TokenShards(s.data, s.eval_split, train=False, codebooks=books)
    loader = data.ShardLoader(train_set, micro, d.rank, d.world_size, s.seed,
                              repair_within_class=s.repair_within_class)
    # rounded first: 1.1 epochs of 100 clips at batch 2 are 55 steps, not ceil(55.000000000000007)
    max_steps = s.max_steps or math.ceil(round(s.epochs * len(train_set) / s.global_batch, 6))
    warmup = s.warmup_steps if s.warmup_steps >= 0 else round(0.025 * max_steps)
    peak_lr = s.lr or s.base_lr * s.global_batch / 256

    torch.manual_seed(s.seed)  # the same initial weights on every rank
    model = Echoes(config, ops=kernels.select(s.kernels)).to(d.device)
    compiled = s.compile == "on" or (s.compile == "auto" and d.device.type == "cuda")
    if compiled:
        model.compile_blocks()
    optimizer = configure_optimizer(model, peak_lr, s.weight_decay, (s.beta1, s.beta2),
                                    d.device.type, s.decay_group)
    generator = torch.Generator(d.device)  # the masking draws of draw_corruption
    torch.manual_seed(stream_seed(s.seed, d.rank))  # dropout differs across ranks
    random.seed(stream_seed(s.seed, d.rank))
    generator.manual_seed(stream_seed(s.seed, d.rank, 7919))

    step, extra = 0, {}
    if d.master:
        remove_temps(s.out, dead_only=True)  # a save killed part-way leaves its temp file
    try:
        ckpt = load_checkpoint(ckpt_path, what="checkpoint") if os.path.exists(ckpt_path) else None
        if ckpt is not None:
            step = resume(ckpt, ckpt_path, s, d, config, model, optimizer, loader, generator)
            check_same_codebooks(ckpt.get("tokenizers"), train_set.tokenizers, ckpt_path, s.data)
    except UserError as e:
        e.node_wide = True  # every process of a node reads the same checkpoint
        raise
    if ckpt is not None:
        extra = {k: ckpt[k] for k in ("sampling", "metrics", "eval_due") if k in ckpt}
        del ckpt
    elif s.resume:
        print0(f"no checkpoint in {s.out} yet: starting from step 0")
    if d.world_size > 1:  # every process must have read the same checkpoint
        steps = torch.tensor([step, -step], device=d.device)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        if steps[0] != -steps[1]:
            raise UserError(f"the processes found checkpoints of different steps in {s.out} "
                            f"({-int(steps[1])} to {int(steps[0])}): --out must be one folder "
                            "that every node shares", node_wide=True)
    if train_set.tokenizers:
        extra["tokenizers"] = train_set.tokenizers
    if s.sampling:
        extra["sampling"] = json.loads(s.sampling)

    counts = model.parameter_counts()
    print0(f"model: {counts['total'] / 1e6:.2f} M parameters ("
           + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in counts.items() if k != "total")
           + f"); kernels {model.ops.name}"
           + (" (Triton is not installed: pip install triton)" if kernels.missing_triton() else "")
           + f"; {amp}"
           + ("; compiled blocks" if compiled else ""))
    print0(f"data: {len(train_set)} {s.train_split} clips"
           + (f", {len(eval_set)} {s.eval_split}" if eval_set else
              f", no {s.eval_split!r} split to evaluate on (the shards hold: "
              f"{', '.join(data.split_sizes(data.read_index(s.data)))})")
           + f"; {d.world_size} process(es) x micro-batch {micro} x {accum} accumulation = "
           f"global batch {s.global_batch}; {max_steps} steps "
           f"({loader.steps_per_epoch() / accum:.3g} per epoch), peak lr {peak_lr:.3g}, "
           f"warmup {warmup}")
    log_path = os.path.join(s.out, "log.jsonl")
    if d.master:
        os.makedirs(s.out, exist_ok=True)
        _trim_log(log_path, step)

    def write_log(record):  # master only
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def evaluate_now():
        ev = evaluate(model, eval_set, micro, d, amp, s.seed, s.eval_samples)
        extra.setdefault("metrics", {})["eval_loss"] = ev["eval_loss"]
        if d.master:
            tqdm.write(f"step {step} | eval loss {ev['eval_loss']:.4f} (audio "
                       f"{loss_text(ev['eval_loss_audio'])}, image "
                       f"{loss_text(ev['eval_loss_image'])})", file=sys.stdout)
            write_log({"step": step, **ev})

    # the evaluation a stopped run left out at its last step is made up first
    if extra.pop("eval_due", None) == step and eval_set is not None:
        evaluate_now()  # and saved at once: a run stopped again must not make it up twice
        save_checkpoint(ckpt_path, d, model, optimizer, config, s, step, loader, generator, extra)
    if step >= max_steps:
        print0(f"{ckpt_path} is at step {step}, --max-steps is {max_steps}: nothing to do")
        return 0

    end = min(max_steps, step + s.run_steps) if s.run_steps > 0 else max_steps
    ddp = DDP(LossModule(model), device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    flops = model.flops_per_sample(train=True)
    peak = peak_tflops(d.device)
    stop = {"signal": False, "name": "", "number": 0, "at": 0.0}
    saved = step if os.path.exists(ckpt_path) else None  # the step the checkpoint on disk holds

    def on_signal(signum, frame):
        """SIGTERM and the first Ctrl-C: save at the end of this step and stop. A later Ctrl-C
        stops at once; one within a second of the first is taken for the same keypress, which
        a launcher may deliver twice (the terminal to its process group, then the launcher).
        torchrun sends its processes one SIGINT and kills them --shutdown-timeout seconds (30)
        later: the step and the save must fit in that."""
        if stop["signal"]:
            if signum == signal.SIGINT and time.monotonic() - stop["at"] > 1:
                raise KeyboardInterrupt
            return
        if signum == signal.SIGINT and d.master:
            tqdm.write("Ctrl-C: a checkpoint is saved at the end of this step (Ctrl-C again "
                       "stops at once, without saving)", file=sys.stderr)
        stop.update({"signal": True, "name": signal.Signals(signum).name, "number": signum,
                     "at": time.monotonic()})

    # handlers can only be set from the main thread (a test may call main() from another)
    previous = ({sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
                if threading.current_thread() is threading.main_thread() else {})
    bar = tqdm(total=max_steps, initial=step, disable=not (d.master and s.progress),
               dynamic_ncols=True, unit="step")
    try:
        while step < end:
            t0 = time.perf_counter()
            lr = lr_at(step, peak_lr, warmup, max_steps, s.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # per modality the summed loss and masked count (a micro-batch may mask none)
            sums = torch.zeros(4, dtype=torch.float64, device=d.device)
            for micro_step in range(accum):
                audio, image = (x.to(d.device, non_blocking=True) for x in loader.next())
                last = micro_step == accum - 1
                # gradients are all-reduced on the last micro-step only (build-nanogpt)
                with contextlib.nullcontext() if last else ddp.no_sync():
                    with autocast(d.device, amp):
                        loss_sum, st = ddp(audio, image, generator)
                    # the summed token losses: once the step's masked count is known (below),
                    # the gradient is scaled to Eq. 1's mean over all of them
                    loss_sum.backward()
                sums += masked_sums(st)
            # one small all-reduce: the step's loss sums and masked counts, and the stop request
            flags = torch.cat([sums, torch.tensor([float(stop["signal"])], dtype=torch.float64,
                                                  device=d.device)])
            dist.all_reduce(flags)
            sa, na, sv, nv, stop_votes = flags.tolist()
            loss_v = (sa + sv) / max(na + nv, 1)  # Eq. 1 over every masked token of the step
            loss_a, loss_i = (sa / na if na else None), (sv / nv if nv else None)
            stopping = stop_votes > 0
            if stopping:  # once: every rank takes the signal's number, for its exit code
                number = torch.tensor([int(stop["number"]) if stop["signal"] else 0],
                                      device=d.device)
                dist.all_reduce(number, op=dist.ReduceOp.MAX)
                stop["number"] = int(number.item())
                stop["name"] = signal.Signals(stop["number"]).name
            # DDP averaged the processes' gradients of their summed losses: world size / masked
            # tokens makes them the gradient of the global batch's mean, however it is split
            grad_norm = scale_and_clip_(model.parameters(), d.world_size / max(na + nv, 1),
                                        s.grad_clip)
            if not (math.isfinite(loss_v) and math.isfinite(grad_norm)):
                kept = (f"{ckpt_path} keeps step {saved}" if saved is not None
                        else "no checkpoint was written")
                print0(f"error: non-finite loss or gradient at step {step + 1} (loss {loss_v}, "
                       f"grad norm {grad_norm}); stopped without saving, {kept}; lower --lr or "
                       "check the data", file=sys.stderr)
                return 1
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if d.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            record = {"step": step, "loss": loss_v, "loss_audio": loss_a, "loss_image": loss_i,
                      "lr": lr, "grad_norm": grad_norm, "step_time": dt,
                      "samples_per_s": s.global_batch / dt}
            if peak:
                record["mfu"] = flops * s.global_batch / dt / (peak * 1e12 * d.world_size)
            extra.setdefault("metrics", {})["loss"] = loss_v
            if d.master and (step % s.log_every == 0 or step == end):
                mfu = f" | MFU {100 * record['mfu']:.1f}%" if peak else ""
                tqdm.write(f"step {step}/{max_steps} | loss {loss_v:.4f} (audio "
                           f"{loss_text(loss_a)}, image {loss_text(loss_i)}) | lr {lr:.3e} | "
                           f"grad norm {grad_norm:.3f} | {1000 * dt:.0f} ms | "
                           f"{record['samples_per_s']:.1f} samples/s{mfu}", file=sys.stdout)
                write_log(record)
            bar.update(1)
            at_end = step == end or stopping
            if eval_set is not None and ((s.eval_every and step % s.eval_every == 0)
                                         or step == end):
                if stopping:  # the save comes first: a grace period may not fit an eval
                    extra["eval_due"] = step  # made up by the run that resumes here
                else:
                    evaluate_now()
            if step % s.save_every == 0 or at_end:
                save_checkpoint(ckpt_path, d, model, optimizer, config, s, step, loader,
                                generator, extra)
                saved = step
            # a signal in the last step: the run is done, unless its evaluation was left out
            if stopping and (step < end or "eval_due" in extra):
                print0(f"stopped by {stop['name']} at step {step}; {ckpt_path} saved, continue "
                       "with --resume")
                return 128 + stop["number"]  # the shell's code for a signal: not "done"
        print0(f"done: {step} of {max_steps} steps, checkpoint {ckpt_path}")
        return 0
    finally:
        bar.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(run_cli(main))
