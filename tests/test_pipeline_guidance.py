"""Classifier-free guidance in the text-to-image pipeline: which context is the unconditional side.

The pipeline runs the U-Net once per denoiser call on [unconditional; conditional] (2B rows). The
unconditional half must be the negative prompt's encoding when one is given, and the U-Net's
learned null context ∅ otherwise (Ho & Salimans 2022; a negative prompt is simply a different
unconditional context). A spy on the U-Net's forward records what it receives.
"""

import numpy as np
import pytest

from tinydiff.pipeline import TextToImagePipeline

PROMPT = "a bold handwritten 7"
NEGATIVE = "a thin handwritten 1"
STEPS, IMAGES = 2, 2


@pytest.fixture(scope="module")
def pipe():
    pipe = TextToImagePipeline.from_pretrained()
    pipe.threads = 1  # the U-Net sees whole batches (no split over threads), so the spy sees [uncond; cond]
    return pipe


@pytest.fixture
def unet_calls(pipe, monkeypatch):
    """Every U-Net call's (t, context) during a test, the real U-Net still computing the output."""
    calls = []
    forward = pipe.unet.forward

    def spy(x, t, context, *args, **kwargs):
        calls.append({"t": np.array(t), "context": np.array(context)})
        return forward(x, t, context, *args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", spy)  # an instance attribute: Module.__call__ finds it first
    return calls


def check_guided_calls(calls, uncond, cond):
    """Each call ran [uncond; cond] as one batch of 2B rows at one timestep per image."""
    assert len(calls) == STEPS  # DPM++ 2M: one denoiser call per step
    for call in calls:
        context = call["context"]
        assert context.shape == (2 * IMAGES,) + cond.shape[1:]
        np.testing.assert_array_equal(context[:IMAGES], uncond)  # the unconditional side comes first
        np.testing.assert_array_equal(context[IMAGES:], cond)
        np.testing.assert_array_equal(call["t"][:IMAGES], call["t"][IMAGES:])


def test_the_negative_prompt_is_the_unconditional_side_of_guidance(pipe, unet_calls):
    pipe(PROMPT, negative_prompt=NEGATIVE, num_images=IMAGES, steps=STEPS, guidance_scale=3.0, seed=0)
    negative = pipe.encode_prompt([NEGATIVE] * IMAGES)  # (B, L, D)
    assert not np.allclose(negative, pipe.unet.null_context(IMAGES))  # the two candidates differ
    check_guided_calls(unet_calls, negative, pipe.encode_prompt([PROMPT] * IMAGES))


@pytest.mark.parametrize("negative_prompt", [None, ""])
def test_without_a_negative_prompt_the_learned_null_context_is_unconditional(pipe, unet_calls, negative_prompt):
    pipe(PROMPT, negative_prompt=negative_prompt, num_images=IMAGES, steps=STEPS, guidance_scale=3.0, seed=0)
    check_guided_calls(unet_calls, pipe.unet.null_context(IMAGES), pipe.encode_prompt([PROMPT] * IMAGES))


def test_guidance_zero_with_a_negative_prompt_samples_the_negative_prompt(pipe):
    """w = 0 keeps only the unconditional side, x̂0 = x̂0(uncond): with negative prompt N it is the
    same sampler run as the plain prompt N at w = 1 (one U-Net pass per step, on N alone)."""
    _, zero = pipe(PROMPT, negative_prompt=NEGATIVE, num_images=IMAGES, steps=STEPS, guidance_scale=0.0, seed=3,
                   return_latents=True)
    _, negative = pipe(NEGATIVE, num_images=IMAGES, steps=STEPS, guidance_scale=1.0, seed=3, return_latents=True)
    _, prompt = pipe(PROMPT, num_images=IMAGES, steps=STEPS, guidance_scale=1.0, seed=3, return_latents=True)
    np.testing.assert_allclose(zero, negative, rtol=1e-4, atol=1e-4)  # float32, batch of 2B vs B
    assert np.abs(negative - prompt).max() > 1e-2  # the prompts lead to different latents


def test_each_distinct_prompt_is_encoded_once_and_its_states_repeated(pipe, monkeypatch):
    prompts = [PROMPT, NEGATIVE, PROMPT, PROMPT, NEGATIVE]
    alone = {p: pipe.encode_prompt([p]) for p in (PROMPT, NEGATIVE)}  # (1, L, D) each
    rows = []
    forward = pipe.text_encoder.forward

    def spy(ids, mask, *args, **kwargs):
        rows.append(len(ids))
        return forward(ids, mask, *args, **kwargs)

    monkeypatch.setattr(pipe.text_encoder, "forward", spy)
    hidden = pipe.encode_prompt(prompts)  # (5, L, D)
    assert rows == [2]  # one encoder call on the two distinct prompts
    assert hidden.shape[0] == len(prompts)
    for i, prompt in enumerate(prompts):
        np.testing.assert_allclose(hidden[i], alone[prompt][0], rtol=0, atol=1e-5)  # float32 rounding of a batch
        np.testing.assert_array_equal(hidden[i], hidden[prompts.index(prompt)])  # repeats are the same rows


def test_with_two_threads_each_unet_call_gets_both_guidance_halves_of_its_own_images(pipe, unet_calls):
    """With guidance and rows split over threads, each call holds [uncond; cond] of the same images
    (backend.map_row_pairs), so the U-Net can run their shared start once; unguided, plain blocks."""
    pipe.threads = 2
    try:
        pipe(PROMPT, num_images=4, steps=STEPS, guidance_scale=3.0, seed=0)
        guided = list(unet_calls)
        unet_calls.clear()
        pipe(PROMPT, num_images=4, steps=STEPS, guidance_scale=1.0, seed=0)
    finally:
        pipe.threads = 1
    null, cond = pipe.unet.null_context(1)[0], pipe.encode_prompt([PROMPT])[0]
    assert len(guided) == 2 * STEPS  # two threads per denoiser call
    for call in guided:
        context = call["context"]
        assert len(context) == 4  # 2 images × [uncond; cond]
        np.testing.assert_array_equal(context[:2], np.stack([null, null]))
        np.testing.assert_array_equal(context[2:], np.stack([cond, cond]))
        np.testing.assert_array_equal(call["t"][:2], call["t"][2:])
    assert len(unet_calls) == 2 * STEPS and all(len(call["context"]) == 2 for call in unet_calls)
