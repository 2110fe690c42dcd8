"""Stage 1: contrastive training of the mini-CLIP on captioned MNIST digits (Radford et al. 2021).

One step, written in ``compute_grads``:

1. take the next B training digits (each epoch is a fresh shuffle of the training split);
2. draw a fresh caption for each from the caption grammar: every time a digit is seen it gets a
   new phrasing and a new random subset of its measured attributes ("a bold 7", "seven",
   "the digit 7, thin, leaning left"), so the text encoder learns words, not sentences;
3. tokenize, then ``loss = clip(images, ids, mask)`` (symmetric InfoNCE with the learnable
   scale, ``tinydiff.nn.info_nce_loss``) and ``clip.backward()``.

The shared ``train_loop`` does the rest: AdamW, gradient clipping, EMA, atomic checkpoints,
exact resume, NaN guard. The held-out test split (``train_test_split``) is never seen here.

A token-level objective beside the contrastive one (``text_objective="slots"``, scenes only)
---------------------------------------------------------------------------------------------
InfoNCE only asks the pooled <eos> vector to pick its image out of a batch. A bag of words
("3", "7", "left") already does that for most batches, so nothing forces the hidden state of
"3" to know that *its* digit goes left: the encoder keeps words but not their roles. DALL-E 3
and Imagen read a T5 encoder instead, trained on a token-level task. Its miniature here: a
linear slot head on the hidden states h (B, L, D), the very states the U-Net cross-attends to,
predicts for each digit token where its digit goes (``data.scenes.token_slot_labels``: left,
right, top, bottom, count2, count3, number, small, big), and

    L = L_InfoNCE + λ · L_slots,   L_slots = −(1/N) Σ_{(b,t) ∈ M} log softmax(W h_bt + c)[y_bt]

over the N labelled positions M (every other token is ignored), λ = ``slot_weight`` (default
1). The head (``SlotCLIP.slot_head``) is trained, checkpointed and resumed with the rest, and
``load_clip`` drops it: a pipeline reads only the text encoder. Digit captions ("a bold 7")
name no places, so the objective is refused for them.

Choices worth knowing
---------------------
* **No weight decay** (``weight_decay=0``). CLIP decays weights but not gains, biases or the
  log scale; our loop applies one λ to every parameter, and decaying log s would pull the
  temperature towards 1 (s = e⁰), fighting the loss. With fresh captions every epoch and a
  small model, overfitting is mild without it.
* **False negatives.** InfoNCE treats every other caption in the batch as wrong. A batch of 128
  digits holds about 13 of each class, so two 7s captioned "7" and "a handwritten seven" are
  pushed apart although both captions fit both images. This makes the loss noisy and bounds it
  away from 0 (it cannot reach 0 while identical captions sit in one batch); it does not stop
  the encoders from learning digits and attributes, which is what the metrics measure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from ..backend import backend_of, get_xp, to_device, to_numpy
from ..data.mnist import load_mnist, step_batches, to_model_range, train_test_split
from ..data.scenes import TOKEN_SLOTS, SceneData, token_slot_labels
from ..io import load_checkpoint
from ..models.clip import CLIP, CLIPConfig
from ..nn import Linear, cross_entropy, is_grad_enabled, no_grad
from ..text.captions import assign_attributes, fit_thresholds, measure_images, sample_captions
from ..text.tokenizer import Tokenizer
from .loop import LoopConfig, checkpoint_weights, train_loop

CHECKPOINT_KIND = "clip-train"
TEXT_OBJECTIVES = ("contrastive", "slots")  # train_clip's text_objective (see the module docstring)
SLOT_HEAD_PREFIX = "slot_head."  # the slot head's keys in a checkpoint; load_clip drops them


class CaptionedDigits(NamedTuple):
    """Digits ready for the model, with what their captions are made from."""

    images: np.ndarray  # float32 (N, 1, 32, 32) in [−1, 1]
    labels: np.ndarray  # int64 (N,)
    attributes: np.ndarray  # (N,) of captions.ATTRIBUTE_DTYPE: thickness, slant, size codes


def load_captioned_mnist(path=None, *, seed: int = 0) -> tuple[CaptionedDigits, CaptionedDigits]:
    """(train, test) digits. Attribute thresholds are fitted on the training split only and
    applied to both, so "bold" means the same ink mass for a held-out digit as for a trained one."""
    images, labels = load_mnist(path)
    train_idx, test_idx = train_test_split(len(images), seed=seed)
    thresholds = fit_thresholds(measure_images(images[train_idx]), labels[train_idx])
    attributes = assign_attributes(measure_images(images), labels, thresholds)
    model_images = to_model_range(images)
    return tuple(
        CaptionedDigits(model_images[idx], labels[idx], attributes[idx]) for idx in (train_idx, test_idx)
    )


def draw_captions(data, indices, generator: np.random.Generator) -> list[str]:
    """Fresh captions for the images ``indices`` of ``data``: the data's own ``captions_for``
    when it phrases its captions itself (scenes, ``tinydiff.data.scenes.SceneData``), else
    ``sample_captions`` of its labels and attributes (``CaptionedDigits``)."""
    if hasattr(data, "captions_for"):
        return data.captions_for(indices, generator)
    return sample_captions(data.labels[indices], data.attributes[indices], generator)


class SlotCLIP(CLIP):
    """CLIP plus the slot head: forward(images, ids, mask, slot_labels, slot_mask) → the loss
    L = L_InfoNCE + λ · L_slots of the module docstring (a float).

    slot_labels (B, L) int and slot_mask (B, L) bool are ``token_slot_labels``' output for the
    captions of ``ids``. The slot head is Linear(D → K = len(TOKEN_SLOTS)) applied to the
    hidden states at the masked positions only; a batch without any (N = 0) has L_slots = 0.
    After forward, ``terms`` holds the two losses and the head's accuracy on the batch.

    Backward, with z = W h + c the logits (N, K) and p = softmax(z):

        ∂L/∂z = λ (p − onehot(y)) / N,   ∂L/∂W = (∂L/∂z)ᵀ h,   ∂L/∂c = Σ_n ∂L/∂z_n,
        ∂L/∂h_bt = Wᵀ ∂L/∂z_bt at the labelled tokens, 0 at every other position,

    and ∂L/∂h goes into the text encoder together with InfoNCE's gradient at the pooled <eos>
    (``CLIP.backward(d_hidden=...)``), so the encoder learns from both.

    The encoders and log s start from exactly the weights of ``CLIP(config, seed)``: the head
    draws its initial weights from a generator of its own.
    """

    def __init__(self, config: CLIPConfig | None = None, seed: int = 0, slot_weight: float = 1.0):
        super().__init__(config, seed)
        self.slot_weight = float(slot_weight)  # λ
        self.slot_head = Linear(self.config.text.width, len(TOKEN_SLOTS), generator=np.random.default_rng((seed, 1)))
        self.terms: dict = {}

    def forward(self, images, ids, mask, slot_labels, slot_mask) -> float:
        contrastive, hidden = super().forward(images, ids, mask, return_hidden=True)  # hidden (B, L, D)
        backend = backend_of(hidden)
        where = to_device(slot_mask, backend)  # (B, L) bool: the N labelled digit tokens
        targets = to_device(slot_labels, backend)[where]  # (N,)
        slots, accuracy, d_logits = 0.0, float("nan"), None
        if targets.size:
            logits = self.slot_head(hidden[where])  # (N, D) → (N, K)
            slots, d_logits = cross_entropy(logits, targets)  # mean over the N tokens; dL/dlogits (N, K)
            accuracy = float((logits.argmax(axis=1) == targets).mean())
        self._slot_cache = (hidden.shape, where, d_logits) if is_grad_enabled() else None  # CLIP's own: _keep
        self.terms = {"contrastive_loss": contrastive, "slot_loss": slots, "slot_accuracy": accuracy}
        return contrastive + self.slot_weight * slots

    def backward(self, dloss: float = 1.0):
        if getattr(self, "_slot_cache", None) is None:
            raise RuntimeError("SlotCLIP.backward called without a forward pass that kept its cache "
                               "(was forward run inside no_grad(), or backward called twice?)")
        shape, where, d_logits = self._slot_cache
        self._slot_cache = None
        d_hidden = None
        if d_logits is not None:
            d_hidden = get_xp(d_logits).zeros(shape, dtype=d_logits.dtype)  # (B, L, D): 0 off the labelled tokens
            d_hidden[where] = self.slot_head.backward(dloss * self.slot_weight * d_logits)  # (N, D)
        return super().backward(dloss, d_hidden=d_hidden)


def slot_accuracy(model: SlotCLIP, tokenizer: Tokenizer, captions, *, batch_size: int = 500) -> dict:
    """The slot head's accuracy on ``captions`` (scene captions, e.g. held-out ones): overall and
    per class of ``TOKEN_SLOTS`` (classes absent from the captions are left out), under no_grad."""
    correct = np.zeros(len(TOKEN_SLOTS))
    total = np.zeros(len(TOKEN_SLOTS))
    with no_grad():
        for start in range(0, len(captions), batch_size):
            chunk = list(captions[start : start + batch_size])
            tokens, targets = tokenizer.encode(chunk), token_slot_labels(chunk, tokenizer)
            hidden, _ = model.text(tokens.ids, tokens.mask)  # (B, L, D)
            where = to_device(targets.mask, backend_of(hidden))
            predicted = to_numpy(model.slot_head(hidden[where]).argmax(axis=1))  # (N,)
            labels = targets.labels[targets.mask]  # (N,), the same row-major order
            np.add.at(total, labels, 1)
            np.add.at(correct, labels, predicted == labels)
    seen = total > 0
    per_class = {name: float(c / t) for name, c, t, s in zip(TOKEN_SLOTS, correct, total, seen) if s}
    return {"accuracy": float(correct.sum() / total.sum()), "tokens": int(total.sum()), "per_class": per_class}


def default_loop(total_steps: int = 1200) -> LoopConfig:
    """The loop settings used for the bundled digits (see the module docstring for λ = 0).

    EMA decay 0.995 averages over the last ~200 steps; 0.999 would still hold 0.999¹²⁰⁰ ≈ 30% of
    the random initial weights after a 1,200-step run.
    """
    return LoopConfig(total_steps=total_steps, lr=2e-3, warmup_steps=100, weight_decay=0.0,
                      grad_clip=1.0, ema_decay=0.995, checkpoint_every=200)


def train_clip(
    config: CLIPConfig | None = None,
    loop: LoopConfig | None = None,
    *,
    batch_size: int = 128,
    data: CaptionedDigits | None = None,
    tokenizer: Tokenizer | None = None,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    callback: Callable[[dict], None] | None = None,
    stop_at: int | None = None,
    text_objective: str = "contrastive",
    slot_weight: float = 1.0,
) -> tuple[CLIP, Tokenizer, dict]:
    """Train a CLIP on ``data`` (default: the bundled training split); returns
    (model, tokenizer, train_loop's result). The model holds the last weights; the EMA weights
    are in ``result["ema"]`` and in the checkpoint (``load_clip`` uses them by default).

    ``callback`` receives train_loop's per-step dict plus ``scale`` (s = e^{log s}). A resumed run
    must use the same ``batch_size`` and data to continue exactly. ``tokenizer`` defaults to the
    caption tokenizer; other data (scenes) bring their own, and ``config.text`` must match it.

    ``text_objective``: "contrastive" (InfoNCE alone) or "slots" (InfoNCE + ``slot_weight`` ·
    the slot head's token loss, module docstring; needs scene data). With "slots" the model is
    a ``SlotCLIP`` and the callback also receives ``contrastive_loss``, ``slot_loss`` and
    ``slot_accuracy`` (of the batch, before the step).
    """
    if text_objective not in TEXT_OBJECTIVES:
        raise ValueError(f"unknown text objective {text_objective!r}; choose one of {', '.join(TEXT_OBJECTIVES)}")
    slots = text_objective == "slots"
    if slots and not isinstance(data, SceneData):
        raise ValueError("text objective 'slots' needs scene captions (data='scenes', tinydiff train mnist-scenes): "
                         "digit captions name no places; use text objective 'contrastive' for digits")
    if slots and not slot_weight > 0:
        raise ValueError(f"slot_weight must be positive, got {slot_weight}")
    tokenizer = tokenizer or Tokenizer.from_captions()
    config = config or CLIPConfig()
    if (config.text.vocab_size, config.text.max_length) != (tokenizer.vocab_size, tokenizer.max_length):
        raise ValueError(
            f"text config (vocab_size={config.text.vocab_size}, max_length={config.text.max_length}) does not "
            f"match the caption tokenizer ({tokenizer.vocab_size}, {tokenizer.max_length})"
        )
    loop = loop or default_loop()
    data = data if data is not None else load_captioned_mnist()[0]
    if resume and checkpoint_path is not None and Path(checkpoint_path).exists():
        trained_with = _text_objective(load_checkpoint(checkpoint_path, kind=CHECKPOINT_KIND)[1])
        if trained_with != text_objective:
            raise ValueError(f"{checkpoint_path} was trained with text objective {trained_with!r}, not "
                             f"{text_objective!r}; resume with {trained_with!r} or start a new folder")
    # The initial weights, too, are fixed by the seed (the same encoders for both objectives).
    model = SlotCLIP(config, seed=loop.seed, slot_weight=slot_weight) if slots else CLIP(config, seed=loop.seed)
    batch_at = step_batches(len(data.images), batch_size, loop.seed + 1)

    def compute_grads(step: int, generator: np.random.Generator) -> tuple[float, dict]:
        idx = batch_at(step)  # (B,)
        captions = draw_captions(data, idx, generator)
        tokens = tokenizer.encode(captions)
        images = to_device(data.images[idx], backend_of(model.log_scale.data))  # (B, 1, 32, 32)
        if not slots:
            loss = model(images, tokens.ids, tokens.mask)
            model.backward()
            return loss, {"scale": model.scale}
        targets = token_slot_labels(captions, tokenizer)  # from the captions alone: (B, L) labels and mask
        loss = model(images, tokens.ids, tokens.mask, targets.labels, targets.mask)
        model.backward()
        return loss, {"scale": model.scale, **model.terms}

    model_config = {"clip": config.to_dict(), "tokenizer": tokenizer.to_dict(), "text_objective": text_objective}
    if slots:
        model_config["slot_weight"] = float(slot_weight)
    result = train_loop(
        model, compute_grads, loop, checkpoint_path=checkpoint_path, resume=resume, kind=CHECKPOINT_KIND,
        model_config=model_config, callback=callback, stop_at=stop_at,
    )
    return model, tokenizer, result


def _text_objective(header: dict) -> str:
    """The text objective a checkpoint was trained with (checkpoints from before it: contrastive)."""
    return header["config"].get("text_objective", "contrastive")


def load_clip(path: str | Path, *, weights: str = "ema", slot_head: bool = False) -> tuple[CLIP, Tokenizer]:
    """Rebuild the model and its tokenizer from a ``train_clip`` checkpoint.

    weights: "ema" (the exponential moving average, the better model) or "last". A checkpoint
    trained with text objective "slots" gives a plain CLIP without its slot head, or the
    ``SlotCLIP`` with it when ``slot_head=True`` (for ``slot_accuracy``).
    """
    arrays, header = load_checkpoint(path, kind=CHECKPOINT_KIND)
    config = CLIPConfig.from_dict(header["config"]["clip"])
    state = checkpoint_weights(arrays, weights, path=path)
    if slot_head:
        if _text_objective(header) != "slots":
            raise ValueError(f"{path} was trained with text objective {_text_objective(header)!r} and has no slot head")
        model = SlotCLIP(config, slot_weight=header["config"]["slot_weight"])
    else:
        model = CLIP(config)
        state = {k: v for k, v in state.items() if not k.startswith(SLOT_HEAD_PREFIX)}
    model.load_state_dict(state)
    return model.eval(), Tokenizer.from_dict(header["config"]["tokenizer"])
