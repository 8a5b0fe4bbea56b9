"""The Visual Echoes transformer: one masked generative encoder-decoder over audio + image tokens.

Follows the paper (Sec. 3.3, Eq. 1) and MAGE (Li et al. 2023, `models_mage.py`), the codebase it
builds on; every number the paper leaves open is an `EchoesConfig` field below:
- each modality has its own embedding table with one extra row, its mask id;
- training masks a per-sample, per-modality truncated-normal ratio of tokens and drops a fixed 50%
  of positions (independent of the mask) before the encoder;
- the decoder puts one learnable mask embedding, shared by both modalities, at every dropped or
  masked position, adds its own positional and modality embeddings, and predicts tokens with
  MAGE's MLM head, whose output layer is the (detached) embedding table;
- the loss is cross-entropy at masked positions only.

The three data-movement and codebook ops of the forward pass (`gather_embed`, `pad_decoder`,
`codebook_ce`) are plain functions below. They are the spec for the fused Triton versions in
`kernels/`, which the model uses when that package is importable and chooses Triton (see
`default_ops`); without it this file runs anywhere on its own.
"""

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class EchoesConfig:
    # token grids (paper Sec. 3.2): audio 5 x 53 SpecVQGAN ids, image 16 x 16 VQGAN ids
    audio_len: int = 265  # La, audio tokens per clip
    image_len: int = 256  # Lv, image tokens per frame
    audio_codebook: int = 1024  # Ca; embedding row Ca is the audio mask id
    image_codebook: int = 1024  # Cv; embedding row Cv is the image mask id
    # encoder (ViT-L of MAE, paper Sec. 4.1)
    enc_dim: int = 1024  # encoder width; also the token-embedding width the MLM head projects to
    enc_depth: int = 24  # encoder blocks
    enc_heads: int = 16  # encoder attention heads
    # decoder (MAGE's decoder)
    dec_dim: int = 1024  # decoder width
    dec_depth: int = 8  # decoder blocks
    dec_heads: int = 16  # decoder attention heads
    mlp_ratio: float = 4.0  # MLP hidden width / block width
    dropout: float = 0.1  # dropout on embeddings, attention, projections and MLPs (MAGE: 0.1)
    # training corruption (paper Sec. 3.3; MAGE)
    mask_ratio_mean: float = 0.7  # mu of the truncated normal the mask ratio is drawn from
    mask_ratio_std: float = 0.25  # its std
    mask_ratio_min: float = 0.2  # its lower bound (the paper's 0.2, not MAGE's 0.5)
    mask_ratio_max: float = 1.0  # its upper bound
    drop_ratio: float = 0.5  # fraction of each modality's positions dropped before the encoder
    label_smoothing: float = 0.1  # cross-entropy label smoothing (MAGE)
    detach_head_embedding: bool = True  # MLM head uses E.detach() as in MAGE; False trains E too
    # research trick (it helped the demo), off in the paper preset: this fraction of samples has
    # one modality (chosen at random) fully masked and the other fully visible, the situation that
    # conditional inference starts from and the truncated normal almost never produces
    full_mask_prob: float = 0.0
    # the paper's Table 2 ablation "CFG Training", off in both presets (the paper's point is that
    # CFG works without it): this fraction of the samples full_mask_prob leaves as drawn has one
    # modality (chosen at random) fully masked, the null condition of CFG's unconditional pass,
    # while the other keeps its drawn ratio: the "remove the condition during training of a low
    # ratio" of diffusion models
    null_condition_prob: float = 0.0
    # research trick, off in both presets (moot where nothing is dropped, as in the demo preset,
    # whose drop_ratio 0 helped the demo more): the dropped positions are taken from the masked ones
    # first, so the encoder sees every visible token whenever at most K are visible. With the
    # paper's drop, independent of the mask, the encoder sees about half of the visible tokens in
    # training but all of them at inference (nothing is dropped there), and the more of an image was
    # known the worse the model predicted the rest
    drop_masked_first: bool = False

    @classmethod
    def paper(cls, **overrides):
        """The paper's model: ViT-L encoder (1024 x 24, 16 heads), 1024 x 8 decoder, 521 tokens."""
        return cls(**overrides)

    @classmethod
    def demo(cls, **overrides):
        """The embedded demo ("shapes and tones", echoes/shapes.py): 8 x 8 image ids and
        5 x 8 audio ids over 256-code books; 2.8 M parameters (inside the bundle's 10 MB with
        both tokenizers, in fp16), small enough to train on 2 CPU cores (in fp32: on CPUs
        without bf16 instructions bf16 autocast is slower).

        Nothing is dropped before the encoder (drop_ratio 0, the paper drops 50%): every masked
        position then reaches the decoder through the encoder as a mask token, in training as
        at inference, where nothing is dropped either. Dropping trained a path inference never
        takes and kept the encoder to half the tokens it meets when sampling; without it the
        encoder costs twice as much per block, so 2 blocks cost about 1.4x a 3-block encoder at
        50% drop (by `flops_per_sample`).

        The MLM heads also train the embedding tables (detach_head_embedding False; MAGE and the
        paper preset detach them): on the demo that lowered the validation loss at every step and
        lifted audio -> image shape from 46% to 58% (bench/quality.py)."""
        base = dict(audio_len=40, image_len=64, audio_codebook=256, image_codebook=256,
                    enc_dim=256, enc_depth=2, enc_heads=8, dec_dim=256, dec_depth=1, dec_heads=8,
                    dropout=0.0, full_mask_prob=0.3, drop_ratio=0.0, detach_head_embedding=False)
        return cls(**{**base, **overrides})

    @classmethod
    def preset(cls, name, **overrides):
        if name not in ("paper", "demo"):
            raise ValueError(f"unknown preset {name!r}: use 'paper' or 'demo'")
        return getattr(cls, name)(**overrides)

    def __post_init__(self):
        """A configuration the model cannot be built from (or would train nonsense with) is a
        ValueError naming the field."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), type(f.default)
            if isinstance(value, bool) != (kind is bool) or not isinstance(value, (kind, int)):
                raise ValueError(f"{f.name} must be {kind.__name__}, got {value!r}")
        for name in ("audio_len", "image_len", "audio_codebook", "image_codebook", "enc_dim",
                     "enc_depth", "enc_heads", "dec_dim", "dec_depth", "dec_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for dim, heads in (("enc_dim", "enc_heads"), ("dec_dim", "dec_heads")):
            if getattr(self, dim) % getattr(self, heads):
                raise ValueError(f"{dim} {getattr(self, dim)} is not divisible by {heads} "
                                 f"{getattr(self, heads)}")
        checks = [(("dropout", "drop_ratio", "label_smoothing"), lambda v: 0 <= v < 1,
                   "in [0, 1)"),
                  (("mask_ratio_min", "mask_ratio_max", "mask_ratio_mean", "full_mask_prob",
                    "null_condition_prob"),
                   lambda v: 0 <= v <= 1, "in [0, 1]"),
                  (("mlp_ratio", "mask_ratio_std"), lambda v: 0 < v < math.inf, "above 0")]
        for names, ok, where in checks:
            for name in names:
                if not ok(getattr(self, name)):
                    raise ValueError(f"{name} must be {where}, got {getattr(self, name)!r}")
        if self.mask_ratio_min > self.mask_ratio_max:
            raise ValueError(f"mask_ratio_min {self.mask_ratio_min} is above mask_ratio_max "
                             f"{self.mask_ratio_max}")


# -----------------------------------------------------------------------------
# the plain PyTorch ops (the spec of kernels/gather_pad.py and kernels/codebook_ce.py)


def gather_embed(ids, keep, weight, pos, mod):
    """Encoder input at the kept positions: out[b, k] = weight[ids[b, i]] + pos[i] + mod with
    i = keep[b, k]. ids (B, L) long, keep (B, K) long, weight (C+1, D), pos (L, D), mod (D,)
    -> (B, K, D)."""
    tok = ids.gather(1, keep)  # (B, K)
    return F.embedding(tok, weight) + pos[keep] + mod  # (B, K, D)


def pad_decoder(x, keep, unknown, mask_emb, pos, mod):
    """Decoder input over all positions: out[b, l] = x[b, k] where l = keep[b, k] and the token at
    l is known, else the shared mask embedding; plus pos[l] + mod.
    x (B, K, D), keep (B, K) long, unknown (B, L) bool, mask_emb (D,), pos (L, D), mod (D,)
    -> (B, L, D)."""
    B, K, D = x.shape
    L = unknown.shape[1]
    full = x.new_zeros(B, L, D).scatter(1, keep[..., None].expand(B, K, D), x)  # (B, L, D)
    kept = torch.zeros(B, L, dtype=torch.bool, device=x.device).scatter(1, keep, True)  # (B, L)
    take = (kept & ~unknown)[..., None]  # (B, L, 1)
    return torch.where(take, full, mask_emb.to(x.dtype)) + pos + mod


def codebook_ce(h, weight, bias, target, label_smoothing=0.0):
    """Summed cross-entropy of logits = h @ weight^T + bias against target: the matmul in h's
    dtype (the autocast dtype under autocast), the cross-entropy in fp32.
    h (N, D), weight (C, D), bias (C,), target (N,) long -> scalar."""
    logits = F.linear(h, weight, bias).float()  # (N, C)
    return F.cross_entropy(logits, target, reduction="sum", label_smoothing=label_smoothing)


class TorchOps:
    """The plain path: the ops above, used wherever Triton is absent or not chosen."""
    name = "torch"
    gather_embed = staticmethod(gather_embed)
    pad_decoder = staticmethod(pad_decoder)
    codebook_ce = staticmethod(codebook_ce)


def default_ops():
    """The op set of `kernels/` when that package is importable (it resolves Triton vs PyTorch
    once, see kernels/__init__.py), else this file's plain functions."""
    try:
        import kernels
    except ImportError:
        return TorchOps
    if not hasattr(kernels, "select"):  # another project's `kernels` (there is one on PyPI)
        warnings.warn(f"the `kernels` module at {getattr(kernels, '__file__', '?')} is not "
                      "echoes's: using the plain PyTorch ops")
        return TorchOps
    return kernels.select()


