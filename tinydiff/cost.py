"""What an image costs: FLOPs per network call, network calls per image, seconds, joules, dollars.

**The counting convention.** One multiply-add is 2 FLOPs, and only the matrix products are
counted, the work that dominates every network here:

    Conv2d     2 · N · C_out · H_out · W_out · C_in · k_h · k_w      (every output: C_in · k_h · k_w products)
    Linear     2 · rows · in_features · out_features                 (rows: every leading axis)
    Attention  2 · B · heads · L_q · L_k · (d + d_v)                 (S = QKᵀ and O = P V; Vaswani
                                                                      et al. 2017, eq. 1)

Normalisations, activations, the softmax, residual additions, biases and the sinusoidal time
embedding are not counted: each is a few operations per *activation*, where a product costs
C_in · k_h · k_w (or in_features) per output. Papers differ here, most often by a factor 2:
fvcore, which DiT's "Gflops" come from, counts one fused multiply-add as one flop, so a number
quoted in MACs is half of ours (the chapter shows this for DiT-XL/2). The count is the layer's
definition, not the arithmetic of one implementation: a Winograd convolution (``nn.fast_conv``)
does fewer multiplications for the same output and is counted the same.

**Counting a real forward pass.** ``count_flops(*models)`` wraps the ``forward`` of every Conv2d
and Linear layer (the rules in ``FLOP_RULES``, keyed on the layer class) and the attention core
``nn.functional.attention_forward``, runs whatever the block runs, and records one ``LayerCost``
per call, named by the layer's dotted path and computed from the shapes of that call:
resolution, batch and context length are whatever the call had. An attention layer's own record
is QKᵀ and PV, counted from the shapes of Q, K and V (so self-, cross- and a DiT's joint
attention need no rule of their own); its projections are Linear layers and are counted as
such. Any network built from these layers (the U-Net, a DiT, the autoencoder, the text encoder)
is counted without code of its own.

**Counting from an architecture description.** ``unet_layers``, ``vae_encoder_layers``,
``vae_decoder_layers``, ``text_encoder_layers`` and ``dit_layers`` list the same products from a
few published numbers (channels, depth, resolution) with the same formulas, for networks too big
to build here (Stable Diffusion 1.5, DiT-XL/2). The tests check the U-Net, autoencoder and text
encoder lists layer by layer against counted forward passes of tinydiff's own networks and their
parameter counts against ``num_parameters()``; the SD 1.5 and DiT-XL/2 lists against the
published parameter counts and, for DiT-XL/2, the Gflops of its paper.

**Per image.** A sampler calls the denoiser ``sampler_calls(name, steps)`` times; with
classifier-free guidance each call runs on 2 rows (unconditional and conditional, one batch:
``diffusion.Denoiser``), except at guidance scale 1 where the unconditional row is skipped, and
for LCM, whose distilled student takes the guidance scale as an input (1 row). Add
the text encoder once per prompt (twice with a negative prompt) and the VAE decoder once:
``pipeline_cost``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from .nn import Attention, Conv2d, Linear, Module, no_grad
from .nn import functional as F

# --------------------------------------------------------------------------- the formulas


def conv2d_flops(batch: int, in_channels: int, out_channels: int, kernel_h: int, kernel_w: int,
                 out_h: int, out_w: int) -> int:
    """2 · N · C_out · H_out · W_out · C_in · k_h · k_w: every output sums C_in · k_h · k_w products."""
    return 2 * batch * out_channels * out_h * out_w * in_channels * kernel_h * kernel_w


def linear_flops(rows: int, in_features: int, out_features: int) -> int:
    """2 · rows · in · out: x (rows, in) times Wᵀ (in, out)."""
    return 2 * rows * in_features * out_features


def attention_flops(batch: int, heads: int, queries: int, keys: int, dim_head: int, dim_value: int | None = None) -> int:
    """QKᵀ (2 · B·h · L_q · L_k · d) plus P V (2 · B·h · L_q · L_k · d_v); projections not included."""
    dim_value = dim_head if dim_value is None else dim_value
    return 2 * batch * heads * queries * keys * (dim_head + dim_value)


# --------------------------------------------------------------------------- records


class LayerCost(NamedTuple):
    """One layer's matrix products: ``kind`` is 'conv', 'linear' or 'attention'."""

    name: str  # dotted path, e.g. 'down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k'
    kind: str
    flops: int
    params: int = 0  # parameters of the layer (architecture lists; 0 for a recorded call)


