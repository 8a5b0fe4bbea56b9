"""Quality benchmark of the embedded demo ("shapes and tones", echoes/shapes.py).

Everything is scored on a held-out test set: items 0 .. n-1 of the generator's TEST_SEED, a seed
that training, tokenizer training and tuning never use (echoes/demo.py). Generated images and
mels are read back by the plain-signal readers of echoes/shapes.py (`read_image`, `read_mel`);
a sample is right when the reader finds the class of its condition.

Rows of the one table:
- i2a: audio from the test images, with the bundle's tuned settings, without CFG (s = 1) and
  with the paper's s = 3: colour, shape and both right;
- a2i: images from the test clips (colour, shape, both);
- joint: pairs from nothing; consistency = the image's class equals the audio's;
- inpaint: 0.5-1.0 s of each test clip regenerated given its image and the rest of the clip,
  with the stretch silenced in the mel before encoding (the paper's way, sample.py
  --hide-region) and with the whole clip encoded (sample.py's default for the demo);
  consistency = the clip's class after inpainting is the image's;
- FD: Frechet distance between Gaussians fitted to per-clip log-mel statistics (the mean and
  the standard deviation over time of each of the 80 bands of the [0, 1] SpecVQGAN mel, which is
  a log scale: 160 numbers per clip) of generated and real test audio; the row "tokenizer
  reconstruction" is the floor the audio tokenizer alone sets;
- ablation in the shape of the paper's Table 2: i2a over N (steps), T (choice temperature) and
  CFG at inference (s = 3 or none), on the first --n-ablation test items.

    python bench/quality.py                       # 2.5-4 min on 2 CPU cores
    python bench/quality.py --out quality.md      # also write the table as markdown
"""

import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from echoes import checkpoint, demo, sampler  # noqa: E402
from echoes.demo_scoring import (decode_items, encode_items, eval_a2i, eval_i2a,  # noqa: E402
                                 eval_joint, generate_ids, score)
from echoes.metrics import frechet_distance  # noqa: E402
from echoes.cli import (check_at_least, check_out_file, parse_settings, pick_device,  # noqa: E402
                        run_cli, setting, write_text)


@dataclasses.dataclass
class Settings:
    """`bench/quality.py` settings (each one is a --flag; see --help)."""
    bundle: str = setting(str(checkpoint.DEMO_BUNDLE), "the demo bundle to score")
    n: int = setting(96, "test pairs for the main rows (8 per class)")
    n_ablation: int = setting(48, "test pairs per ablation row (4 per class)")
    n_joint: int = setting(96, "pairs generated from nothing for joint consistency")
    seed: int = setting(0, "sampling seed (sample i draws from stream (seed, i))")
    ablation: bool = setting(True, "run the N / T / CFG ablation rows")
    device: str = setting("auto", "auto (a GPU when present), cpu or cuda")
    threads: int = setting(0, "CPU threads (0 = torch's default)")
    out: str = setting("", "also write the table as markdown to this file")


# -----------------------------------------------------------------------------
# log-mel statistics (their Frechet distance: echoes/metrics.py)


def logmel_stats(mels):
    """[0, 1] mels (N, 80, T) (a log scale) -> (N, 160): per band, the mean and the standard
    deviation over time."""
    m = np.asarray(mels, dtype=np.float64)
    return np.concatenate([m.mean(-1), m.std(-1)], axis=1)


# -----------------------------------------------------------------------------
# the rows


def row(name, opts, acc=None, fd=None, n=0, note=""):
    return {"name": name, "N": opts.get("steps", ""), "T": opts.get("temperature", ""),
            "s": opts.get("guidance", ""), "tT": opts.get("token_temperature", ""),
            "colour": None if acc is None else acc.get("colour"),
            "shape": None if acc is None else acc.get("shape"),
            "both": None if acc is None else acc.get("both"), "fd": fd, "n": n, "note": note}


def fmt(x, pct=True):
    if x is None or x == "":
        return ""
    if isinstance(x, float) and pct:
        return f"{100 * x:.1f}"
    return f"{x:g}" if isinstance(x, float) else str(x)