# -----------------------------------------------------------------------------
# transformer blocks (pre-norm ViT, as in MAE/MAGE with timm's Block)


class Attention(nn.Module):

    def __init__(self, dim, heads, dropout):
        super().__init__()
        assert dim % heads == 0, f"width {dim} is not divisible by {heads} heads"
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # qkv bias, as ViT
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x):
        B, L, D = x.shape
        H = self.heads
        q, k, v = self.qkv(x).view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, hd)
        y = F.scaled_dot_product_attention(q, k, v,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, L, D)  # (B, L, D)
        return self.proj_drop(self.proj(y))


class MLP(nn.Module):

    def __init__(self, dim, hidden, dropout):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):

    def __init__(self, dim, heads, mlp_ratio, dropout):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MLMHead(nn.Module):
    """MAGE's MlmLayer: Linear(dec -> emb), GELU, LayerNorm; logits against the embedding table."""

    def __init__(self, dec_dim, emb_dim, codebook):
        super().__init__()
        self.fc = nn.Linear(dec_dim, emb_dim)
        self.norm = nn.LayerNorm(emb_dim)  # torch's default eps, 1e-5, as MAGE's MlmLayer
        self.bias = nn.Parameter(torch.zeros(codebook))

    def forward(self, x):
        return self.norm(F.gelu(self.fc(x)))


