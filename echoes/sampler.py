"""Iterative unmasking with classifier-free guidance (paper Sec. 3.4, Code 1, Eq. 2; MAGE).

What this file holds, top to bottom:
- the two per-step ops, `draw_tokens` (guided categorical draw over the codebook) and `remask`
  (Code 1's Gumbel top-k re-mask). They are plain PyTorch and the spec of the fused versions in
  `kernels/sampling.py`; the loop takes them from `model.ops`, so the model's one kernel switch
  governs sampling too. Randomness enters them only as uniform numbers the caller draws;
- the schedule (MAGE `gen_image`): cosine mask ratio, per-sample mask length, annealed choice
  temperature, Gumbel noise from uniforms;
- per-sample random streams (`sample_generators`): sample i of a request draws from its own
  `torch.Generator` seeded from (seed, i), so a sample's ids do not depend on the batch size, on
  how a long list is cut into batches, or on the other samples beside it;
- the loop (`unmask_step`, `unmask`) and the entry point `generate` with the five modes:
  `i2a`, `a2i`, `joint`, `inpaint` and `continue` (paper Sec. 3.4 and 4.3);
- helpers from a time range in seconds to `audio_keep` over the audio token columns.

The loop, per step t = 0 .. N-1 and per generated modality (Sec. 3.4, Code 1; MAGE `gen_image`):
1. features of the current ids; with guidance s != 1 the condition's unconditional twin (the
   condition modality fully set to its mask id) runs in the same batch of 2B (Eq. 2);
2. a token is drawn at every unknown position from softmax((s lc + (1 - s) lu) / token_T);
3. ratio = (t+1)/N; mask_len = floor(L0 cos(pi/2 ratio)) clamped per sample to
   [1, unknown - 1], L0 being the sample's unknown count before step 0 (MAGE's
   `unknown_number_in_the_beginning`: the modality's length for i2a / a2i / joint, the size of the
   regenerated region for inpainting and continuation; MAGE takes sample 0's count for the whole
   batch, we keep one per sample);
4. confidence = log p(draw) + T (1 - ratio) Gumbel at unknown positions, +inf at known ones; the
   mask_len least confident go back to the mask id; at the last step every draw is kept.

Shape letters: B samples, L tokens of a modality, C codebook size, D head width, N drawn rows.
"""

import contextlib
import math
import numbers
import warnings
from fractions import Fraction

import torch
import torch.nn.functional as F

MODES = ("i2a", "a2i", "joint", "inpaint", "continue")
MODALITIES = ("audio", "image")
# the paper's CFG scale s per mode (Sec. 4.1): 3 where audio is generated, none (1) for audio ->
# image; joint generation has no condition to guide by
PAPER_GUIDANCE = {"i2a": 3.0, "a2i": 1.0, "joint": 1.0, "inpaint": 3.0, "continue": 3.0}


# -----------------------------------------------------------------------------
# the per-step ops (the spec of kernels/sampling.py)


def draw_tokens(h_cond, h_uncond, weight, bias, guidance, token_temperature, uniform):
    """Draw one token per row from the guided distribution over the codebook.

    logits = s * (h_cond @ W^T + b) + (1 - s) * (h_uncond @ W^T + b)  (Eq. 2, in logit space;
    `h_uncond` None means no guidance), p = softmax(logits / token_temperature), and the token is
    the inverse-CDF draw: the first index whose cumulative probability exceeds `uniform`.
    h_* (N, D), weight (C, D), bias (C,), uniform (N,) in [0, 1)
    -> ids (N,) long and log p(ids) (N,) fp32."""
    logits = F.linear(h_cond, weight, bias).float()  # (N, C)
    if h_uncond is not None:
        logits = guidance * logits + (1 - guidance) * F.linear(h_uncond, weight, bias).float()
    logp = torch.log_softmax(logits / token_temperature, dim=-1)  # (N, C)
    cdf = logp.exp().cumsum(-1)  # (N, C)
    u = uniform.float()[:, None] * cdf[:, -1:]  # (N, 1), scaled so rounding in cdf never overflows
    ids = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[1] - 1).squeeze(1)  # (N,)
    return ids, logp.gather(1, ids[:, None]).squeeze(1)  # (N,), (N,)


