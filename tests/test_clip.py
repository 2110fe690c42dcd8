"""Tests for the mini-CLIP: gradient checks, padding invariance, training, metrics."""

import math

import numpy as np
import pytest

from tinydiff.backend import rng, to_device, to_numpy
from tinydiff.data.mnist import step_batches
from tinydiff.data.scenes import TOKEN_SLOTS, load_scene_data, scene_tokenizer, token_slot_labels
from tinydiff.metrics import caption_content_key, evaluate_clip, prompt_choice_accuracy, retrieval_recall_at_1
from tinydiff.models.clip import CLIP, CLIPConfig, ImageEncoder, ImageEncoderConfig, TextEncoderConfig
from tinydiff.nn import gradcheck, gradcheck_module, manual_seed
from tinydiff.text import Tokenizer
from tinydiff.text.captions import ATTRIBUTE_DTYPE, BOLD, DIGIT_WORDS, LEFT, RIGHT, THIN
from tinydiff.text.tokenizer import PAD_ID
from tinydiff.train.clip import (
    CaptionedDigits, SlotCLIP, draw_captions, load_captioned_mnist, load_clip, slot_accuracy, train_clip,
)
from tinydiff.train.loop import LoopConfig

TOL = 1e-6
PROMPTS = ["a bold 7", "the digit seven, thin, leaning left", "3", "a picture of an 8 standing upright"]
TOKENIZER = Tokenizer.from_captions()


def tiny_config() -> CLIPConfig:
    return CLIPConfig(
        TextEncoderConfig(width=16, layers=2, heads=2, projection_dim=8),
        ImageEncoderConfig(channels=(8, 8, 8, 8), groups=4, projection_dim=8),
    )


def tiny_clip(backend="numpy") -> CLIP:
    manual_seed(0)
    return CLIP(tiny_config()).double().to(backend)


def tokens(prompts=PROMPTS):
    return TOKENIZER.encode(prompts)


def images(n, backend="numpy"):
    return to_device(rng(1).uniform(-1, 1, (n, 1, 32, 32)), backend)


# --------------------------------------------------------------------------- gradient checks


def test_text_encoder_gradients_of_both_outputs(backends):
    encoder = tiny_clip(backends).text
    batch = tokens()

    def backward(d):
        encoder.zero_grad()
        encoder(batch.ids, batch.mask)
        encoder.backward(*d)  # d = (d_hidden, d_pooled)
        return {n: p.grad for n, p in encoder.named_parameters()}

    params = {n: p.data for n, p in encoder.named_parameters()}
    errors = gradcheck(lambda: encoder(batch.ids, batch.mask), backward, params)
    assert set(errors) == set(params)
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("which", ["hidden", "pooled"])
def test_text_encoder_backward_takes_either_gradient(which):
    encoder = tiny_clip().text
    batch = tokens()
    hidden, pooled = encoder(batch.ids, batch.mask)
    g = rng(2)
    d_hidden, d_pooled = g.standard_normal(hidden.shape), g.standard_normal(pooled.shape)
    given = (d_hidden, None) if which == "hidden" else (None, d_pooled)
    zeros = (d_hidden, np.zeros_like(d_pooled)) if which == "hidden" else (np.zeros_like(d_hidden), d_pooled)
    grads = []
    for upstream in (given, zeros):
        encoder.zero_grad()
        encoder(batch.ids, batch.mask)
        encoder.backward(*upstream)
        grads.append({n: p.grad.copy() for n, p in encoder.named_parameters()})
    for name in grads[0]:
        np.testing.assert_allclose(grads[0][name], grads[1][name], rtol=1e-12, atol=1e-14, err_msg=name)


def test_image_encoder_gradients(backends):
    manual_seed(0)
    encoder = ImageEncoder(tiny_config().image).double().to(backends)
    errors = gradcheck_module(encoder, images(3, backends))
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("log_scale", [math.log(1 / 0.07), math.log(150.0)], ids=["free", "clipped"])
def test_clip_loss_gradients_including_the_temperature(backends, log_scale):
    model = tiny_clip(backends)
    model.log_scale.data[...] = log_scale
    x, batch = images(4, backends), tokens()

    def backward(dloss):
        model.zero_grad()
        model(x, batch.ids, batch.mask)
        model.backward(float(dloss))
        return {n: p.grad for n, p in model.named_parameters()}

    params = {n: p.data for n, p in model.named_parameters()}
    errors = gradcheck(lambda: np.asarray(model(x, batch.ids, batch.mask)), backward, params)
    assert "log_scale" in errors and max(errors.values()) < TOL, errors
    if log_scale > math.log(100):  # clipped at s = 100: the scale receives no gradient
        backward(1.0)
        assert float(model.log_scale.grad) == 0.0