# -----------------------------------------------------------------------------
# the model


class Echoes(nn.Module):
    """Encoder-decoder over [audio, image] tokens. `forward(audio_ids, image_ids)` gives the logits
    of every position (inference: unknown positions hold the mask id, nothing is dropped);
    `training_loss` draws masks and drops and returns Eq. 1's loss."""

    def __init__(self, config, ops=None):
        super().__init__()
        self.config = c = config
        self.ops = ops if ops is not None else default_ops()
        self.audio_mask_id = c.audio_codebook  # the extra embedding row of each table
        self.image_mask_id = c.image_codebook
        # encoder side
        self.audio_embed = nn.Embedding(c.audio_codebook + 1, c.enc_dim)
        self.image_embed = nn.Embedding(c.image_codebook + 1, c.enc_dim)
        self.enc_pos_audio = nn.Parameter(torch.zeros(c.audio_len, c.enc_dim))
        self.enc_pos_image = nn.Parameter(torch.zeros(c.image_len, c.enc_dim))
        self.enc_modality = nn.Parameter(torch.zeros(2, c.enc_dim))  # [audio, image]
        self.embed_drop = nn.Dropout(c.dropout)
        self.encoder = nn.ModuleList(
            Block(c.enc_dim, c.enc_heads, c.mlp_ratio, c.dropout) for _ in range(c.enc_depth))
        self.enc_norm = nn.LayerNorm(c.enc_dim, eps=1e-6)
        # decoder side
        self.dec_embed = nn.Linear(c.enc_dim, c.dec_dim)
        self.mask_emb = nn.Parameter(torch.zeros(c.dec_dim))  # shared by both modalities
        self.dec_pos_audio = nn.Parameter(torch.zeros(c.audio_len, c.dec_dim))
        self.dec_pos_image = nn.Parameter(torch.zeros(c.image_len, c.dec_dim))
        self.dec_modality = nn.Parameter(torch.zeros(2, c.dec_dim))
        self.decoder = nn.ModuleList(
            Block(c.dec_dim, c.dec_heads, c.mlp_ratio, c.dropout) for _ in range(c.dec_depth))
        self.dec_norm = nn.LayerNorm(c.dec_dim, eps=1e-6)
        # MLM heads, one per modality
        self.audio_head = MLMHead(c.dec_dim, c.enc_dim, c.audio_codebook)
        self.image_head = MLMHead(c.dec_dim, c.enc_dim, c.image_codebook)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """All parameters, as MAGE/MAE initialise them:
        - Linear weights: Xavier uniform; Linear biases: 0;
        - LayerNorm: weight 1, bias 0;
        - token embeddings (both tables, mask rows included): normal, std 0.02 (BERT);
        - positional and modality embeddings (encoder and decoder) and the mask embedding:
          normal, std 0.02 (MAGE's normal_ for its mask token and decoder positions);
        - MLM head biases: 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        for p in (self.enc_pos_audio, self.enc_pos_image, self.enc_modality, self.mask_emb,
                  self.dec_pos_audio, self.dec_pos_image, self.dec_modality):
            nn.init.normal_(p, std=0.02)
        nn.init.zeros_(self.audio_head.bias)
        nn.init.zeros_(self.image_head.bias)

    # ---- the network --------------------------------------------------------------------------

    def _encode_decode(self, audio_ids, image_ids, audio_keep, image_keep):
        """Both halves of the network. ids (B, La) / (B, Lv) with mask ids at unknown positions;
        keep (B, Ka) / (B, Kv): the positions the encoder sees. Returns the decoder output split
        per modality: (B, La, Dd), (B, Lv, Dd)."""
        c, ops = self.config, self.ops
        Ka = audio_keep.shape[1]
        xa = ops.gather_embed(audio_ids, audio_keep, self.audio_embed.weight, self.enc_pos_audio,
                              self.enc_modality[0])  # (B, Ka, De)
        xv = ops.gather_embed(image_ids, image_keep, self.image_embed.weight, self.enc_pos_image,
                              self.enc_modality[1])  # (B, Kv, De)
        x = self.embed_drop(torch.cat([xa, xv], dim=1))  # (B, Ka+Kv, De)
        for block in self.encoder:
            x = block(x)
        x = self.dec_embed(self.enc_norm(x))  # (B, Ka+Kv, Dd)
        # the decoder sees the shared mask embedding wherever a token was dropped or masked
        ya = ops.pad_decoder(x[:, :Ka], audio_keep, audio_ids == self.audio_mask_id,
                             self.mask_emb, self.dec_pos_audio, self.dec_modality[0])  # (B, La, Dd)
        yv = ops.pad_decoder(x[:, Ka:], image_keep, image_ids == self.image_mask_id,
                             self.mask_emb, self.dec_pos_image, self.dec_modality[1])  # (B, Lv, Dd)
        y = torch.cat([ya, yv], dim=1)  # (B, La+Lv, Dd)
        for block in self.decoder:
            y = block(y)
        y = self.dec_norm(y)
        return y[:, :c.audio_len], y[:, c.audio_len:]

    def compile_blocks(self, **options):
        """`torch.compile` every encoder and decoder block in place (`nn.Module.compile`, so the
        state-dict keys do not change): the compiler fuses the norms, GELU, bias and residual
        adds around the matrix products; the ops between the blocks stay as `ops` has them.
        The blocks share one compiled graph; the first steps pay the compilation."""
        for block in [*self.encoder, *self.decoder]:
            block.compile(**options)
        return self

    def head_weights(self, modality):
        """(E[:C], b) of a modality's MLM head: logits = h @ E[:C]^T + b; the mask row is never a
        target. E is detached unless `detach_head_embedding` is off."""
        if modality not in ("audio", "image"):
            raise ValueError(f"modality must be 'audio' or 'image', got {modality!r}")
        embed, head = ((self.audio_embed, self.audio_head) if modality == "audio"
                       else (self.image_embed, self.image_head))
        E = embed.weight[:-1]
        return (E.detach() if self.config.detach_head_embedding else E), head.bias

    def features(self, audio_ids, image_ids):
        """Inference features: the MLM heads' hidden states at every position, (B, La, De) and
        (B, Lv, De); logits are `features @ E^T + b` (`head_weights`). Nothing is dropped."""
        self._check_ids(audio_ids, image_ids)
        B = audio_ids.shape[0]
        dev = audio_ids.device
        audio_keep = torch.arange(self.config.audio_len, device=dev).expand(B, -1)  # (B, La)
        image_keep = torch.arange(self.config.image_len, device=dev).expand(B, -1)  # (B, Lv)
        ya, yv = self._encode_decode(audio_ids, image_ids, audio_keep, image_keep)
        return self.audio_head(ya), self.image_head(yv)

    def forward(self, audio_ids, image_ids):
        """Logits of every position: (B, La, Ca) and (B, Lv, Cv)."""
        ha, hv = self.features(audio_ids, image_ids)
        return F.linear(ha, *self.head_weights("audio")), F.linear(hv, *self.head_weights("image"))

    def _check_ids(self, audio_ids, image_ids):
        c = self.config
        B = audio_ids.shape[0]
        if tuple(audio_ids.shape) != (B, c.audio_len) or tuple(image_ids.shape) != (B, c.image_len):
            raise ValueError(f"expected audio ids (B, {c.audio_len}) and image ids "
                             f"(B, {c.image_len}), got {tuple(audio_ids.shape)} and "
                             f"{tuple(image_ids.shape)}")
        for name, ids in (("audio", audio_ids), ("image", image_ids)):
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                raise ValueError(f"{name} ids must be integers, got {ids.dtype}; convert them "
                                 "with .long()")

    # ---- training -----------------------------------------------------------------------------

    def draw_corruption(self, B, device, generator=None):
        """Masks and drops for one batch (paper Sec. 3.3), drawn from `generator` only (a list
        of B generators: each sample's from its own, so it does not depend on the batch).
        Returns (audio_mask, audio_keep, image_mask, image_keep): masks (B, L) bool, True =
        masked, and keep indices (B, K) long, sorted, with K = L - floor(drop_ratio * L) the same
        for every sample: a uniformly random subset, independent of the mask, or with
        `drop_masked_first` the visible positions first (a random K of them when there are
        more)."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != B:
                raise ValueError(f"{len(generator)} generators for {B} samples")
            if B == 0:
                return self.draw_corruption(0, device)
            # drawn where each generator lives (a CPU one: no launches per sample), moved once
            parts = [self.draw_corruption(1, g.device, g) for g in generator]
            return tuple(torch.cat(p).to(device) for p in zip(*parts))
        c = self.config
        gdev = generator.device if generator is not None else torch.device(device)
        # per sample and per modality: r ~ truncated normal on [min, max] (inverse-CDF sampling,
        # so the generator alone fixes the draw)
        ratio = truncated_normal((B, 2), c.mask_ratio_mean, c.mask_ratio_std, c.mask_ratio_min,
                                 c.mask_ratio_max, generator, gdev)  # (B, 2)
        if c.full_mask_prob > 0:
            full = torch.rand(B, generator=generator, device=gdev) < c.full_mask_prob  # (B,)
            which = torch.rand(B, generator=generator, device=gdev) < 0.5  # True: audio masked
            forced = torch.stack([which.float(), (~which).float()], dim=1)  # (B, 2)
            ratio = torch.where(full[:, None], forced, ratio)
        if c.null_condition_prob > 0:
            null = torch.rand(B, generator=generator, device=gdev) < c.null_condition_prob  # (B,)
            if c.full_mask_prob > 0:
                null &= ~full  # a sample with one modality shown keeps it
            image = torch.rand(B, generator=generator, device=gdev) < 0.5  # True: image nulled
            ratio = ratio.masked_fill(torch.stack([null & ~image, null & image], dim=1), 1.0)
        out = []
        for m, L in enumerate((c.audio_len, c.image_len)):
            n_masked = torch.ceil(ratio[:, m] * L).long()  # (B,), MAGE rounds up
            # (B, L): each position's rank in a random order
            rank = torch.rand(B, L, generator=generator, device=gdev).argsort(1).argsort(1)
            mask = rank < n_masked[:, None]  # (B, L): a uniformly random subset of n_masked
            K = L - math.floor(c.drop_ratio * L)
            key = torch.rand(B, L, generator=generator, device=gdev)
            if c.drop_masked_first:
                key = key + mask.to(key.dtype)  # visible positions sort first
            keep = key.argsort(1)[:, :K].sort(1).values  # (B, K)
            out += [mask.to(device), keep.to(device)]
        return tuple(out)

    def training_loss(self, audio_ids, image_ids, generator=None, reduction="mean"):
        """Eq. 1: cross-entropy at masked positions of both modalities, averaged over all masked
        tokens of the batch (corruption from `generator`, or one generator per sample, see
        `draw_corruption`); reduction="sum" gives the sum instead, for a caller that averages
        over more batches (train.py: the micro-batches and processes of one step). Returns
        (loss, stats); stats hold detached per-modality mean losses and masked counts."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self._check_ids(audio_ids, image_ids)
        audio_ids, image_ids = audio_ids.long(), image_ids.long()  # the loss's targets
        B = audio_ids.shape[0]
        audio_mask, audio_keep, image_mask, image_keep = self.draw_corruption(
            B, audio_ids.device, generator)
        a_in = audio_ids.masked_fill(audio_mask, self.audio_mask_id)
        v_in = image_ids.masked_fill(image_mask, self.image_mask_id)
        ya, yv = self._encode_decode(a_in, v_in, audio_keep, image_keep)
        return self._masked_loss(ya, yv, audio_ids, image_ids, audio_mask, image_mask, reduction)

    def _masked_loss(self, ya, yv, audio_ids, image_ids, audio_mask, image_mask,
                     reduction="mean"):
        """Eq. 1 from the decoder outputs: the heads run on masked rows only, so no other
        position's target can reach the loss."""
        ha = self.audio_head(ya[audio_mask])  # (Na, De)
        hv = self.image_head(yv[image_mask])  # (Nv, De)
        sa = self.ops.codebook_ce(ha, *self.head_weights("audio"), audio_ids[audio_mask],
                                  self.config.label_smoothing)
        sv = self.ops.codebook_ce(hv, *self.head_weights("image"), image_ids[image_mask],
                                  self.config.label_smoothing)
        na, nv = audio_mask.sum(), image_mask.sum()
        loss = sa + sv if reduction == "sum" else (sa + sv) / (na + nv).clamp(min=1)
        stats = {"loss_audio": (sa / na.clamp(min=1)).detach(),
                 "loss_image": (sv / nv.clamp(min=1)).detach(),
                 "masked_audio": na, "masked_image": nv}
        return loss, stats

    # ---- accounting ---------------------------------------------------------------------------

    def parameter_counts(self):
        """Parameters by part: embeddings (token tables, positional, modality, mask embedding),
        encoder (blocks + final norm), decoder (input projection, blocks, final norm), heads."""
        def n(*mods):
            return sum(p.numel() for m in mods for p in
                       (m.parameters() if isinstance(m, nn.Module) else [m]))
        counts = {
            "embeddings": n(self.audio_embed, self.image_embed, self.enc_pos_audio,
                            self.enc_pos_image, self.enc_modality, self.mask_emb,
                            self.dec_pos_audio, self.dec_pos_image, self.dec_modality),
            "encoder": n(self.encoder, self.enc_norm),
            "decoder": n(self.dec_embed, self.decoder, self.dec_norm),
            "heads": n(self.audio_head, self.image_head),
        }
        counts["total"] = sum(counts.values())
        assert counts["total"] == n(self), "a parameter is missing from the breakdown"
        return counts

    def masked_share(self):
        """The expected share of a modality's tokens that training masks: the mean of the
        truncated normal, mu + std (pdf(a) - pdf(b)) / (cdf(b) - cdf(a)) at the standardised
        bounds a, b (the ceil to whole tokens aside); full_mask_prob's samples mask a modality
        half the time, and null_condition_prob's a random one of the two fully."""
        c = self.config
        a, b = ((x - c.mask_ratio_mean) / c.mask_ratio_std
                for x in (c.mask_ratio_min, c.mask_ratio_max))
        pdf = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
        cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
        mass = cdf(b) - cdf(a)
        # a range far in one tail has no mass in floats: the draws sit at its near bound
        drawn = (c.mask_ratio_mean + c.mask_ratio_std * (pdf(a) - pdf(b)) / mass if mass > 1e-12
                 else min(max(c.mask_ratio_mean, c.mask_ratio_min), c.mask_ratio_max))
        drawn = drawn * (1 - c.null_condition_prob / 2) + c.null_condition_prob / 2
        return c.full_mask_prob / 2 + (1 - c.full_mask_prob) * drawn

    def flops_per_sample(self, train=True):
        """Matmul FLOPs for one sample (embedding look-ups, norms and softmax are ignored).
        A block of width D over L tokens costs 2 * L * (4 + 2 r) D^2 (qkv, proj, MLP with ratio
        r) plus 2 * 2 * L^2 * D (scores and weighted sum); the decoder input projection
        2 * K * De * Dd; a head over M rows 2 * M * (Dd * De + De * C). Training: the encoder
        sees K = Ka + Kv kept tokens, the heads the expected masked count (`masked_share` x L),
        and the backward pass costs twice the forward (Kaplan et al. 2020), so 3x. Inference:
        all L = La + Lv tokens everywhere, forward only."""
        c = self.config
        mlp = 2 * c.mlp_ratio  # MLP matmul weights per D^2
        def blocks(depth, D, L):
            return depth * (2 * L * (4 + mlp) * D * D + 4 * L * L * D)
        La, Lv = c.audio_len, c.image_len
        if train:
            K = (La - math.floor(c.drop_ratio * La)) + (Lv - math.floor(c.drop_ratio * Lv))
            Ma, Mv = self.masked_share() * La, self.masked_share() * Lv
        else:
            K, Ma, Mv = La + Lv, La, Lv
        fwd = (blocks(c.enc_depth, c.enc_dim, K) + 2 * K * c.enc_dim * c.dec_dim
               + blocks(c.dec_depth, c.dec_dim, La + Lv)
               + 2 * Ma * (c.dec_dim * c.enc_dim + c.enc_dim * c.audio_codebook)
               + 2 * Mv * (c.dec_dim * c.enc_dim + c.enc_dim * c.image_codebook))
        return 3 * fwd if train else fwd


def truncated_normal(shape, mean, std, low, high, generator=None, device=None):
    """Draws from N(mean, std) truncated to [low, high] by inverting the CDF of a uniform draw
    between the CDF values of the bounds. In float64, so that bounds far in one tail (where
    float32 CDF values round to 0 or 1) still give a spread of draws; returned in float32."""
    def cdf(x):
        return 0.5 * math.erfc(-(x - mean) / (std * math.sqrt(2)))
    lo, hi = cdf(low), cdf(high)
    u = lo + (hi - lo) * torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    x = mean + std * math.sqrt(2) * torch.erfinv((2 * u - 1).clamp(-1 + 1e-15, 1 - 1e-15))
    return x.clamp(low, high).float()