def remask(logp, gumbel, unknown, mask_len, tau):
    """Code 1's `mask_by_random_topk`: which positions go back to the mask id.

    confidence = logp + tau * gumbel at unknown positions and +inf at known ones; a position is
    re-masked when its confidence is at most the mask_len-th smallest of its row. Ties at that
    cut all go back, as in Code 1 (`confidence <= cut_off`): more than mask_len positions, which
    Gumbel noise makes a measure-zero event, but with tau = 0 a confident model ties often.
    logp, gumbel (B, L) fp32, unknown (B, L) bool, mask_len (B,) long in [1, unknown count - 1],
    tau float -> (B, L) bool."""
    confidence = torch.where(unknown, logp + tau * gumbel, torch.full_like(logp, float("inf")))
    cut = confidence.sort(dim=1).values.gather(1, (mask_len - 1).clamp(min=0)[:, None])  # (B, 1)
    return (confidence <= cut) & unknown


# -----------------------------------------------------------------------------
# the schedule (MAGE `gen_image`)


def cosine_schedule(ratio):
    """Fraction of the initial unknown tokens still masked after a step that ends at `ratio` of
    the way through (MaskGIT / MAGE cosine schedule): cos(pi/2 * ratio), 1 at 0 and 0 at 1."""
    return math.cos(math.pi / 2 * ratio)


def mask_lengths(initial, unknown, step, steps):
    """How many positions each sample re-masks after `step` (0-based) of `steps`:
    floor(L0 * cos(pi/2 * (step+1)/steps)) clamped to [1, unknown - 1], as MAGE clamps it
    (max(1, min(unknown - 1, .))), but with each sample's own L0 and unknown count.
    initial, unknown (B,) long -> (B,) long."""
    target = torch.floor(initial.double() * cosine_schedule((step + 1) / steps)).long()  # (B,)
    return torch.clamp(torch.minimum(unknown - 1, target), min=1)


def choice_temperature(temperature, step, steps):
    """MAGE's annealed Gumbel temperature tau = T * (1 - ratio): random choices early, greedy by
    confidence near the end."""
    return temperature * (1 - (step + 1) / steps)


def gumbel_noise(uniform):
    """Standard Gumbel noise g = -log(-log(u)) from uniforms, clamped away from 0 and 1 so that
    both logs stay finite (torch.rand can return exactly 0)."""
    u = uniform.float().clamp(torch.finfo(torch.float32).tiny, 1 - 2 ** -24)
    return -torch.log(-torch.log(u))


# -----------------------------------------------------------------------------
# per-sample random streams


def _splitmix64(x):
    """One round of SplitMix64 (Steele et al. 2014): a well-mixed 64-bit value from an integer,
    so nearby (seed, index) pairs give unrelated generator seeds."""
    mask = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def sample_generators(seed, n, offset=0):
    """Generators for samples offset .. offset+n-1 of a request: sample i's CPU generator is seeded
    with SplitMix64(SplitMix64(seed) + i) (top 63 bits). Whoever cuts a long list into batches
    slices one such list (or passes the offset), so every sample draws the same numbers whatever
    the batching."""
    base = _splitmix64(int(seed) & ((1 << 64) - 1))
    return [torch.Generator().manual_seed(_splitmix64(base + offset + i) >> 1) for i in range(n)]