# --------------------------------------------------------------------------- padding


def test_pad_tokens_do_not_change_the_outputs():
    encoder = tiny_clip().text
    batch = tokens()
    hidden, pooled = encoder(batch.ids, batch.mask)
    other_ids = batch.ids.copy()
    other_ids[~batch.mask] = rng(3).integers(PAD_ID, TOKENIZER.vocab_size, size=int((~batch.mask).sum()))
    assert (other_ids != batch.ids).any()
    hidden2, pooled2 = encoder(other_ids, batch.mask)
    np.testing.assert_allclose(hidden2, hidden, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(pooled2, pooled, rtol=1e-12, atol=1e-14)
    assert not hidden[~batch.mask].any()  # padding positions hold zeros
    # A batch padded to its own longest prompt gives the same embeddings as the full length.
    length = int(batch.mask.sum(axis=1).max())
    hidden3, pooled3 = encoder(batch.ids[:, :length], batch.mask[:, :length])
    np.testing.assert_allclose(hidden3, hidden[:, :length], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(pooled3, pooled, rtol=1e-10, atol=1e-12)


def test_text_encoder_rejects_bad_inputs():
    encoder = tiny_clip().text
    batch = tokens()
    with pytest.raises(ValueError, match="boolean mask"):
        encoder(batch.ids, batch.mask.astype(np.int64))
    with pytest.raises(ValueError, match="L ≤"):
        encoder(np.zeros((2, 40), dtype=np.int64), np.ones((2, 40), dtype=bool))
    for bad_row in ([False] * 16, [True, False, True] + [False] * 13):  # empty; a hole
        mask = batch.mask.copy()
        mask[0] = bad_row
        with pytest.raises(ValueError, match="real tokens then padding"):
            encoder(batch.ids, mask)


# --------------------------------------------------------------------------- config, training


def test_config_json_round_trip():
    config = tiny_config()
    again = CLIPConfig.from_json(config.to_json())
    assert again == config and isinstance(again.image.channels, tuple)
    with pytest.raises(ValueError, match="projection_dim"):
        CLIPConfig(TextEncoderConfig(projection_dim=8), ImageEncoderConfig(projection_dim=16))


def test_captioned_mnist_fits_attributes_on_the_training_split():
    train, test = load_captioned_mnist()
    assert (len(train.labels), len(test.labels)) == (9000, 1000)
    assert train.images.shape[1:] == (1, 32, 32) and train.images.dtype == np.float32
    # Terciles fitted on the training digits split them into thirds; held-out digits only roughly.
    for code in range(3):
        assert abs(np.mean(train.attributes["thickness"] == code) - 1 / 3) < 0.01
        assert abs(np.mean(test.attributes["thickness"] == code) - 1 / 3) < 0.06


def _small_digits(n=96) -> CaptionedDigits:
    """Random 'digits' whose label is written into the pixels, with random attributes."""
    g = rng(4)
    labels = g.integers(0, 10, n)
    x = -np.ones((n, 1, 32, 32), dtype=np.float32)
    for i, d in enumerate(labels):
        x[i, 0, 3 * d : 3 * d + 3, 4:28] = 1.0  # a bar whose height says the digit
    attributes = np.zeros(n, dtype=ATTRIBUTE_DTYPE)
    for field in ("thickness", "slant"):
        attributes[field] = g.integers(0, 3, n)
    attributes["size"] = g.integers(0, 2, n)
    return CaptionedDigits(x, labels, attributes)


def _loop(total_steps, **kwargs):
    return LoopConfig(total_steps=total_steps, lr=3e-3, warmup_steps=5, ema_decay=0.9, **kwargs)


def test_a_short_run_reduces_the_loss():
    config = CLIPConfig(TextEncoderConfig(width=32, layers=1, heads=2, projection_dim=32),
                        ImageEncoderConfig(channels=(8, 16, 16, 16), groups=4, projection_dim=32))
    _, _, result = train_clip(config, _loop(60), batch_size=16, data=_small_digits())
    history = result["history"]
    assert np.mean(history[-10:]) < 0.7 * np.mean(history[:10]), history


def test_checkpoint_reloads_and_resumes_exactly(tmp_path):
    data, path = _small_digits(), tmp_path / "clip.npz"
    straight, _, _ = train_clip(tiny_config(), _loop(6), batch_size=16, data=data)
    train_clip(tiny_config(), _loop(6), batch_size=16, data=data, checkpoint_path=path, stop_at=3)
    resumed, _, result = train_clip(tiny_config(), _loop(6), batch_size=16, data=data,
                                    checkpoint_path=path, resume=True)
    for name, value in straight.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[name], value, err_msg=name)
    loaded, tokenizer = load_clip(path)
    assert tokenizer.to_dict() == TOKENIZER.to_dict()
    for name, value in result["ema"].shadow.items():
        np.testing.assert_array_equal(loaded.state_dict()[name], value, err_msg=name)


# --------------------------------------------------------------------------- metrics


def test_prompt_choice_accuracy_known_answer():
    classes = np.eye(4)  # four prompts, orthogonal
    labels = np.array([0, 1, 2, 3, 0, 1])
    image_emb = 3.0 * classes[labels] + 0.1  # near their class's prompt, scaled: cosine ignores it
    assert prompt_choice_accuracy(image_emb, classes, labels) == 1.0
    assert prompt_choice_accuracy(image_emb, classes, np.array([0, 1, 2, 3, 1, 0])) == pytest.approx(4 / 6)
    per_image = np.stack([classes[[l, (l + 1) % 4]] for l in labels])  # (N, 2, E): own class first
    assert prompt_choice_accuracy(image_emb, per_image, np.zeros(6, dtype=int)) == 1.0


def test_retrieval_recall_with_ties_in_content():
    image_emb = np.eye(4)
    text_emb = np.eye(4)
    text_emb[1] = text_emb[0]  # captions 0 and 1 are the same words: identical embeddings
    assert retrieval_recall_at_1(image_emb, image_emb) == (1.0, 1.0)
    # By pair index, the tie is lost once each way: text 1 finds image 0, image 1 finds text 0.
    assert retrieval_recall_at_1(image_emb, text_emb) == (0.75, 0.75)
    # With content keys, retrieving a pair whose caption says the same thing counts.
    assert retrieval_recall_at_1(image_emb, text_emb, keys=["7", "7", "bold 7", "3"]) == (1.0, 1.0)


def test_caption_content_key():
    assert caption_content_key("a handwritten seven") == caption_content_key("7") == frozenset({"7"})
    assert caption_content_key("the digit 7, bold") == caption_content_key("a bold 7")
    assert caption_content_key("a bold 7") != caption_content_key("a thin 7")
    assert caption_content_key("a picture of an 8 standing upright") == frozenset({"8", "standing", "upright"})


class _OracleCLIP:
    """Embeds an 'image' (its label and attribute signs, given directly) and a prompt (its words)
    in the same 12-D space: one-hot digit, then ±1 for bold/thin, ±1 for right/left."""

    def embed_images(self, x):
        return x

    def embed_texts(self, ids, mask):
        out = np.zeros((len(ids), 12))
        for row, text in enumerate(TOKENIZER.decode(ids)):
            words = text.split()
            digits = [w for w in words if w.isdigit()] + [str(DIGIT_WORDS.index(w)) for w in words if w in DIGIT_WORDS]
            out[row, int(digits[0])] = 1.0
            out[row, 10] = ("bold" in words) - ("thin" in words)
            out[row, 11] = ("right" in words) - ("left" in words)
        return out


def test_evaluate_clip_on_an_oracle():
    g = rng(5)
    n = 200
    labels = g.integers(0, 10, n)
    attributes = np.zeros(n, dtype=ATTRIBUTE_DTYPE)
    attributes["thickness"] = g.integers(0, 3, n)
    attributes["slant"] = g.integers(0, 3, n)
    x = np.zeros((n, 12))
    x[np.arange(n), labels] = 1.0
    x[:, 10] = (attributes["thickness"] == BOLD).astype(float) - (attributes["thickness"] == THIN)
    x[:, 11] = (attributes["slant"] == RIGHT).astype(float) - (attributes["slant"] == LEFT)
    results = evaluate_clip(_OracleCLIP(), TOKENIZER, CaptionedDigits(x, labels, attributes))
    assert results["zero_shot_accuracy"] == 1.0
    assert results["probe_thickness"] == 1.0 and results["probe_slant"] == 1.0
    assert results["probe_thickness_count"] == int(np.isin(attributes["thickness"], (THIN, BOLD)).sum())
    assert results["probe_slant_count"] == int(np.isin(attributes["slant"], (LEFT, RIGHT)).sum())
    assert 0.0 < results["recall_text_to_image"] <= 1.0 and 0.0 < results["recall_image_to_text"] <= 1.0
    assert 0.0 < results["recall_chance"] < 0.2  # many distinct caption contents


def test_embeddings_are_numpy_and_batched():
    model = tiny_clip()
    x = images(7)
    np.testing.assert_allclose(model.embed_images(x, batch_size=3), to_numpy(model.image(x)), rtol=1e-12)
    batch = tokens()
    assert model.embed_texts(batch.ids, batch.mask).shape == (len(PROMPTS), 8)


# --------------------------------------------------------------------------- the slot objective

SCENE_TOKENIZER = scene_tokenizer()
SCENE_CAPTIONS = ["a 3 left of a 7", "two 7s", "the number 42", "an 8 below a 1", "a small 5"]


def tiny_scene_config() -> CLIPConfig:
    config = tiny_config()
    config.text.vocab_size = SCENE_TOKENIZER.vocab_size
    return config


def tiny_slot_clip(backend="numpy", slot_weight=0.7) -> SlotCLIP:
    return SlotCLIP(tiny_scene_config(), slot_weight=slot_weight).double().to(backend)


def slot_inputs(captions=SCENE_CAPTIONS, backend="numpy"):
    batch, targets = SCENE_TOKENIZER.encode(captions), token_slot_labels(captions, SCENE_TOKENIZER)
    return images(len(captions), backend), batch.ids, batch.mask, targets.labels, targets.mask


def test_slot_clip_loss_gradients(backends):
    """L = InfoNCE + λ·L_slots with λ = 0.7: every parameter, the slot head's and the encoders' alike."""
    model = tiny_slot_clip(backends)
    inputs = slot_inputs(backend=backends)

    def backward(dloss):
        model.zero_grad()
        model(*inputs)
        model.backward(float(dloss))
        return {n: p.grad for n, p in model.named_parameters()}

    params = {n: p.data for n, p in model.named_parameters()}
    errors = gradcheck(lambda: np.asarray(model(*inputs)), backward, params)
    assert {"slot_head.weight", "slot_head.bias", "log_scale", "text.token_embedding.weight"} <= set(errors)
    assert max(errors.values()) < TOL, errors


def test_slot_loss_is_the_mean_cross_entropy_over_the_digit_tokens():
    model = tiny_slot_clip()
    x, ids, mask, labels, slot_mask = slot_inputs()
    total = model(x, ids, mask, labels, slot_mask)
    contrastive = CLIP.forward(model, x, ids, mask)  # the same weights, InfoNCE alone
    hidden, _ = model.text(ids, mask)
    w, c = model.slot_head.weight.data, model.slot_head.bias.data
    losses = []
    for b, caption in enumerate(SCENE_CAPTIONS):  # written out token by token
        for t, word in enumerate(["<bos>"] + caption.split() + ["<eos>"]):
            if word.rstrip("s").isdigit():  # "7s" is the tokens 7, s: its digit token is at t
                logits = w @ hidden[b, t] + c  # (K,)
                losses.append(np.log(np.exp(logits).sum()) - logits[labels[b, t]])
    assert len(losses) == 7 == int(slot_mask.sum())
    assert model.terms["slot_loss"] == pytest.approx(np.mean(losses), rel=1e-12)
    assert model.terms["contrastive_loss"] == pytest.approx(contrastive, rel=1e-12)
    assert total == pytest.approx(contrastive + 0.7 * np.mean(losses), rel=1e-12)


def test_without_labelled_tokens_the_slot_clip_is_clip():
    model = tiny_slot_clip()
    x, ids, mask, labels, slot_mask = slot_inputs()
    model.zero_grad()
    loss = model(x, ids, mask, labels, np.zeros_like(slot_mask))  # N = 0: L_slots = 0
    model.backward()
    slot_grads = {n: p.grad.copy() for n, p in model.named_parameters()}
    model.zero_grad()
    assert loss == CLIP.forward(model, x, ids, mask) and model.terms["slot_loss"] == 0.0
    CLIP.backward(model)
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(slot_grads[name], p.grad, err_msg=name)
    assert not slot_grads["slot_head.weight"].any()


def test_slot_clip_starts_from_clip_weights():
    slot_model, plain = SlotCLIP(tiny_scene_config(), seed=3), CLIP(tiny_scene_config(), seed=3)
    state = slot_model.state_dict()
    assert sorted(k for k in state if k.startswith("slot_head.")) == ["slot_head.bias", "slot_head.weight"]
    assert state["slot_head.weight"].shape == (len(TOKEN_SLOTS), 16)
    for name, value in plain.state_dict().items():
        np.testing.assert_array_equal(state[name], value, err_msg=name)


def test_slot_accuracy_known_answer():
    model = tiny_slot_clip()
    model.slot_head.weight.data[...] = 0.0
    model.slot_head.bias.data[...] = 0.0
    model.slot_head.bias.data[TOKEN_SLOTS.index("left")] = 1.0  # always answers "left"
    captions = ["a 3 left of a 7", "two 7s", "a small 5"]  # digit tokens: left, right, count2, small
    result = slot_accuracy(model, SCENE_TOKENIZER, captions, batch_size=2)
    assert result == {"accuracy": 0.25, "tokens": 4,
                      "per_class": {"left": 1.0, "right": 0.0, "count2": 0.0, "small": 0.0}}


def _scene_data(n=96):
    return load_scene_data(n, seed=1)


def test_slots_objective_needs_scenes():
    for data in (None, _small_digits()):
        with pytest.raises(ValueError, match="needs scene captions") as info:
            train_clip(tiny_config(), _loop(2), batch_size=8, data=data, text_objective="slots")
        assert "\n" not in str(info.value) and "text objective 'contrastive'" in str(info.value)
    with pytest.raises(ValueError, match="choose one of contrastive, slots"):
        train_clip(tiny_config(), _loop(2), batch_size=8, data=_small_digits(), text_objective="roles")


def test_slots_training_reduces_the_slot_loss():
    logs = []
    train_clip(tiny_scene_config(), _loop(60), batch_size=16, data=_scene_data(), tokenizer=SCENE_TOKENIZER,
               text_objective="slots", callback=logs.append)
    slot_losses = [log["slot_loss"] for log in logs]
    assert {"contrastive_loss", "slot_loss", "slot_accuracy", "scale"} <= set(logs[0])
    assert np.mean(slot_losses[-10:]) < 0.6 * np.mean(slot_losses[:10]), slot_losses
    for log in logs:  # the loop's loss is the sum the objective says
        assert log["loss"] == pytest.approx(log["contrastive_loss"] + log["slot_loss"], rel=1e-6)


def test_a_slots_step_scores_the_labels_of_its_own_captions():
    """The first step's logged terms are those of the initial SlotCLIP on that step's batch, with
    the labels of the very captions drawn for it (batch order and captions rebuilt by hand)."""
    data, logs = _scene_data(), []
    train_clip(tiny_scene_config(), _loop(1), batch_size=16, data=data, tokenizer=SCENE_TOKENIZER,
               text_objective="slots", callback=logs.append)
    idx = step_batches(len(data.images), 16, seed=1)(0)  # train_clip: loop.seed + 1
    captions = draw_captions(data, idx, rng(0))  # the loop's generator, seeded with loop.seed
    batch, targets = SCENE_TOKENIZER.encode(captions), token_slot_labels(captions, SCENE_TOKENIZER)
    model = SlotCLIP(tiny_scene_config(), seed=0)
    loss = model(data.images[idx], batch.ids, batch.mask, targets.labels, targets.mask)
    assert logs[0]["loss"] == loss
    assert (logs[0]["slot_loss"], logs[0]["slot_accuracy"]) == (model.terms["slot_loss"], model.terms["slot_accuracy"])


def test_slots_checkpoint_resumes_exactly_and_load_clip_drops_the_head(tmp_path):
    data, path = _scene_data(), tmp_path / "clip.npz"
    kwargs = dict(batch_size=16, data=data, tokenizer=SCENE_TOKENIZER, text_objective="slots", slot_weight=0.5)
    straight, _, _ = train_clip(tiny_scene_config(), _loop(6), **kwargs)
    train_clip(tiny_scene_config(), _loop(6), checkpoint_path=path, stop_at=3, **kwargs)
    with pytest.raises(ValueError, match="trained with text objective 'slots'"):
        train_clip(tiny_scene_config(), _loop(6), checkpoint_path=path, resume=True,
                   **(kwargs | {"text_objective": "contrastive"}))
    resumed, _, result = train_clip(tiny_scene_config(), _loop(6), checkpoint_path=path, resume=True, **kwargs)
    assert "slot_head.weight" in straight.state_dict()
    for name, value in straight.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[name], value, err_msg=name)
    loaded, tokenizer = load_clip(path)
    assert type(loaded) is CLIP and tokenizer.to_dict() == SCENE_TOKENIZER.to_dict()
    assert set(loaded.state_dict()) == {k for k in result["ema"].shadow if not k.startswith("slot_head.")}
    for name, value in loaded.state_dict().items():
        np.testing.assert_array_equal(value, result["ema"].shadow[name], err_msg=name)
    with_head, _ = load_clip(path, weights="last", slot_head=True)
    assert isinstance(with_head, SlotCLIP) and with_head.slot_weight == 0.5
    for name, value in straight.state_dict().items():
        np.testing.assert_array_equal(with_head.state_dict()[name], value, err_msg=name)