@dataclass
class FlopCount:
    """The records of a counted pass (or an architecture list) and sums over them."""

    records: list[LayerCost] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(r.flops for r in self.records)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.records)

    def by_kind(self) -> dict[str, int]:
        """FLOPs per kind of product: {'conv': …, 'linear': …, 'attention': …}."""
        out: dict[str, int] = {}
        for r in self.records:
            out[r.kind] = out.get(r.kind, 0) + r.flops
        return out

    def by_name(self) -> dict[str, int]:
        """FLOPs per record name (a layer called twice counts twice)."""
        out: dict[str, int] = {}
        for r in self.records:
            out[r.name] = out.get(r.name, 0) + r.flops
        return out

    def within(self, prefix: str) -> int:
        """FLOPs of the records at ``prefix`` or below it ('mid_block' counts 'mid_block.resnets.0.conv1')."""
        return sum(r.flops for r in self.records if r.name == prefix or r.name.startswith(prefix + "."))

    def by_prefix(self, prefixes: Iterable[str]) -> dict[str, int]:
        """{prefix: FLOPs within it} for each prefix."""
        return {p: self.within(p) for p in prefixes}


# --------------------------------------------------------------------------- counting a real pass


def _conv_rule(layer: Conv2d, inputs, output) -> tuple[str, int]:
    n, c_out, h_out, w_out = output.shape
    _, c_in, kh, kw = layer.weight.shape
    return "conv", conv2d_flops(n, c_in, c_out, kh, kw, h_out, w_out)