def per_sample_generators(generator, n):
    """`generate`'s `generator` argument -> n per-sample generators. A list is taken as is (one
    generator per sample); a single generator (or None: torch's default one) gives one 63-bit
    base seed, drawn from it, for `sample_generators`."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != n or not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError(f"generator: expected one torch.Generator per sample ({n}), "
                             f"got a list of {len(generator)}")
        if len({id(g) for g in generator}) != n:  # a shared one would tie samples together
            raise ValueError("generator: the list holds the same torch.Generator more than "
                             "once; give each sample its own (see sample_generators)")
        return list(generator)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, a list of them or None, "
                         f"not {type(generator).__name__}")
    device = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=device))
    return sample_generators(seed, n)


def draw_uniforms(generators, sizes, device):
    """One step's uniforms: for every sample, `sum(sizes)` numbers from its own generator, split
    into one (B, size) tensor per entry of `sizes` and moved to `device`. Drawing a fixed count per
    sample and step (whatever is still unknown) keeps each stream independent of everything else."""
    u = torch.stack([torch.rand(sum(sizes), generator=g, device=g.device).cpu()
                     for g in generators])  # (B, sum(sizes))
    if torch.device(device).type == "cuda":  # from pinned memory the copy does not wait for
        u = u.pin_memory().to(device, non_blocking=True)  # the GPU to finish earlier steps
    return u.to(device).split(list(sizes), dim=1)


# -----------------------------------------------------------------------------
# the loop


def mask_id(model, modality):
    """The modality's mask id: the extra last row of its embedding table."""
    return model.audio_mask_id if modality == "audio" else model.image_mask_id


class GraphedFeatures:
    """`model.features` replayed from CUDA graphs, one captured per input shape (and autocast
    dtype) on first use (PyTorch's `torch.cuda.CUDAGraph`). A sampling step at a small batch is
    bound by launching ~10 kernels per transformer block, one after the other; a replay issues
    the whole forward at once. The ids are copied into the graph's static inputs; the returned
    features are its static outputs, valid until the next call. If a capture fails, it warns
    once and runs the plain forward from then on. Under autocast the graph reads the weight
    copies autocast cached during the warm-up; that cache lives as long as the caller's autocast
    context, which encloses every replay of one `generate` call (the graphs die with it)."""

    def __init__(self, model):
        self.model, self.graphs, self.failed = model, {}, False

    def __call__(self, audio, image):
        if self.failed:
            return self.model.features(audio, image)
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        key = (tuple(audio.shape), tuple(image.shape), dtype)
        if key not in self.graphs:
            try:
                out, self.graphs[key] = self._capture(audio, image)
                return out
            except RuntimeError as e:
                warnings.warn(f"CUDA graph capture failed, sampling without graphs: {e}")
                self.failed = True
                return self.model.features(audio, image)
        graph, a, v, out = self.graphs[key]
        a.copy_(audio)
        v.copy_(image)
        graph.replay()
        return out

    def _capture(self, audio, image):
        """(this call's features, (graph, static audio, static image, static features)). One
        plain forward warms up off the capturing stream (autotuning, workspaces, autocast's
        weight cache) and is this call's result, so a capture costs no extra forward pass: at a
        large batch, where a step is bound by compute, graphs cost nothing."""
        a, v = audio.clone(), image.clone()  # the static inputs
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            warm = self.model.features(a, v)
        torch.cuda.current_stream().wait_stream(side)
        for t in warm:  # made on the side stream, read on this one: keep until this one is done
            t.record_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.model.features(a, v)
        return warm, (graph, a, v, out)


def guided_features(model, ids, uncond=None, features=None):
    """MLM-head features of the current ids, as {modality: (h_cond, h_uncond)} with h (B, L, D).
    With `uncond` a modality name, the unconditional twin (that modality fully set to its mask
    id) runs in the same forward pass as a batch of 2B (Eq. 2; both passes as one batch, as
    Im2Wav and 4M do); otherwise h_uncond is None. `features` replaces `model.features` (the
    CUDA-graph replay, `GraphedFeatures`)."""
    features = features or model.features
    audio, image = ids["audio"], ids["image"]
    if uncond is None:
        ha, hv = features(audio, image)
        return {"audio": (ha, None), "image": (hv, None)}
    B = audio.shape[0]
    twin = {"audio": audio, "image": image}
    twin[uncond] = torch.full_like(ids[uncond], mask_id(model, uncond))
    ha, hv = features(torch.cat([audio, twin["audio"]]),
                      torch.cat([image, twin["image"]]))  # (2B, La, D), (2B, Lv, D)
    return {"audio": (ha[:B], ha[B:]), "image": (hv[:B], hv[B:])}


