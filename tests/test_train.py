"""train.py: torchrun on gloo, exact resume, atomic checkpoints, SIGTERM, bad inputs (CPU)."""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from echoes import data
from echoes.model import Echoes, EchoesConfig

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("echoes_train", ROOT / "train.py")
trainer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(trainer)

# a model small enough that a step takes milliseconds; dropout on, so its RNG must resume too
TINY = json.dumps(dict(audio_len=12, image_len=16, audio_codebook=32, image_codebook=32,
                       enc_dim=32, enc_depth=1, enc_heads=2, dec_dim=32, dec_depth=1,
                       dec_heads=2, dropout=0.1))
TOKENIZERS = {"audio": {"n_samples": 22050, "n_frames": 64, "codebook": 32},
              "image": {"resolution": 32, "codebook": 32}}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 10)):
        image, audio = rng.integers(0, 32, (n, 3, 16)), rng.integers(0, 32, (n, 12))
        data.write_shards(root, split, image, audio, [f"{split}{i}" for i in range(n)],
                          [str(i % 3) for i in range(n)], shard_size=16,
                          meta={"tokenizers": TOKENIZERS})
    return root


def args(shards, out, *extra):
    return ["--data", str(shards), "--out", str(out), "--preset", "demo", "--model-overrides",
            TINY, "--global-batch", "8", "--micro-batch", "4", "--lr", "1e-3", "--no-progress",
            *extra]


def losses(out):
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    return [r["loss"] for r in records if "loss" in r]


def env1():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_torchrun_two_processes_on_gloo(shards, tmp_path):
    out = tmp_path / "run"  # on the CPU even where there is a GPU: two ranks need two GPUs
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), *args(shards, out, "--micro-batch", "2", "--max-steps", "3",
                                          "--eval-every", "2", "--save-every", "2",
                                          "--device", "cpu")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, env=env1())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) x micro-batch 2 x 2 accumulation = global batch 8" in proc.stdout
    assert proc.stdout.count("step 3/3") == 1  # rank 0 logs alone
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["rng"]["world_size"] == 2
    # index: 3 steps x micro-batch 2 x 2 ranks x 2 accumulation
    assert ckpt["data"] == {"epoch": 0, "index": 24, "clips": 40, "micro_batch": 2}
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 3]
    for key in ("loss", "loss_audio", "loss_image", "lr", "grad_norm", "step_time",
                "samples_per_s"):
        assert np.isfinite(records[0][key])
    ranks = ckpt["rng"]["ranks"]  # each rank's own streams: its own masks and dropout
    assert not torch.equal(ranks[0]["masking"], ranks[1]["masking"])
    assert not torch.equal(ranks[0]["torch"], ranks[1]["torch"])