def _linear_rule(layer: Linear, inputs, output) -> tuple[str, int]:
    x = inputs[0]
    return "linear", linear_flops(x.size // layer.in_features, layer.in_features, layer.out_features)


# One rule per layer class: (layer, positional inputs, output) → (kind, FLOPs), from the shapes of
# the call. A subclass of a listed class uses its parent's rule. Attention layers (nn.Attention and
# any subclass, e.g. the DiT's joint attention) are counted where their products happen, in
# ``nn.functional.attention_forward``, from the shapes of Q, K and V: what a layer feeds it (self-,
# cross- or joint attention, masked or not) does not change the rule. Everything else (norms,
# activations, resampling, embeddings) has no matrix product and no rule.
FLOP_RULES: dict[type, Callable] = {Conv2d: _conv_rule, Linear: _linear_rule}


def _rule_for(module: Module):
    for cls in type(module).__mro__:
        if cls in FLOP_RULES:
            return FLOP_RULES[cls]
    return None


class _AttentionTally:
    """Names the attention layer running in each thread, and counts its core products by name."""

    def __init__(self):
        self.local = threading.local()  # .layer: the attention layer running in this thread, or None
        self.lock = threading.Lock()
        self.cores: dict[str, int] = {}  # layer name → attention_forward calls seen

    def seen(self, name: str) -> int:
        with self.lock:
            return self.cores.get(name, 0)

    def add(self, name: str) -> None:
        with self.lock:
            self.cores[name] = self.cores.get(name, 0) + 1


@contextlib.contextmanager
def count_flops(*models: Module, names: Iterable[str] | None = None):
    """Record the matrix products of ``models``' layers called inside the block.

        with count_flops(unet) as count:
            unet(x, t, context)
        count.total, count.by_kind(), count.within("mid_block")

    Conv2d and Linear layers get their ``forward`` wrapped on the instance (the class is
    untouched); attention layers are counted in ``nn.functional.attention_forward``, which is
    wrapped for the duration of the block, under the name of the attention layer that called it.
    Everything is restored when the block ends. ``names`` prefixes each model's records ('unet',
    'vae', …); by default records are named from the model's root. Calls from several threads
    are all recorded. An attention layer that runs without calling ``attention_forward`` (so
    its products would go uncounted) is an error.
    """
    models = list(models)
    prefixes = list(names) if names is not None else [""] * len(models)
    if len(prefixes) != len(models):
        raise ValueError(f"count_flops got {len(models)} models but {len(prefixes)} names")
    count, tally = FlopCount(), _AttentionTally()
    wrapped, seen = [], set()
    for model, prefix in zip(models, prefixes):
        for name, module in model.named_modules():
            full_name = ".".join(p for p in (prefix, name) if p)
            rule = _rule_for(module)
            if id(module) in seen or (rule is None and not isinstance(module, Attention)):
                continue
            seen.add(id(module))
            if rule is not None:
                module.forward = _counting_forward(module, rule, full_name, count.records)
            else:
                module.forward = _naming_forward(module, full_name, tally)
            wrapped.append(module)
    core = F.attention_forward
    F.attention_forward = _counting_attention_core(core, tally, count.records)
    try:
        yield count
    finally:
        F.attention_forward = core
        for module in wrapped:
            del module.forward  # back to the class's forward


def _counting_forward(module: Module, rule, name: str, records: list):
    forward = type(module).forward.__get__(module)

    def counted(*inputs, **kwargs):
        output = forward(*inputs, **kwargs)
        kind, flops = rule(module, inputs, output)
        records.append(LayerCost(name, kind, flops))  # list.append is atomic: threads may share it
        return output

    return counted


def _naming_forward(module: Module, name: str, tally: _AttentionTally):
    """An attention layer's forward that names the core products it runs (and checks it ran some)."""
    forward = type(module).forward.__get__(module)

    def named(*inputs, **kwargs):
        before, outer = tally.seen(name), getattr(tally.local, "layer", None)
        tally.local.layer = name
        try:
            output = forward(*inputs, **kwargs)
        finally:
            tally.local.layer = outer
        if tally.seen(name) == before:
            raise RuntimeError(f"attention layer {name} ({type(module).__name__}) ran without calling "
                               "nn.functional.attention_forward, so its QKᵀ and PV products cannot be counted")
        return output

    return named


def _counting_attention_core(core, tally: _AttentionTally, records: list):
    def counted(q, k, v, mask=None):
        out = core(q, k, v, mask)
        name = getattr(tally.local, "layer", None)
        if name is not None:  # called by a counted model's attention layer (not by another thread's work)
            b, h, queries, d = q.shape
            records.append(LayerCost(name, "attention", attention_flops(b, h, queries, k.shape[-2], d, v.shape[-1])))
            tally.add(name)
        return out

    return counted


def forward_flops(model: Module, *inputs, **kwargs) -> FlopCount:
    """The records of one forward pass ``model(*inputs, **kwargs)``, run in inference mode."""
    with no_grad(), count_flops(model) as count:
        model(*inputs, **kwargs)
    return count


# --------------------------------------------------------------------------- calls per image


def sampler_calls(sampler: str, steps: int) -> int:
    """Denoiser calls of ``steps`` steps of a sampler in ``diffusion.samplers``.

    Heun (EDM Alg. 1) evaluates D twice per step except on the last one, to σ = 0, which is an
    Euler step: 2·steps − 1. Every other sampler here (Euler, Euler ancestral, DDIM, DDPM,
    DPM++ 2M, which reuses the previous step's D, and LCM) calls D once per step.
    """
    from .diffusion.samplers import SAMPLERS

    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return 2 * steps - 1 if sampler == "heun" else steps


def rows_per_call(guidance_scale: float, sampler: str | None = None) -> int:
    """Rows of the network per image and call: 2 with classifier-free guidance, 1 at scale 1.

    ``sampler="lcm"`` runs the consistency-distilled student instead, which takes the guidance
    scale w as an input (guidance is baked in by distillation, ``train.lcm``): 1 row at any w.
    """
    if sampler == "lcm":
        return 1
    return 1 if guidance_scale == 1 else 2


def pipeline_cost(pipe, sampler: str | None = None, steps: int | None = None, guidance_scale: float | None = None,
                  *, negative_prompt: bool = False, seconds_per_image: float | None = None) -> dict:
    """FLOPs per image of ``pipe`` (a ``TextToImagePipeline``) for a sampler, step count and guidance.

    The per-call FLOPs are counted on a real one-image, one-step run of the pipeline (so they
    follow whatever denoiser, resolution and context length it has), on one thread: with guidance
    the U-Net runs the part its two rows share once, as it does whenever a batch gives every thread
    whole images (``backend.map_row_pairs``). The number of calls comes from ``sampler_calls``. For ``sampler="lcm"`` that run is an LCM step, so what is counted is
    the distilled student (``pipe.lcm_unet``, with its guidance embedding) on one row per image;
    it takes no negative prompt. Options left None take the pipeline's defaults. With
    ``seconds_per_image`` (measured by the caller) the achieved rate is added. Returns

        sampler, steps, guidance_scale, denoiser_calls, rows_per_call,
        denoiser_gflop_per_row, text_encoder_gflop, decoder_gflop (0 in pixel space),
        gflop_per_image  (= calls · rows · per_row + text encoder · prompts + decoder)
        [seconds_per_image, gflop_per_s]
    """
    d = pipe.defaults
    sampler = d.sampler if sampler is None else sampler
    steps = d.steps if steps is None else steps
    guidance_scale = d.guidance_scale if guidance_scale is None else guidance_scale
    calls, rows = sampler_calls(sampler, steps), rows_per_call(guidance_scale, sampler)
    lcm = sampler == "lcm"
    if lcm and pipe.lcm_unet is None:
        raise ValueError(pipe.missing_student_message())
    if lcm and negative_prompt:
        raise ValueError("sampler lcm takes no negative prompt (its guidance is baked into the student)")
    network = pipe.lcm_unet if lcm else pipe.unet  # the network each denoiser call runs
    # one thread: the image's two guidance rows stay together, as they do in any batch of at least
    # one image per thread, so the U-Net runs their shared start once (UNet._guidance_halves)
    threads, pipe.threads = pipe.threads, 1
    try:
        models = {"text_encoder": pipe.text_encoder, "denoiser": network, "vae": pipe.vae}  # no vae in pixel space
        models = {name: m for name, m in models.items() if m is not None}
        with count_flops(*models.values(), names=models) as count:
            pipe(_a_prompt(pipe), num_images=1, steps=1, sampler="lcm" if lcm else "euler",
                 guidance_scale=guidance_scale, seed=0)
    finally:
        pipe.threads = threads
    per_row = count.within("denoiser") / rows  # one call on `rows` rows
    text = count.within("text_encoder")
    decoder = count.within("vae.decoder")
    prompts = 2 if negative_prompt else 1
    result = {
        "sampler": sampler, "steps": steps, "guidance_scale": guidance_scale,
        "denoiser_calls": calls, "rows_per_call": rows,
        "denoiser_gflop_per_row": per_row / 1e9, "text_encoder_gflop": text / 1e9, "decoder_gflop": decoder / 1e9,
        "gflop_per_image": (calls * rows * per_row + prompts * text + decoder) / 1e9,
    }
    if seconds_per_image is not None:
        result["seconds_per_image"] = seconds_per_image
        result["gflop_per_s"] = result["gflop_per_image"] / seconds_per_image
    return result


def _a_prompt(pipe) -> str:
    """A prompt every shipped vocabulary knows: 'a handwritten 7' in the pipeline's own words."""
    words = pipe.tokenizer.words
    digit = "seven" if "seven" in words else "7"
    return f"a handwritten {digit}" if "handwritten" in words else digit


def time_images(pipe, num_images: int, repeats: int = 1, **options) -> float:
    """Seconds per image of ``pipe(…)`` on ``num_images`` prompts (one batch), best of ``repeats``."""
    prompt = _a_prompt(pipe)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        pipe(prompt, num_images=num_images, seed=0, **options)
        best = min(best, time.perf_counter() - start)
    return best / num_images


# --------------------------------------------------------------------------- energy and money


def energy_and_money(seconds: float, watts: float, usd_per_kwh: float, usd_per_hour: float | None = None) -> dict:
    """Joules and dollars of ``seconds`` of work at ``watts``: electricity at ``usd_per_kwh`` and,
    if given, the rent of a machine at ``usd_per_hour`` (which then replaces the electricity bill:
    the renter pays by the hour, power included).

        joules = W · s,   kWh = J / 3.6e6,   electricity = kWh · $/kWh,   rent = s / 3600 · $/h
    """
    joules = watts * seconds
    result = {"joules": joules, "kwh": joules / 3.6e6, "electricity_usd": joules / 3.6e6 * usd_per_kwh}
    if usd_per_hour is not None:
        result["rent_usd"] = seconds / 3600 * usd_per_hour
    return result


def seconds_at(flops: float, peak_flops_per_s: float, utilization: float) -> float:
    """Time for ``flops`` on a device of peak ``peak_flops_per_s`` running at ``utilization`` of it."""
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization must lie in (0, 1], got {utilization}")
    return flops / (peak_flops_per_s * utilization)


# --------------------------------------------------------------------------- architecture lists
#
# The same products, listed from a description of the network instead of a forward pass. Each
# helper returns LayerCost records named as the corresponding tinydiff modules (or diffusers'),
# with the layer's parameter count, so a list can be checked against a built network.


def _conv(name, c_in, c_out, k, h_out, w_out, batch=1, bias=True) -> LayerCost:
    return LayerCost(name, "conv", conv2d_flops(batch, c_in, c_out, k, k, h_out, w_out), c_out * c_in * k * k + c_out * bias)


def _linear(name, rows, d_in, d_out, bias=True) -> LayerCost:
    return LayerCost(name, "linear", linear_flops(rows, d_in, d_out), d_out * d_in + d_out * bias)


def _norm(name, channels) -> LayerCost:
    """GroupNorm or LayerNorm: no products, 2 · channels parameters (γ, β)."""
    return LayerCost(name, "norm", 0, 2 * channels)


def _resblock(name, c_in, c_out, h, w, temb: int | None) -> list[LayerCost]:
    """blocks.ResBlock (diffusers ResnetBlock2D): norm, 3×3 conv, time shift, norm, 3×3 conv, 1×1 shortcut."""
    layers = [_norm(f"{name}.norm1", c_in), _conv(f"{name}.conv1", c_in, c_out, 3, h, w)]
    if temb is not None:
        layers.append(_linear(f"{name}.time_emb_proj", 1, temb, c_out))  # one row per image
    layers += [_norm(f"{name}.norm2", c_out), _conv(f"{name}.conv2", c_out, c_out, 3, h, w)]
    if c_in != c_out:
        layers.append(_conv(f"{name}.conv_shortcut", c_in, c_out, 1, h, w))
    return layers


def _attention(name, queries, keys, query_dim, context_dim, inner, heads, qkv_bias=False) -> list[LayerCost]:
    """nn.Attention: to_q, to_k, to_v, QKᵀ and PV, to_out."""
    return [
        _linear(f"{name}.to_q", queries, query_dim, inner, qkv_bias),
        _linear(f"{name}.to_k", keys, context_dim, inner, qkv_bias),
        _linear(f"{name}.to_v", keys, context_dim, inner, qkv_bias),
        LayerCost(name, "attention", attention_flops(1, heads, queries, keys, inner // heads)),
        _linear(f"{name}.to_out", queries, inner, query_dim),
    ]


def _mlp(name, rows, dim, hidden, geglu=False, first="ff.0", second="ff.2") -> list[LayerCost]:
    """Linear → GELU → Linear; GEGLU (SD's feed-forward) doubles the first layer's outputs."""
    return [_linear(f"{name}.{first}", rows, dim, hidden * (2 if geglu else 1)), _linear(f"{name}.{second}", rows, hidden, dim)]


@dataclass
class UNetSpec:
    """What decides a U-Net's products: tinydiff's ``UNetConfig`` plus what SD does differently.

    transformer_width  features inside each transformer: None = the level's channels (SD),
                       an int = fixed (tinydiff: heads · dim_head)
    geglu              SD's GEGLU feed-forward (first layer to 2 · 4 · width) instead of GELU
    """

    in_channels: int
    out_channels: int
    sample_size: int
    block_channels: tuple[int, ...]
    layers_per_block: int
    attention_levels: tuple[bool, ...]
    time_embed_dim: int
    context_dim: int | None
    context_length: int | None
    heads: int
    transformer_width: int | None = None
    ff_mult: int = 4
    geglu: bool = False
    null_context: bool = False

    @classmethod
    def from_config(cls, config) -> "UNetSpec":
        """The spec of tinydiff's ``UNet(config)``."""
        return cls(config.in_channels, config.out_channels, config.sample_size, tuple(config.block_channels),
                   config.layers_per_block, tuple(config.attention_levels), config.time_embed_dim,
                   config.context_dim, config.context_length, config.heads,
                   transformer_width=config.heads * config.dim_head, null_context=config.learned_null_context)


def sd15_unet_spec() -> UNetSpec:
    """Stable Diffusion 1.5's U-Net (Rombach et al. 2022; diffusers' UNet2DConditionModel config:
    block_out_channels 320/640/1280/1280, layers_per_block 2, CrossAttnDownBlock2D at the first three
    levels, 8 heads, cross_attention_dim 768, sample_size 64, 4 latent channels), with CLIP
    ViT-L/14's 77 × 768 token states as context."""
    return UNetSpec(in_channels=4, out_channels=4, sample_size=64, block_channels=(320, 640, 1280, 1280),
                    layers_per_block=2, attention_levels=(True, True, True, False), time_embed_dim=1280,
                    context_dim=768, context_length=77, heads=8, transformer_width=None, geglu=True)


def _transformer(name, c, h, w, spec: UNetSpec) -> list[LayerCost]:
    """blocks.SpatialTransformer: norm, proj_in, self-attention, cross-attention, feed-forward, proj_out."""
    inner = spec.transformer_width or c
    tokens, block = h * w, f"{name}.transformer_blocks.0"
    layers = [_norm(f"{name}.norm", c), _linear(f"{name}.proj_in", tokens, c, inner), _norm(f"{block}.norm1", inner)]
    layers += _attention(f"{block}.attn1", tokens, tokens, inner, inner, inner, spec.heads)
    if spec.context_dim is not None:
        layers.append(_norm(f"{block}.norm2", inner))
        layers += _attention(f"{block}.attn2", tokens, spec.context_length, inner, spec.context_dim, inner, spec.heads)
    layers.append(_norm(f"{block}.norm3", inner))
    layers += _mlp(block, tokens, inner, spec.ff_mult * inner, spec.geglu)
    layers.append(_linear(f"{name}.proj_out", tokens, inner, c))
    return layers


def unet_layers(spec: UNetSpec, size: int | None = None) -> FlopCount:
    """The products of one U-Net call on one row (tinydiff's ``UNet`` and diffusers' layout):
    conv_in, time MLP, down levels (ResBlocks [+ transformers], Downsample), mid (Res, Tf, Res),
    up levels (one ResBlock more than going down, on the concatenated skip), norm, conv_out."""
    size = spec.sample_size if size is None else size
    chans, levels, temb = spec.block_channels, len(spec.block_channels), spec.time_embed_dim
    layers = [_linear("time_embedding.linear_1", 1, chans[0], temb), _linear("time_embedding.linear_2", 1, temb, temb),
              _conv("conv_in", spec.in_channels, chans[0], 3, size, size)]
    if spec.null_context:
        layers.append(LayerCost("null_embedding", "embedding", 0, spec.context_length * spec.context_dim))
    skips, c, s = [chans[0]], chans[0], size
    for level, out in enumerate(chans):
        for i in range(spec.layers_per_block):
            layers += _resblock(f"down_blocks.{level}.resnets.{i}", c, out, s, s, temb)
            c = out
            if spec.attention_levels[level]:
                layers += _transformer(f"down_blocks.{level}.attentions.{i}", c, s, s, spec)
            skips.append(c)
        if level < levels - 1:
            s //= 2
            layers.append(_conv(f"down_blocks.{level}.downsamplers.0.conv", c, c, 3, s, s))
            skips.append(c)
    layers += _resblock("mid_block.resnets.0", c, c, s, s, temb)
    layers += _transformer("mid_block.attentions.0", c, s, s, spec)
    layers += _resblock("mid_block.resnets.1", c, c, s, s, temb)
    for up, level in enumerate(reversed(range(levels))):
        out = chans[level]
        for i in range(spec.layers_per_block + 1):
            layers += _resblock(f"up_blocks.{up}.resnets.{i}", c + skips.pop(), out, s, s, temb)
            c = out
            if spec.attention_levels[level]:
                layers += _transformer(f"up_blocks.{up}.attentions.{i}", c, s, s, spec)
        if level > 0:
            s *= 2
            layers.append(_conv(f"up_blocks.{up}.upsamplers.0.conv", c, c, 3, s, s))
    layers += [_norm("conv_norm_out", c), _conv("conv_out", c, spec.out_channels, 3, s, s)]
    return FlopCount(layers)


def vae_decoder_layers(latent_channels: int, out_channels: int, block_channels: tuple[int, ...], latent_size: int,
                       up_resnets: int, mid_resnets: int = 1, mid_attention: bool = False,
                       post_quant_conv: bool = False) -> FlopCount:
    """The products of one VAE decoder call on one latent: conv_in, mid block, per level deepest
    first ``up_resnets`` ResBlocks then an Upsample (not at the top), norm, conv_out.

    tinydiff's Decoder: up_resnets = layers_per_block, one mid ResBlock, no attention. SD's:
    up_resnets = layers_per_block + 1 = 3, mid ResBlock → single-head self-attention over every
    latent position (GroupNorm, q, k, v, proj_out, all with bias) → ResBlock, and a 1×1
    post_quant_conv in front.
    """
    layers, s, c = [], latent_size, block_channels[-1]
    if post_quant_conv:
        layers.append(_conv("post_quant_conv", latent_channels, latent_channels, 1, s, s))
    layers.append(_conv("decoder.conv_in", latent_channels, c, 3, s, s))
    layers += _resblock("decoder.mid_block.resnets.0", c, c, s, s, None)
    if mid_attention:
        layers.append(_norm("decoder.mid_block.attentions.0.group_norm", c))
        layers += _attention("decoder.mid_block.attentions.0", s * s, s * s, c, c, c, 1, qkv_bias=True)
    for i in range(1, mid_resnets):
        layers += _resblock(f"decoder.mid_block.resnets.{i}", c, c, s, s, None)
    for up, level in enumerate(reversed(range(len(block_channels)))):
        out = block_channels[level]
        for i in range(up_resnets):
            layers += _resblock(f"decoder.up_blocks.{up}.resnets.{i}", c, out, s, s, None)
            c = out
        if level > 0:
            s *= 2
            layers.append(_conv(f"decoder.up_blocks.{up}.resample.conv", c, c, 3, s, s))
    layers += [_norm("decoder.conv_norm_out", c), _conv("decoder.conv_out", c, out_channels, 3, s, s)]
    return FlopCount(layers)


def vae_encoder_layers(in_channels: int, latent_channels: int, block_channels: tuple[int, ...], image_size: int,
                       layers_per_block: int) -> FlopCount:
    """The products of tinydiff's VAE Encoder on one image: conv_in, per level ResBlocks then a
    stride-2 Downsample2D (not at the last level), a mid ResBlock, norm, conv_out to 2 · latent
    channels (μ and log σ²)."""
    s, c = image_size, block_channels[0]
    layers = [_conv("encoder.conv_in", in_channels, c, 3, s, s)]
    for level, out in enumerate(block_channels):
        for i in range(layers_per_block):
            layers += _resblock(f"encoder.down_blocks.{level}.resnets.{i}", c, out, s, s, None)
            c = out
        if level < len(block_channels) - 1:
            s //= 2
            layers.append(_conv(f"encoder.down_blocks.{level}.resample.conv", c, c, 3, s, s))
    layers += _resblock("encoder.mid_block.resnets.0", c, c, s, s, None)
    layers += [_norm("encoder.conv_norm_out", c), _conv("encoder.conv_out", c, 2 * latent_channels, 3, s, s)]
    return FlopCount(layers)


def sd15_vae_decoder_layers() -> FlopCount:
    """SD 1.5's VAE decoder (diffusers' AutoencoderKL config: block_out_channels 128/256/512/512,
    layers_per_block 2, 4 latent channels) on a 64×64 latent → 512×512×3."""
    return vae_decoder_layers(4, 3, (128, 256, 512, 512), 64, up_resnets=3, mid_resnets=2, mid_attention=True,
                              post_quant_conv=True)


def text_encoder_layers(width: int, layers: int, heads: int, mlp_ratio: int, length: int, vocab_size: int,
                        max_length: int, projection_dim: int | None = None, qkv_bias: bool = False) -> FlopCount:
    """A CLIP-style text transformer on ``length`` tokens: per block LN, attention, LN, MLP.

    tinydiff's TextEncoder has no q/k/v biases and projects the pooled token (projection_dim);
    CLIP ViT-L/14's text tower (width 768, 12 layers, 12 heads, 77 tokens) has q/k/v biases, and
    Stable Diffusion reads its hidden states only."""
    out = [LayerCost("token_embedding", "embedding", 0, vocab_size * width),
           LayerCost("positional_embedding", "embedding", 0, max_length * width)]
    for i in range(layers):
        name = f"blocks.{i}"
        out.append(_norm(f"{name}.ln_1", width))
        out += _attention(f"{name}.attn", length, length, width, width, width, heads, qkv_bias)
        out.append(_norm(f"{name}.ln_2", width))
        out += _mlp(name, length, width, mlp_ratio * width, first="mlp.0", second="mlp.2")
    out.append(_norm("ln_final", width))
    if projection_dim is not None:
        out.append(_linear("text_projection", 1, width, projection_dim, bias=False))  # the pooled token only
    return FlopCount(out)


def clip_vit_l14_text_layers() -> FlopCount:
    """The text encoder of SD 1.5: CLIP ViT-L/14's text tower (Radford et al. 2021), 77 tokens."""
    return text_encoder_layers(768, 12, 12, 4, 77, vocab_size=49408, max_length=77, qkv_bias=True)


def dit_layers(depth: int, hidden: int, heads: int, patch: int, latent_size: int, in_channels: int = 4,
               mlp_ratio: int = 4, learn_sigma: bool = True, num_classes: int = 1000) -> FlopCount:
    """A DiT (Peebles & Xie 2023) on one latent: patch embedding (a k = p, stride p conv), time
    and class embeddings, ``depth`` blocks with adaLN-Zero (a Linear to 6 · hidden on the
    conditioning vector), qkv, attention, proj, MLP, then the final adaLN and linear layer back
    to p² · out_channels per token. Output channels are 2 · in_channels when it learns Σ."""
    tokens = (latent_size // patch) ** 2
    out_channels = 2 * in_channels if learn_sigma else in_channels
    grid = latent_size // patch
    layers = [_conv("x_embedder.proj", in_channels, hidden, patch, grid, grid),
              _linear("t_embedder.mlp.0", 1, 256, hidden), _linear("t_embedder.mlp.2", 1, hidden, hidden),
              LayerCost("y_embedder", "embedding", 0, (num_classes + 1) * hidden)]  # + 1: the null class for CFG
    for i in range(depth):
        name = f"blocks.{i}"
        layers += [_linear(f"{name}.adaLN_modulation", 1, hidden, 6 * hidden),
                   _linear(f"{name}.attn.qkv", tokens, hidden, 3 * hidden),
                   LayerCost(f"{name}.attn", "attention", attention_flops(1, heads, tokens, tokens, hidden // heads)),
                   _linear(f"{name}.attn.proj", tokens, hidden, hidden)]
        layers += _mlp(name, tokens, hidden, mlp_ratio * hidden, first="mlp.fc1", second="mlp.fc2")
    layers += [_linear("final_layer.adaLN_modulation", 1, hidden, 2 * hidden),
               _linear("final_layer.linear", tokens, hidden, patch * patch * out_channels)]
    return FlopCount(layers)


def dit_xl2_layers(image_size: int = 256) -> FlopCount:
    """DiT-XL/2 (Peebles & Xie 2023, Table 1: 28 layers, hidden 1152, 16 heads, patch 2) on the
    image_size/8 latent of SD's VAE."""
    return dit_layers(28, 1152, 16, 2, image_size // 8)