def unmask_step(model, ids, targets, initial, step, steps, uniforms, uncond=None,
                temperature=9.0, guidance=3.0, token_temperature=1.0, features=None):
    """One step of the loop. ids {modality: (B, L) long} hold the mask id at unknown positions;
    `targets` are the generated modalities, `initial` {modality: (B,) long} their unknown counts
    before step 0, `uniforms` {modality: ((B, L) for the draw, (B, L) for the Gumbel noise)}.
    `uncond` names the condition modality whose masked twin gives the unconditional logits (used
    only when guidance != 1); `features` replaces `model.features`. Returns the new ids; known
    tokens are never touched."""
    draw = getattr(model.ops, "draw_tokens", draw_tokens)
    choose = getattr(model.ops, "remask", remask)
    guided = uncond is not None and guidance != 1
    h = guided_features(model, ids, uncond if guided else None, features)
    out = dict(ids)
    for m in targets:
        cur, mid = ids[m], mask_id(model, m)
        unknown = cur == mid  # (B, L)
        h_cond, h_uncond = h[m]
        u_draw, u_gumbel = uniforms[m]
        weight, bias = model.head_weights(m)
        # the head and the draw run on every position and the known ones' draws are thrown
        # away: boolean indexing (h[unknown]) would have the host wait for the GPU each step to
        # learn the row count. Row (b, l) draws with its own uniform either way
        tok, logp = draw(h_cond.flatten(0, 1),  # (B L, D)
                         None if h_uncond is None else h_uncond.flatten(0, 1), weight, bias,
                         guidance, token_temperature, u_draw.flatten())  # (B L,)
        drawn = torch.where(unknown, tok.view(cur.shape), cur)  # (B, L)
        if step == steps - 1:  # the last step keeps every draw
            out[m] = drawn
            continue
        logp = torch.where(unknown, logp.view(cur.shape).float(), 0.0)  # (B, L)
        mask_len = mask_lengths(initial[m], unknown.sum(1), step, steps)  # (B,)
        back = choose(logp, gumbel_noise(u_gumbel), unknown, mask_len,
                      choice_temperature(temperature, step, steps))  # (B, L)
        # a sample with nothing unknown has +inf confidence everywhere: nothing goes back
        out[m] = drawn.masked_fill(back, mid)
    return out


def unmask(model, audio_ids, image_ids, targets, generators, uncond=None, steps=30,
           temperature=9.0, guidance=3.0, token_temperature=1.0, progress=False, callback=None,
           cuda_graphs=False):
    """The whole loop over `steps` on ids that already hold the mask id at every position to
    generate. `generators`: one per sample. `callback(step, ids)`, if given, sees the ids after
    each step. `cuda_graphs` (ids on a GPU only) replays the transformer's forward from CUDA
    graphs (`GraphedFeatures`): the same ids, fewer kernel launches. No op of a step reads a value
    back from the GPU, so on a GPU the host queues step t+1 while step t runs. Returns
    (audio_ids, image_ids)."""
    ids = {"audio": audio_ids, "image": image_ids}
    graphed = cuda_graphs and audio_ids.is_cuda
    features = GraphedFeatures(model) if graphed else None
    initial = {m: (ids[m] == mask_id(model, m)).sum(1) for m in targets}  # (B,) per modality
    sizes = [ids[m].shape[1] for m in targets for _ in range(2)]
    bar = range(steps)
    if progress:  # imported here so that the loop itself runs where tqdm is not installed
        from tqdm import tqdm
        bar = tqdm(bar, desc="sampling", unit="step", leave=False)
    done = None  # on a GPU: the event of the previous step's end
    for step in bar:
        u = draw_uniforms(generators, sizes, audio_ids.device)
        uniforms = {m: (u[2 * i], u[2 * i + 1]) for i, m in enumerate(targets)}
        ids = unmask_step(model, ids, targets, initial, step, steps, uniforms, uncond,
                          temperature, guidance, token_temperature, features)
        if audio_ids.is_cuda:
            # nothing in a step waits for the GPU, so the host would queue all the steps at
            # once and the bar would run far ahead of the work; waiting for the previous step
            # instead keeps one step queued behind the running one (no gap on the GPU) and the
            # bar at most one step ahead
            if done is not None:
                done.synchronize()
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(audio_ids.device))
        if callback is not None:
            callback(step, ids)
    if done is not None:  # the last replay may read autocast's cached weights and the graphs'
        done.synchronize()  # memory, both freed when this returns: let it finish first
    return ids["audio"], ids["image"]