def test_the_learning_rate_warms_up_linearly_then_falls_on_a_half_cosine():
    def lr(step):
        return trainer.lr_at(step, 1.0, 10, 110, min_ratio=0.1)

    assert [lr(0), lr(4), lr(9)] == pytest.approx([0.1, 0.5, 1.0])  # (step + 1) / warmup
    assert lr(10) == pytest.approx(1.0) and lr(110) == pytest.approx(0.1)
    assert lr(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: the cosine's middle
    assert lr(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    falling = [lr(k) for k in range(10, 111)]
    assert all(a >= b for a, b in zip(falling, falling[1:]))


def test_epochs_set_the_steps_and_the_warmup_is_2_5_percent_of_them(shards, tmp_path,
                                                                      one_thread):
    out = tmp_path / "run"  # 40 clips at global batch 8: 6.6 epochs are 33 steps, 1 warming up
    argv = args(shards, out, "--max-steps", "0", "--epochs", "6.6", "--eval-every", "0",
                "--save-every", "100")
    assert trainer.main(argv) == 0
    lrs = [r["lr"] for r in map(json.loads, open(out / "log.jsonl")) if "lr" in r]
    assert len(lrs) == 33
    assert lrs == pytest.approx([trainer.lr_at(k, 1e-3, 1, 33) for k in range(33)])


def test_more_ranks_than_gpus_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(trainer.UserError, match="--nproc_per_node=1 or fewer"):
        trainer.setup_distributed("auto")


def test_checkpoint_layout_and_exact_resume(shards, tmp_path, one_thread):
    straight, split = tmp_path / "straight", tmp_path / "split"
    # bitwise equal on the CPU; on a GPU, atomic adds in the backward passes make the sums'
    # order, and so the last bits, differ from run to run (measured on an H200: 2e-5 at step 6)
    common = ["--max-steps", "8", "--eval-every", "3", "--save-every", "100",
              "--repair-within-class", "--device", "cpu"]
    assert trainer.main(args(shards, straight, *common)) == 0
    assert trainer.main(args(shards, split, *common, "--run-steps", "4")) == 0
    assert torch.load(split / "ckpt.pt", weights_only=True)["step"] == 4
    assert trainer.main(args(shards, split, *common, "--resume")) == 0
    assert losses(straight) == losses(split) and len(losses(split)) == 8
    a = torch.load(straight / "ckpt.pt", weights_only=True)
    b = torch.load(split / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 8 and a["data"] == b["data"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert {"model", "config", "settings", "optimizer", "step", "data", "rng", "tokenizers",
            "metrics"} <= set(a)
    assert a["tokenizers"] == TOKENIZERS and a["settings"]["global_batch"] == 8
    assert set(a["rng"]["ranks"][0]) == {"torch", "cuda", "python", "masking"}
    model = Echoes(EchoesConfig(**a["config"]))  # the checkpoint alone rebuilds the model
    model.load_state_dict(a["model"])
    # --resume at --max-steps has nothing left to do
    assert trainer.main(args(shards, split, *common, "--resume")) == 0


def test_a_killed_save_keeps_the_previous_checkpoint(shards, tmp_path, monkeypatch, one_thread):
    out = tmp_path / "run"
    assert trainer.main(args(shards, out, "--max-steps", "1", "--eval-every", "0")) == 0
    real_replace = os.replace

    def killed(src, dst):  # the temp file is complete; the process dies before the rename
        if str(dst).endswith("ckpt.pt"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.main(args(shards, out, "--max-steps", "3", "--save-every", "1", "--resume",
                          "--eval-every", "0"))
    monkeypatch.setattr(os, "replace", real_replace)
    ckpt = trainer.load_checkpoint(out / "ckpt.pt")
    assert ckpt["step"] == 1
    assert sorted(os.listdir(out)) == ["ckpt.pt", "log.jsonl"]  # no temp file left behind


def test_a_non_finite_loss_stops_and_keeps_the_last_checkpoint(shards, tmp_path, capsys,
                                                               one_thread):
    out = tmp_path / "run"
    code = trainer.main(args(shards, out, "--max-steps", "10", "--save-every", "1", "--lr", "1e30",
                             "--warmup-steps", "0", "--grad-clip", "0", "--eval-every", "0"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "non-finite loss or gradient at step" in err[0]
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert f"keeps step {step}" in err[0]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])  # SIGINT: Ctrl-C
def test_sigterm_and_ctrl_c_save_and_exit(shards, tmp_path, sig):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"),
                             *args(shards, out, "--max-steps", "100000", "--save-every", "100000",
                                   "--eval-every", "0")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env1())
    deadline = time.time() + 120
    while not (out / "log.jsonl").exists() or not losses(out):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.2)
    proc.send_signal(getattr(signal, sig))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + getattr(signal, sig), stderr[-2000:]  # saved, but not done
    assert f"stopped by {sig}" in stdout
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == len(losses(out)) >= 1


@pytest.mark.parametrize("case, message", [
    ("no data", "is not a folder"),
    ("zero batch", "--global-batch must be at least 1, got 0"),
    ("infinite epochs", "--epochs must be a finite number, got inf"),
    ("negative micro batch", "--micro-batch must be at least 0, got -2"),
    ("empty data", "no token shards"),
    ("batch split", "impossible batch split"),
    ("wrong preset", "pick the matching --preset"),
    ("unknown override", "unknown field"),
    ("existing run", "pass --resume"),
    ("other model", "another model configuration"),
    ("bigger codebook", "set image_codebook to 32 in --model-overrides"),
    ("impossible override", "--model-overrides: enc_dim 32 is not divisible by enc_heads 3"),
    ("negative lr", "--lr must be at least 0, got -1.0"),
    ("beta", "--beta1 must be in [0, 1), got 1.5"),
    ("floor above peak", "--min-lr-ratio must be in [0, 1], got 5.0"),
    ("device", "--device 'tpu': use auto, cpu or cuda"),
    ("out is a file", "is not a folder; give a folder"),
    ("checkpoint that does not fit", "does not fit this run (RuntimeError"),
    ("damaged step", "holds step -5, not a count of steps"),
    ("nan weights", "holds nan or inf weights (mask_emb)"),
    ("negative seed", "--seed must be in [0, 2**32), got -1"),
    ("ids past the codebook", "hold image id 40, the model's codebook has 32 codes"),
])
def test_bad_inputs_are_one_line_errors(shards, tmp_path, capsys, monkeypatch, case, message,
                                        one_thread):
    out = tmp_path / "run"
    argv = args(shards, out, "--max-steps", "1", "--eval-every", "0")
    damaged = ("checkpoint that does not fit", "damaged step", "nan weights")
    if case in ("existing run", "other model") + damaged:
        assert trainer.main(argv) == 0
        capsys.readouterr()
    if case in damaged:
        ckpt = torch.load(out / "ckpt.pt", weights_only=True)
        if case == "checkpoint that does not fit":
            ckpt["model"].pop("mask_emb")
        elif case == "damaged step":
            ckpt["step"] = -5
        else:
            ckpt["model"]["mask_emb"][0] = float("nan")
        torch.save(ckpt, out / "ckpt.pt")
    if case == "out is a file":
        out.write_text("not a folder")
    if case == "ids past the codebook":  # shards without tokenizer records, ids up to 40
        rng = np.random.default_rng(0)
        data.write_shards(tmp_path / "wide", "train", np.full((8, 3, 16), 40),
                          rng.integers(0, 32, (8, 12)), [str(i) for i in range(8)], [""] * 8)
    argv = {
        "no data": argv + ["--data", str(tmp_path / "missing")],
        "empty data": argv + ["--data", str(tmp_path)],
        "batch split": argv + ["--global-batch", "10"],
        "zero batch": argv + ["--global-batch", "0"],
        "infinite epochs": argv + ["--epochs", "inf", "--max-steps", "0"],
        "negative micro batch": argv + ["--micro-batch", "-2"],
        "wrong preset": [a for a in argv if a != TINY and a != "--model-overrides"],
        "unknown override": argv + ["--model-overrides", '{"depth": 3}'],
        "existing run": argv,
        "other model": argv + ["--resume", "--model-overrides",
                               TINY.replace('"enc_depth": 1', '"enc_depth": 2')],
        "bigger codebook": argv + ["--model-overrides",
                                   TINY.replace('"image_codebook": 32', '"image_codebook": 64')],
        "impossible override": argv + ["--model-overrides",
                                       TINY.replace('"enc_heads": 2', '"enc_heads": 3')],
        "negative lr": argv + ["--lr", "-1"],
        "beta": argv + ["--beta1", "1.5"],
        "floor above peak": argv + ["--min-lr-ratio", "5"],
        "device": argv + ["--device", "tpu"],
        "out is a file": argv,
        "checkpoint that does not fit": argv + ["--resume", "--max-steps", "2"],
        "damaged step": argv + ["--resume", "--max-steps", "2"],
        "nan weights": argv + ["--resume", "--max-steps", "2"],
        "negative seed": argv + ["--seed", "-1"],
        "ids past the codebook": argv + ["--data", str(tmp_path / "wide")],
    }[case]
    with pytest.raises(SystemExit) as e:
        trainer.run_cli(trainer.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err
    if case in ("no data", "existing run", "other model", "checkpoint that does not fit"):
        # under torchrun the other processes of the node find the same problem and keep quiet
        monkeypatch.setenv("LOCAL_RANK", "1")
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(SystemExit) as e:
            trainer.run_cli(trainer.main, argv)
        assert e.value.code == 2 and capsys.readouterr().err == ""


def test_only_the_first_process_of_a_node_prints_node_wide_errors(monkeypatch, capsys):
    def fails(node_wide):
        def main(argv):
            raise trainer.UserError("a problem", node_wide=node_wide)
        return main
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    for node_wide, printed in ((True, ""), (False, "error: a problem\n")):
        with pytest.raises(SystemExit) as e:
            trainer.run_cli(fails(node_wide))
        assert e.value.code == 2 and capsys.readouterr().err == printed
    with pytest.raises(SystemExit) as e:  # argparse's errors and --help alike
        trainer.main(["--no-such-flag"])
    assert e.value.code == 2 and capsys.readouterr().err == ""
    for local, world in (("0", "8"), ("3", "1")):  # the first process; LOCAL_RANK alone
        monkeypatch.setenv("LOCAL_RANK", local)
        monkeypatch.setenv("WORLD_SIZE", world)
        with pytest.raises(SystemExit) as e:
            trainer.main(["--no-such-flag"])
        assert e.value.code == 2
        assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_a_checkpoint_from_before_a_new_config_field_resumes(shards, tmp_path, one_thread):
    out = tmp_path / "run"
    assert trainer.main(args(shards, out, "--max-steps", "1", "--eval-every", "0")) == 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    del ckpt["config"]["null_condition_prob"]  # what an older version wrote
    torch.save(ckpt, out / "ckpt.pt")
    assert trainer.main(args(shards, out, "--max-steps", "2", "--eval-every", "0",
                             "--resume")) == 0


def records(out):
    return [json.loads(line) for line in open(out / "log.jsonl")]


def timeless(records):
    return [{k: v for k, v in r.items() if k not in ("step_time", "samples_per_s")}
            for r in records]


@pytest.mark.parametrize("stop_in", [2, 4])  # a step in the middle, the last step
def test_an_eval_a_signal_left_out_is_made_up_on_resume(shards, tmp_path, monkeypatch, stop_in,
                                                         one_thread):
    straight, out = tmp_path / "straight", tmp_path / "run"
    common = ["--max-steps", "4", "--eval-every", "2", "--save-every", "100", "--device", "cpu"]
    assert trainer.main(args(shards, straight, *common)) == 0
    real = trainer.lr_at

    def lr_at(step, *rest):  # SIGTERM arrives while step `stop_in` runs
        if step + 1 == stop_in:
            signal.raise_signal(signal.SIGTERM)
        return real(step, *rest)

    monkeypatch.setattr(trainer, "lr_at", lr_at)
    # also in the last step: the run stops, its evaluation left to the resumed run
    assert trainer.main(args(shards, out, *common)) == 143
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == stop_in and ckpt["eval_due"] == stop_in
    assert [r["step"] for r in records(out) if "eval_loss" in r] == [2] * (stop_in == 4)

    def crash(step, *rest):  # the resumed run dies right after making the evaluation up
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "lr_at", crash)
    if stop_in < 4:
        with pytest.raises(KeyboardInterrupt):
            trainer.main(args(shards, out, *common, "--resume"))
        assert "eval_due" not in torch.load(out / "ckpt.pt", weights_only=True)  # saved at once
    monkeypatch.setattr(trainer, "lr_at", real)
    assert trainer.main(args(shards, out, *common, "--resume")) == 0
    assert timeless(records(out)) == timeless(records(straight))  # the eval at step 2 too
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert "eval_due" not in ckpt and ckpt["metrics"]["eval_loss"] == records(out)[-1]["eval_loss"]


def test_a_resume_takes_this_runs_optimizer_settings_and_says_when_the_data_grew(
        shards, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    assert trainer.main(args(shards, out, "--max-steps", "1", "--eval-every", "0")) == 0
    more = tmp_path / "more"  # the same clips and 8 more
    rng = np.random.default_rng(0)
    image, audio = rng.integers(0, 32, (48, 3, 16)), rng.integers(0, 32, (48, 12))
    data.write_shards(more, "train", image, audio, [f"train{i}" for i in range(48)],
                      ["0"] * 48, meta={"tokenizers": TOKENIZERS})
    argv = args(more, out, "--max-steps", "2", "--eval-every", "0", "--resume",
                "--weight-decay", "0.3", "--beta2", "0.99")
    capsys.readouterr()
    assert trainer.main(argv) == 0
    printed = capsys.readouterr().out
    assert "the 'train' split had 40 clips at the checkpoint, now 48" in printed
    assert "micro-batches of" not in printed
    groups = torch.load(out / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [(g["weight_decay"], tuple(g["betas"])) for g in groups] == [(0.3, (0.9, 0.99)),
                                                                        (0.0, (0.9, 0.99))]
    # another micro-batch: the same data position, but the draws differ, and it says so
    argv = [a if a != "4" else "2" for a in args(more, out, "--max-steps", "3", "--eval-every",
                                                 "0", "--resume")]
    assert trainer.main(argv) == 0
    assert ("the checkpoint ran micro-batches of 4, this run 2: frame and mask draws follow the "
            "micro-batches, so the resume is not exact") in capsys.readouterr().out


def test_weight_decay_follows_mage_and_older_optimizer_states_resume(shards, tmp_path, capsys,
                                                                     one_thread):
    model = Echoes(EchoesConfig(**json.loads(TINY)))
    decayed, other = trainer.decay_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {"audio_embed.weight", "enc_pos_audio", "dec_modality", "mask_emb",
            "encoder.0.attn.qkv.weight"} <= {names[id(p)] for p in decayed}
    assert {names[id(p)] for p in other} == {n for n in names.values()
                                             if n.endswith("bias") or ".norm" in n
                                             or n.startswith(("enc_norm", "dec_norm"))}
    linear = [len(g) for g in trainer.decay_groups(model, "linear")]
    assert linear[0] == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    # a checkpoint grouped the other way resumes with its own grouping, which it records
    out = tmp_path / "run"
    assert trainer.main(args(shards, out, "--max-steps", "1", "--eval-every", "0",
                             "--decay-group", "linear")) == 0
    capsys.readouterr()
    assert trainer.main(args(shards, out, "--max-steps", "2", "--eval-every", "0",
                             "--resume")) == 0
    assert "grouped by --decay-group linear, not mage" in capsys.readouterr().out
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert [len(g["params"]) for g in ckpt["optimizer"]["param_groups"]] == linear
    assert ckpt["settings"]["decay_group"] == "linear"


def test_a_checkpoint_from_a_gpu_resumes_on_the_cpu_with_fresh_streams(shards, tmp_path, capsys,
                                                                        one_thread):
    out = tmp_path / "run"
    assert trainer.main(args(shards, out, "--max-steps", "1", "--eval-every", "0")) == 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["rng"]["ranks"][0]["masking"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's
    for group in ckpt["optimizer"]["param_groups"]:
        group["fused"] = True  # a GPU run's AdamW
    torch.save(ckpt, out / "ckpt.pt")
    capsys.readouterr()
    assert trainer.main(args(shards, out, "--max-steps", "2", "--eval-every", "0",
                             "--resume")) == 0
    assert "random states are not of cpu streams: random streams are re-seeded" in \
        capsys.readouterr().out
    groups = torch.load(out / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"]
    assert not any(group["fused"] for group in groups)  # this device's AdamW, not the saved one


SAME_MASKS = """
import torch
from echoes import data
from echoes.model import Echoes

# the same corruption and frame for a clip however the step is split: masks drawn from a
# generator seeded by the clip's audio ids, and every clip's first frame
training_loss = Echoes.training_loss


def keyed_loss(self, audio_ids, image_ids, generator=None, reduction="mean"):
    weights = torch.arange(1, audio_ids.shape[1] + 1, device=audio_ids.device)
    gens = [torch.Generator().manual_seed(int((row * weights).sum())) for row in audio_ids]
    return training_loss(self, audio_ids, image_ids, gens, reduction)


fetch = data.TokenShards.fetch
Echoes.training_loss = keyed_loss
data.TokenShards.fetch = lambda self, idx, frames=None, image_indices=None: fetch(
    self, idx, frames=[0] * len(idx), image_indices=image_indices)
"""


def test_the_gradient_is_the_global_batch_mean_however_the_step_is_split(shards, tmp_path):
    """Eq. 1 averages over every masked token of the batch: with the same masks, one process
    with one micro-batch of 8, one with 4 micro-batches of 2 and two processes with 2 each log
    the same first-step loss and gradient norm (a mean per micro-batch, averaged, would weight a
    micro-batch's tokens by 1 / its masked count: here the split runs' norms were then 1.9%
    above the whole batch's, 0.6085 against 0.5971)."""
    (tmp_path / "same_masks.py").write_text(SAME_MASKS)
    (tmp_path / "run_train.py").write_text(
        "import runpy, sys\nsys.path.insert(0, sys.argv.pop(1))\nimport same_masks\n"
        f"runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')\n")
    no_dropout = TINY.replace('"dropout": 0.1', '"dropout": 0.0')
    runs = {"8": [], "2x4": ["--micro-batch", "2"], "2 ranks x 2x2": ["--micro-batch", "2"]}
    first = {}
    for name, extra in runs.items():
        out = tmp_path / name.replace(" ", "_")
        argv = [a if a != TINY else no_dropout for a in args(shards, out, "--max-steps", "1",
                                                              "--eval-every", "0",
                                                              "--micro-batch", "8", *extra)]
        ranks = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] \
            if "ranks" in name else []
        proc = subprocess.run([sys.executable, *ranks, str(tmp_path / "run_train.py"),
                               str(tmp_path), *argv, "--device", "cpu"], capture_output=True,
                              text=True, timeout=240, cwd=ROOT, env=env1())
        assert proc.returncode == 0, proc.stderr[-3000:]
        first[name] = json.loads(open(out / "log.jsonl").readline())
    for name in runs:
        for key in ("loss", "loss_audio", "loss_image", "grad_norm"):
            assert first[name][key] == pytest.approx(first["8"][key], rel=1e-4), (name, key)


@pytest.mark.parametrize("max_norm", [0.0, 1e-3, 100.0])  # off, clipping, not reached
def test_scaling_summed_gradients_equals_clipping_the_mean_loss(max_norm):
    """What the optimizer gets: the gradient of the summed token loss times 1 / tokens and
    clipped in one multiply, as clip_grad_norm_ clips the gradient of the mean loss."""
    torch.manual_seed(0)
    x, y = torch.randn(37, 5), torch.randn(37, 3)
    nets = [torch.nn.Linear(5, 3) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    ((nets[0](x) - y) ** 2).sum().backward()
    norm = trainer.scale_and_clip_(list(nets[0].parameters()), 1 / 37, max_norm)
    ((nets[1](x) - y) ** 2).mean(0).sum().backward()  # mean over the 37 rows
    expected = (torch.nn.utils.clip_grad_norm_(nets[1].parameters(), max_norm) if max_norm
                else torch.linalg.vector_norm(torch.cat([p.grad.flatten()
                                                         for p in nets[1].parameters()])))
    assert norm == pytest.approx(float(expected), rel=1e-5)
    for ours, theirs in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad)


def test_per_modality_losses_are_means_over_the_masked_tokens(shards, tmp_path, one_thread):
    """Every sample masks one modality fully and shows the other (full_mask_prob 1), so each
    micro-batch of one masks a single modality: the log's per-modality losses must not average
    in the micro-batches that masked none of it."""
    out = tmp_path / "run"
    overrides = TINY.replace('"dropout": 0.1', '"dropout": 0.1, "full_mask_prob": 1.0')
    argv = [a if a != TINY else overrides for a in args(shards, out, "--max-steps", "1",
                                                         "--eval-every", "0")]
    assert trainer.main([*argv, "--micro-batch", "1"]) == 0
    record = json.loads(open(out / "log.jsonl").readline())
    # at initialisation every loss is near ln(32) = 3.47 (half of it, averaging in zeros)
    assert 3.0 < record["loss_audio"] < 4.0 and 3.0 < record["loss_image"] < 4.0


def test_a_checkpoint_short_of_rank_states_is_refused_alike_on_every_rank(shards, tmp_path,
                                                                         one_thread):
    out = tmp_path / "run"
    assert trainer.main(args(shards, out, "--max-steps", "1", "--eval-every", "0")) == 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["rng"]["world_size"] = 2  # rank 0's state is there, rank 1's is not
    torch.save(ckpt, out / "ckpt.pt")
    s = trainer.parse_settings(trainer.Settings, args(shards, out, "--max-steps", "2",
                                                      "--resume"))
    d = trainer.Dist(0, 0, 2, torch.device("cpu"), True)  # rank 0, which would find its state
    model = trainer.Echoes(trainer.resolve_config(s))
    optimizer = trainer.configure_optimizer(model, 1e-3, 0.0, (0.9, 0.95), "cpu")
    loader = trainer.data.ShardLoader(trainer.data.TokenShards(shards, "train", train=True), 2,
                                      0, 2, 0)
    with pytest.raises(trainer.UserError, match="1 ranks' states for 2 ranks"):
        trainer.resume(ckpt, out / "ckpt.pt", s, d, model.config, model, optimizer, loader,
                       torch.Generator())


def test_resuming_on_shards_of_another_codebook_is_refused():
    ckpt = {"image": {"fingerprint": "a" * 16}, "audio": {"fingerprint": "b" * 16}}
    trainer.check_same_codebooks(ckpt, {"image": {"fingerprint": "a" * 16}, "audio": {}}, "c", "d")
    trainer.check_same_codebooks(None, ckpt, "c", "d")  # records from before fingerprints
    with pytest.raises(trainer.UserError, match="another audio VQGAN than d's \\(codebook b+ "
                                                "there, c+ here\\)"):
        trainer.check_same_codebooks(ckpt, {**ckpt, "audio": {"fingerprint": "c" * 16}}, "c", "d")


def test_fewer_samples_than_processes_or_an_uneven_split_is_a_one_line_error(shards, tmp_path):
    s = trainer.parse_settings(trainer.Settings, args(shards, tmp_path / "run", "--global-batch",
                                                      "4", "--micro-batch", "0"))
    with pytest.raises(trainer.UserError, match="--global-batch 4 is smaller than the 8 "
                                                "processes; give every process at least one"):
        trainer.check_settings(s, 8)
    s.global_batch = 7  # split by the run itself: 3 per process, one sample left over
    with pytest.raises(trainer.UserError, match="--global-batch 7 does not divide evenly over 2 "
                                                "processes; give a multiple of 2"):
        trainer.check_settings(s, 2)


def test_the_eval_loss_does_not_depend_on_processes_or_batch_size(shards, monkeypatch):
    """Each clip's corruption comes from its own generator: one process with batches of 4 and
    two ranks with batches of 3 (their sums added as the all-reduce would) give one loss."""
    config = EchoesConfig.demo(**json.loads(TINY))
    torch.manual_seed(0)
    model = Echoes(config)
    ds = data.TokenShards(shards, "test", train=False)
    totals = []
    monkeypatch.setattr(trainer.dist, "all_reduce", lambda t: totals.append(t.clone()))
    one = trainer.evaluate(model, ds, 4, trainer.Dist(0, 0, 1, torch.device("cpu"), True),
                           "fp32", 3)
    totals.clear()
    for rank in range(2):
        trainer.evaluate(model, ds, 3, trainer.Dist(rank, rank, 2, torch.device("cpu"), True),
                         "fp32", 3)
    sa, na, sv, nv = (totals[0] + totals[1]).tolist()
    assert one["eval_loss"] == pytest.approx((sa + sv) / (na + nv), rel=1e-5)
    assert one["eval_loss_audio"] == pytest.approx(sa / na, rel=1e-5)
    # each clip's masks are its own: clip i's generator is the sampler's sample i of the seed
    masks, draw = [], Echoes.draw_corruption

    def recording(self, B, device, generator=None):
        out = draw(self, B, device, generator)
        if isinstance(generator, list):  # a batch's call (it calls itself once per clip)
            masks.append(out[0])  # (B, La) audio masks
        return out

    monkeypatch.setattr(Echoes, "draw_corruption", recording)
    trainer.evaluate(model, ds, 4, trainer.Dist(0, 0, 1, torch.device("cpu"), True), "fp32", 3,
                     limit=5)
    got = torch.cat(masks)  # (5, La)
    assert len(got) == 5 and len({tuple(m.tolist()) for m in got}) > 1
    want = [draw(model, 1, "cpu", trainer.sample_generators(3, 1, offset=i))[0][0]
            for i in range(5)]
    assert torch.equal(got, torch.stack(want))


def test_an_eval_split_without_masked_tokens_of_a_modality_says_n_a(monkeypatch):
    class NoImageMasked(torch.nn.Module):
        def training_loss(self, audio, image, generator):
            return None, {"loss_audio": torch.tensor(2.0), "masked_audio": torch.tensor(3),
                          "loss_image": torch.tensor(0.0), "masked_image": torch.tensor(0)}

    monkeypatch.setattr(trainer.data, "eval_batches", lambda *a: [(np.arange(1),
                                                                   torch.zeros(1, 4),
                                                                   torch.zeros(1, 2))])
    monkeypatch.setattr(trainer.dist, "all_reduce", lambda t: t)
    d = trainer.Dist(0, 0, 1, torch.device("cpu"), True)
    ev = trainer.evaluate(NoImageMasked(), None, 1, d, "fp32", 0)
    assert ev == {"eval_loss": 2.0, "eval_loss_audio": 2.0, "eval_loss_image": None}


def test_a_resumed_run_removes_the_temp_file_of_a_killed_save(shards, tmp_path, one_thread):
    out = tmp_path / "run"
    assert trainer.main(args(shards, out, "--max-steps", "1", "--eval-every", "0")) == 0
    (out / ".echoes-tmp-abc123").write_bytes(b"half a checkpoint")  # what a SIGKILL mid-save leaves
    os.utime(out / ".echoes-tmp-abc123", (0, 0))  # its writer is gone: unlocked, and not new
    assert trainer.main(args(shards, out, "--max-steps", "2", "--eval-every", "0",
                             "--resume")) == 0
    assert sorted(os.listdir(out)) == ["ckpt.pt", "log.jsonl"]


def test_ranks_that_read_different_checkpoints_stop(shards, tmp_path):
    """Two ranks, each with its own --out (what a folder not shared between nodes looks like):
    one finds a checkpoint, the other none."""
    script = tmp_path / "own_out.py"
    script.write_text(
        "import os, runpy, sys\n"
        "sys.argv[sys.argv.index('--out') + 1] += os.environ['RANK']\n"
        f"runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')\n")
    common = args(shards, tmp_path / "run", "--micro-batch", "2", "--eval-every", "0",
                  "--device", "cpu", "--resume")
    assert trainer.main(args(shards, tmp_path / "run0", "--micro-batch", "4", "--max-steps",
                             "1", "--eval-every", "0", "--device", "cpu")) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), *common, "--max-steps", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, env=env1())
    assert proc.returncode != 0
    assert "the processes found checkpoints of different steps" in proc.stderr