def table(rows, header):
    cols = ["experiment", "N", "T", "s", "token T", "colour %", "shape %", "both % / consistency %",
            "FD", "n", "note"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join([r["name"], fmt(r["N"]), fmt(r["T"], False),
                                         fmt(r["s"], False), fmt(r["tT"], False),
                                         fmt(r["colour"]), fmt(r["shape"]), fmt(r["both"]),
                                         "" if r["fd"] is None else f"{r['fd']:.3f}", str(r["n"]),
                                         r["note"]]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    s = parse_settings(Settings, argv, description=" ".join(__doc__.split("\n\n")[0].split()))
    check_at_least(s, {"n": 12, "n_ablation": 12, "n_joint": 12, "threads": 0})  # 12 classes
    if s.out:
        check_out_file(s.out)
    if s.threads:
        torch.set_num_threads(s.threads)
    device = pick_device(s.device)
    t_start = time.time()
    model, image_tok, audio_tok, bundle = checkpoint.load_for_sampling(s.bundle, device,
                                                                       what="demo bundle")
    i2a = checkpoint.stored_sampling(bundle, "i2a")
    a2i = checkpoint.stored_sampling(bundle, "a2i")
    n_max = max(s.n, s.n_ablation)
    labels, images, mels = demo.make_set(n_max, demo.TEST_SEED, progress=True)
    image_ids = encode_items("image", image_tok, images)
    audio_ids = encode_items("audio", audio_tok, mels)
    n = s.n
    rows = []
    real_stats = logmel_stats(mels[:n])

    def log(r):
        rows.append(r)
        print(f"{r['name']:<34} N={r['N']} T={r['T']} s={r['s']} tT={r['tT']}: colour "
              f"{fmt(r['colour'])} shape {fmt(r['shape'])} both {fmt(r['both'])} "
              f"FD {'' if r['fd'] is None else round(r['fd'], 3)} ({time.time() - t_start:.0f} s)",
              flush=True)

    # the tokenizers alone: reconstructions of the real test items
    rec_mels = decode_items("audio", audio_tok, audio_ids[:n])
    acc, _ = score("audio", rec_mels, labels[:n])
    log(row("audio tokenizer reconstruction", {}, acc,
            frechet_distance(logmel_stats(rec_mels), real_stats), n, "floor of FD"))
    acc, _ = score("image", decode_items("image", image_tok, image_ids[:n]), labels[:n])
    log(row("image tokenizer reconstruction", {}, acc, None, n))

    def variants(mode, tuned, other_s):
        """The tuned settings, and the same with CFG switched off or on (s = other_s)."""
        cfg = "no CFG" if tuned["guidance"] == 1 else f"CFG s = {tuned['guidance']:g}"
        alt = {**tuned, "guidance": 1.0 if tuned["guidance"] != 1 else other_s}
        alt_name = "no CFG" if alt["guidance"] == 1 else f"CFG s = {other_s:g}"
        return [(f"{mode}, tuned ({cfg})", tuned), (f"{mode}, {alt_name}", alt)]

    # image -> audio: with and without CFG (the paper's s = 3)
    for name, opts in variants("i2a", i2a, 3.0):
        acc, _, gen = eval_i2a(model, image_tok, audio_tok, image_ids[:n], labels[:n],
                               dict(opts), s.seed)
        log(row(name, opts, acc, frechet_distance(logmel_stats(gen), real_stats), n))

    # audio -> image (the paper uses no CFG here)
    for name, opts in variants("a2i", a2i, 2.0):
        acc, _, _ = eval_a2i(model, image_tok, audio_tok, audio_ids[:n], labels[:n],
                             dict(opts), s.seed)
        log(row(name, opts, acc, None, n))

    # joint: both modalities from nothing; consistency = image class == audio class
    joint = {k: v for k, v in checkpoint.stored_sampling(bundle, "joint").items()
             if k != "guidance"}
    acc, read_a, _, _ = eval_joint(model, image_tok, audio_tok, s.n_joint, joint, s.seed)
    classes = len(set(read_a[read_a >= 0].tolist()))
    log(row("joint consistency", joint, acc, None, s.n_joint,
            f"{classes} of 12 classes among the clips"))

    # audio inpainting: 0.5-1.0 s regenerated given the image and the rest of the clip
    duration = audio_tok.n_samples / audio_tok.sample_rate
    keep = sampler.audio_keep_outside(0.5, 1.0, audio_tok.grid, duration,
                                      audio_tok.column_edges())
    inp = checkpoint.stored_sampling(bundle, "inpaint")
    # the stretch silenced in the mel before encoding (paper Sec. 5, sample.py --hide-region),
    # and the whole clip encoded (sample.py's default for the demo)
    hidden = sampler.hidden_columns(keep, audio_tok.grid)
    shown = audio_tok.silence_columns(torch.as_tensor(mels[:n]), hidden).numpy()
    for name, ids in (("stretch silenced", encode_items("audio", audio_tok, shown)),
                      ("whole clip encoded", audio_ids[:n])):
        audio_in, _ = generate_ids(model, "inpaint", dict(inp), s.seed, audio_ids=ids,
                                   image_ids=image_ids[:n], audio_keep=keep)
        acc, _ = score("audio", decode_items("audio", audio_tok, audio_in), labels[:n])
        log(row(f"inpaint consistency (0.5-1.0 s, {name})", inp, acc, None, n,
                f"{int((~keep).sum())} of {keep.numel()} audio tokens regenerated"))

    # ablation, the shape of the paper's Table 2: N, T, CFG at inference (s = 3)
    abl = []
    if s.ablation:
        na = s.n_ablation
        real_a = logmel_stats(mels[:na])
        for steps in (8, 15, 30):
            for temperature in (4.5, 9.0):
                for guidance in (1.0, 3.0):
                    opts = {**i2a, "steps": steps, "temperature": temperature,
                            "guidance": guidance}
                    acc, _, gen = eval_i2a(model, image_tok, audio_tok, image_ids[:na],
                                           labels[:na], dict(opts), s.seed)
                    r = row("ablation i2a" + (", CFG" if guidance != 1 else ""), opts, acc,
                            frechet_distance(logmel_stats(gen), real_a), na)
                    log(r)
                    abl.append(r)
        rows = [r for r in rows if r not in abl] + abl

    minutes = (time.time() - t_start) / 60
    header = (f"Demo quality on {n} held-out test pairs (generator seed {demo.TEST_SEED}), "
              f"bundle {Path(s.bundle).name} ({Path(s.bundle).stat().st_size / 2**20:.2f} MiB, "
              f"model trained {bundle.get('demo', {}).get('model_steps', '?')} steps); "
              f"{minutes:.1f} min on {device.type} with {torch.get_num_threads()} threads. "
              "Percentages are read back by echoes/shapes.py; chance is 25% colour, 33% shape, "
              "8.3% both. 'both' is joint / inpaint consistency on those rows.")
    text = table(rows, header)
    print()
    print(text)
    if s.out:
        write_text(s.out, text)
        print(f"wrote {s.out}")


if __name__ == "__main__":
    run_cli(main)