# -----------------------------------------------------------------------------
# sampling defaults stored in checkpoints

SAMPLING_KEYS = ("steps", "temperature", "guidance", "token_temperature")
# what each sampling setting may be: (test, in words). The bounds keep every product in fp32
# range; past them the draws are the argmax anyway (NaN fails every test)
SAMPLING_RULES = {
    "steps": (lambda v: _is_count(v), "an integer >= 1"),
    "temperature": (lambda v: _is_number(v) and 0 <= v <= 1e6, "a number in [0, 1e6]"),
    "guidance": (lambda v: _is_number(v) and abs(v) <= 1e6, "a number in [-1e6, 1e6]"),
    "token_temperature": (lambda v: _is_number(v) and 1e-6 <= v <= 1e6,
                          "a number in [1e-6, 1e6]"),
}


def check_sampling_defaults(defaults):
    """Sampling defaults as a checkpoint stores them: {name: number or {mode: number}} with names
    from SAMPLING_KEYS and modes from MODES. Raises ValueError naming the first problem."""
    if not isinstance(defaults, dict):
        raise ValueError("sampling defaults must be an object of "
                         f"{{{', '.join(SAMPLING_KEYS)}}}")
    unknown = sorted(set(defaults) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(f"unknown sampling setting(s) {', '.join(unknown)}: "
                         f"use {', '.join(SAMPLING_KEYS)}")
    for name, value in defaults.items():
        per_mode = value if isinstance(value, dict) else {"all modes": value}
        bad_modes = sorted(set(value) - set(MODES)) if isinstance(value, dict) else []
        ok, what = SAMPLING_RULES[name]
        if bad_modes or not all(ok(v) for v in per_mode.values()):
            raise ValueError(f"sampling setting {name!r} must be {what}, or an object of "
                             f"{{mode: value}} with modes {', '.join(MODES)}; got {value!r}")


# -----------------------------------------------------------------------------
# the entry point


def _check_ids(name, ids, length, codebook):
    if not torch.is_tensor(ids) or ids.dim() != 2 or ids.shape[1] != length:
        got = tuple(ids.shape) if torch.is_tensor(ids) else type(ids).__name__
        raise ValueError(f"{name}: expected a (B, {length}) tensor of token ids, got {got}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise ValueError(f"{name}: expected integer token ids, got {ids.dtype}")
    wide = ids.long()  # min / max are missing for some integer dtypes (uint16 ...)
    lo, hi = (int(wide.min()), int(wide.max())) if ids.numel() else (0, 0)
    if lo < 0 or hi >= codebook:
        raise ValueError(f"{name}: ids must lie in [0, {codebook}), got [{lo}, {hi}]")


def _is_count(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 1


def _is_number(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_numbers(steps, temperature, guidance, token_temperature, batch_size):
    given = dict(steps=steps, temperature=temperature, guidance=guidance,
                 token_temperature=token_temperature)
    for name, value in given.items():
        ok, what = SAMPLING_RULES[name]
        if not ok(value):
            raise ValueError(f"{name} must be {what}, got {value!r}")
    if not _is_count(batch_size):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def generate(model, mode, audio_ids=None, image_ids=None, audio_keep=None, steps=30,
             temperature=9.0, guidance=None, token_temperature=1.0, batch_size=1, generator=None,
             progress=False, cuda_graphs=True, callback=None):
    """Generate token ids with `model` (an `Echoes`) by iterative unmasking (paper Sec. 3.4).

    Modes and the arguments they take (ids are (B, L) integer tensors with values in [0, C)):
    - "i2a": `image_ids` -> audio; CFG's unconditional pass masks the image;
    - "a2i": `audio_ids` -> image; CFG masks the audio (the paper uses no CFG here: guidance 1);
    - "joint": nothing -> `batch_size` pairs, both modalities drawn every step, each with its own
      schedule; there is no condition, so `guidance` is unused;
    - "inpaint": `audio_ids`, `image_ids` and `audio_keep` (B, La) or (La,) bool -> the audio
      positions where `audio_keep` is False are regenerated, conditioned on the image and the rest
      of the audio; CFG masks the image;
    - "continue": `audio_ids` and `audio_keep` (the first columns, see `audio_keep_before`),
      `image_ids` optional -> the rest of the audio; with an image, CFG masks it; without one the
      image is fully masked and `guidance` is unused.
    `steps` N, `temperature` T (Gumbel choice temperature, annealed), `guidance` s (Eq. 2; exactly
    1.0 skips the unconditional pass; None: the paper's for the mode, `PAPER_GUIDANCE`),
    `token_temperature` divides the logits of the categorical draw (1 in the paper; re-masking
    ranks the drawn tokens' log-probabilities under that same tempered softmax). Defaults are
    the paper's settings (Sec. 4.1).

    Random numbers: sample i (its row in the ids, or its index in joint mode) draws from its own
    stream (`sample_generators`), so the same seed gives the same ids for a sample whatever the
    batch size. `generator` is a torch.Generator (one base seed is drawn from it), a list with one
    generator per sample (callers that batch a long list pass slices of `sample_generators(seed,
    n)`), or None (torch's default generator).
    `cuda_graphs`: on a GPU, replay the transformer's forward from CUDA graphs captured on the
    first step (`GraphedFeatures`; ignored on a CPU). The ids are the same either way.
    `callback(step, ids)`, if given, sees {modality: (B, L) ids} after each step (a preview, or a
    wait for the GPU: a step itself never waits).
    Returns (audio_ids (B, La), image_ids (B, Lv)) long, on the model's device, new tensors (a
    given condition is copied). In "continue" mode without `image_ids` nothing generates the
    image: image_ids come back as the image mask id (`model.image_mask_id`) everywhere."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    guidance = PAPER_GUIDANCE[mode] if guidance is None else guidance
    _check_numbers(steps, temperature, guidance, token_temperature, batch_size)
    c = model.config
    device = next(model.parameters()).device
    needs = {"i2a": ("image",), "a2i": ("audio",), "joint": (), "inpaint": ("audio", "image"),
             "continue": ("audio",)}[mode]
    given = {"audio": audio_ids, "image": image_ids}
    for m in MODALITIES:
        if m in needs and given[m] is None:
            raise ValueError(f"mode {mode} needs {m}_ids")
        if given[m] is not None and m not in needs and not (mode == "continue" and m == "image"):
            raise ValueError(f"mode {mode} takes no {m}_ids (it generates that modality)")
    if audio_keep is not None and mode not in ("inpaint", "continue"):
        raise ValueError(f"audio_keep is only for the inpaint and continue modes, not {mode}")
    if audio_keep is None and mode in ("inpaint", "continue"):
        raise ValueError(f"mode {mode} needs audio_keep (see audio_keep_outside / "
                         "audio_keep_before)")
    if audio_ids is not None:
        _check_ids("audio_ids", audio_ids, c.audio_len, c.audio_codebook)
    if image_ids is not None:
        _check_ids("image_ids", image_ids, c.image_len, c.image_codebook)
    if audio_ids is not None and image_ids is not None and len(audio_ids) != len(image_ids):
        raise ValueError(f"audio_ids and image_ids hold {len(audio_ids)} and {len(image_ids)} "
                         "samples; they must pair up")
    B = batch_size if mode == "joint" else len(audio_ids if audio_ids is not None else image_ids)
    if B == 0:
        raise ValueError("nothing to generate: the ids hold no sample")
    generators = per_sample_generators(generator, B)

    full = lambda m: torch.full((B, c.audio_len if m == "audio" else c.image_len),  # noqa: E731
                                mask_id(model, m), dtype=torch.long, device=device)
    audio = audio_ids.to(device, torch.long) if audio_ids is not None else full("audio")
    image = image_ids.to(device, torch.long) if image_ids is not None else full("image")
    if audio_keep is not None:
        keep = torch.as_tensor(audio_keep, device=device)
        if keep.dtype != torch.bool or keep.dim() not in (1, 2) or keep.shape[-1] != c.audio_len \
                or keep.dim() == 2 and keep.shape[0] not in (1, B):
            raise ValueError(f"audio_keep: expected a bool tensor of shape ({c.audio_len},) or "
                             f"({B}, {c.audio_len}), got {keep.dtype} {tuple(keep.shape)}")
        audio = audio.masked_fill(~keep.expand(B, -1), model.audio_mask_id)  # (B, La)
    targets = {"i2a": ("audio",), "a2i": ("image",), "joint": ("audio", "image"),
               "inpaint": ("audio",), "continue": ("audio",)}[mode]
    uncond = {"i2a": "image", "a2i": "audio", "inpaint": "image",
              "continue": "image" if image_ids is not None else None}.get(mode)

    flags = [(m, m.training) for m in model.modules()]  # restored as they were, one by one
    model.eval()  # dropout off: the generators are the only source of randomness
    # the model's GPU is the current one: CUDA graphs capture on the current device's streams
    # and Triton launches there (a model on cuda:1 would otherwise meet cuda:0's)
    on_gpu = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    try:
        with torch.inference_mode(), on_gpu:
            ids = unmask(model, audio, image, targets, generators, uncond, steps, temperature,
                         guidance, token_temperature, progress, callback, cuda_graphs)
    finally:
        for m, training in flags:
            m.training = training
    # new tensors the caller may change in place: neither inference tensors nor the inputs
    return tuple(x.clone() for x in ids)


# -----------------------------------------------------------------------------
# time ranges -> audio_keep


def time_range_columns(start, end, cols, duration, edges=None):
    """Token columns that overlap [start, end) seconds of a clip of `duration` seconds whose mel
    spans `cols` token columns: column j covers [edges[j], edges[j + 1]) seconds, by default
    [j, j + 1) * duration / cols. `AudioTokenizer.column_edges` gives a recipe's own edges: for
    VGGSound the mel's centre crop moves them by up to 0.08 s (of 0.19 s columns), enough for a
    short range to fall in the column beside the even split's. -> (cols,) bool, True = overlaps."""
    if not (math.isfinite(start) and math.isfinite(end)):
        raise ValueError(f"time range must be finite, got {start}..{end}")
    if not 0 <= start < end <= duration:
        raise ValueError(f"time range {start:g}..{end:g} s is outside the clip (0..{duration:g} s) "
                         "or empty")
    # in exact fractions of the decimals as written (0.6 is 3/5): a start on a column boundary
    # must not take in the column before it through float rounding
    s, e, d = (Fraction(repr(float(x))) for x in (start, end, duration))
    if edges is None:
        edges = [j * d / cols for j in range(cols + 1)]
    elif len(edges) != cols + 1:
        raise ValueError(f"{cols} columns need {cols + 1} edges, got {len(edges)}")
    edges = [Fraction(x) for x in edges]  # exact for floats and Fractions alike
    return torch.tensor([edges[j] < e and edges[j + 1] > s for j in range(cols)])


def audio_keep_outside(start, end, grid, duration, edges=None):
    """`audio_keep` for inpainting [start, end) seconds: False on every mel row of the token
    columns that overlap the range (column edges as in `time_range_columns`). grid (rows, cols)
    of the audio ids, row-major (index = row * cols + col). -> (rows * cols,) bool, True = keep."""
    rows, cols = grid
    hit = time_range_columns(start, end, cols, duration, edges)  # (cols,)
    return ~hit.expand(rows, cols).reshape(rows * cols)  # (rows * cols,)


def hidden_columns(keep, grid):
    """The token columns an `audio_keep` regenerates: (rows * cols,) bool, True = keep, masking
    whole columns as `audio_keep_outside` does -> (cols,) bool, True = regenerated."""
    rows, cols = grid
    if tuple(keep.shape) != (rows * cols,):
        raise ValueError(f"audio_keep must be ({rows * cols},), got {tuple(keep.shape)}")
    return ~keep.reshape(rows, cols).all(0)  # (rows, cols) -> (cols,)


def audio_keep_before(start, grid, duration, edges=None):
    """`audio_keep` for continuation from `start` seconds: the columns entirely before it are kept,
    every column from the one holding `start` to the end of the clip is generated."""
    return audio_keep_outside(start, duration, grid, duration, edges)
