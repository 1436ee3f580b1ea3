"""The prompt language (infra.engine.prompts): A1111's emphasis syntax and long prompts, held
against the tiny SD 1.x and SDXL models on the CPU:

- the parser gives A1111's weights: `(a)` 1.1, `((a))` 1.21, `[a]` 1/1.1, `(a:1.3)`, nesting,
  escapes, unbalanced brackets, BREAK; chunks are 75 tokens framed by start/end, BREAK and the
  comma backtrack start the next one;
- `(word:1.0)` gives exactly what `word` gives (embeddings and images, on every pipeline variant
  and the highres pass); a plain prompt that fits is left to the pipeline, and the embeddings this
  module computes for it are bit-identical to the pipeline's own `encode_prompt` (with clip_skip,
  and on SDXL with the pooled embedding);
- a weight scales its tokens as A1111 does (times the weight, the chunk rescaled to its mean),
  a higher weight changes the image more, on SD 1.x and SDXL (both encoders; the pooled embedding
  comes from the parsed text, unweighted, as in A1111);
- a prompt past 77 tokens is not truncated: a word at token ~100 changes the image (which the
  pipeline alone ignores), and a positive and negative prompt of different lengths work.

64x64 images, 2 steps.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from infra.catalog.weights import WeightsStore
from infra.engine import prompts
from infra.engine.adapters import text_model_alias
from infra.engine.engine import DiffusersEngine
from infra.engine.files.tiny import build_tiny_sdxl
from infra.engine.prompts import BREAK, encode, parse_prompt_attention, prompt_chunks
from infra.jobs.params import HighresFix
from infra.net.inputs import encode_input
from infra.settings import Settings
from tests.conftest import centre_mask, generation_params, scene, video_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SD = "tiny-sd"
SDXL = "tiny-sdxl"
INPAINT = "tiny-sd-inpaint"


@pytest.fixture(scope="module")
def engine(models_dir, tmp_path_factory) -> DiffusersEngine:
    """The real engine on the built-in tiny models and a tiny SDXL, in a store of this module's own."""
    root = tmp_path_factory.mktemp("prompts")
    shutil.copytree(models_dir, root / "models")
    weights = WeightsStore(root / "models")
    weights.install(SDXL, "stable_diffusion_xl", build_tiny_sdxl, family="sdxl")
    engine = DiffusersEngine(Settings(_env_file=None, models_dir=weights.root, device="cpu"), weights)
    # The tiny SD text encoder's final layer norm has no bias (its init), so every token vector it
    # gives has mean 0 and A1111's mean rescale has nothing to hold on to. A real CLIP's learned
    # bias is not zero: give the tiny one a bias, so that the rescale is exercised as on real models.
    norm = engine.cache.model(SD).pipeline.text_encoder.final_layer_norm
    with torch.no_grad():
        norm.bias.copy_(torch.randn(norm.bias.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    return engine


def pipeline(engine, model_id: str):
    return engine.cache.model(model_id).pipeline


def own_encoding(engine, model_id: str, prompt: str, negative: str | None, clip_skip: int | None = None):
    """The pipeline's own encode_prompt (what it computes from the plain strings)."""
    model = engine.cache.model(model_id)
    with text_model_alias(model), torch.inference_mode():
        return model.pipeline.encode_prompt(
            prompt,
            device="cpu",
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negative,
            clip_skip=clip_skip,
        )


def image(engine, prompt: str, **fields) -> np.ndarray:
    inputs = fields.pop("inputs", {})
    if fields.get("model_id") == SDXL:
        fields.setdefault("scheduler", "EulerDiscreteScheduler")  # the tiny SDXL's own (PNDM does not fit its config)
    (result,) = engine.generate(generation_params(prompt=prompt, **fields), inputs)
    return np.asarray(result.convert("RGB"), dtype=np.int16)


def change(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


# --------------------------------------------------------------------------- the parser


@pytest.mark.parametrize(
    ("text", "runs"),
    [
        ("a cat", [("a cat", 1.0)]),
        ("a (cat)", [("a ", 1.0), ("cat", 1.1)]),
        ("a ((cat))", [("a ", 1.0), ("cat", 1.1 * 1.1)]),
        ("a (((cat)))", [("a ", 1.0), ("cat", 1.1 * 1.1 * 1.1)]),
        ("a [cat]", [("a ", 1.0), ("cat", 1 / 1.1)]),
        ("a [[cat]]", [("a ", 1.0), ("cat", 1 / 1.1 / 1.1)]),
        ("a (cat:1.3)", [("a ", 1.0), ("cat", 1.3)]),
        ("a (cat: 0.5 )", [("a ", 1.0), ("cat", 0.5)]),
        ("a (cat:-1)", [("a ", 1.0), ("cat", -1.0)]),
        ("((cat:1.3))", [("cat", 1.3 * 1.1)]),
        ("(a (b:1.5) c)", [("a ", 1.1), ("b", 1.5 * 1.1), (" c", 1.1)]),
        ("[a (b)]", [("a ", 1 / 1.1), ("b", 1.1 / 1.1)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (r"\(literal\]", [("(literal]", 1.0)]),
        (r"a \(cat\) \\ b", [("a (cat) \\ b", 1.0)]),
        (r"(a \(b\))", [("a (b)", 1.1)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("[unbalanced", [("unbalanced", 1 / 1.1)]),
        ("stray) and ] and :", [("stray) and ] and :", 1.0)]),
        ("a cat:1.3", [("a cat:1.3", 1.0)]),
        ("(cat:1.0)", [("cat", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_the_parser_gives_a1111s_weights(text, runs):
    parsed = parse_prompt_attention(text)
    assert [t for t, _ in parsed] == [t for t, _ in runs]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in runs], rel=1e-12)


def test_the_parser_matches_a1111s_own_example_to_the_last_bit():
    # the doctest of A1111's modules/prompt_parser.py
    assert parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0),
        ("house", 1.5730000000000004),
        (" ", 1.1),
        ("on", 1.0),
        (" a ", 1.1),
        ("hill", 0.55),
        (", sun, ", 1.1),
        ("sky", 1.4641000000000006),
        (".", 1.1),
    ]


def test_break_always_breaks_and_is_a_whole_word():
    assert parse_prompt_attention("a cat BREAK a dog") == [("a cat", 1.0), BREAK, ("a dog", 1.0)]
    assert parse_prompt_attention("(a BREAK b)") == [("a", 1.1), BREAK, ("b", 1.1)]  # A1111 would take it for text
    assert parse_prompt_attention("a BREAK BREAK b") == [("a", 1.0), BREAK, ("", 1.0), BREAK, ("b", 1.0)]
    assert parse_prompt_attention("BREAKfast, break") == [("BREAKfast, break", 1.0)]


def test_plain_text_is_recognised():
    assert prompts.is_plain("a photo of a cat, 4k")
    assert prompts.is_plain("stray ) bracket")
    for text in ("a (cat)", "(cat:1.0)", r"\(cat\)", "a [cat]", "a BREAK b", "(open"):
        assert not prompts.is_plain(text)


# --------------------------------------------------------------------------- chunks


def chars(texts):  # a tokenizer stand-in: one token per character
    return [[ord(c) for c in text] for text in texts]


START, END, COMMA = 1, 2, ord(",")


def chunks_of(text, **kwargs):
    return prompt_chunks(parse_prompt_attention(text), chars, START, END, COMMA, **kwargs)


def test_a_prompt_fills_chunks_of_75_tokens_each_framed_by_start_and_end():
    (one,) = chunks_of("a" * 75)
    assert one.tokens == [START] + [ord("a")] * 75 + [END]
    first, second = chunks_of("a" * 75 + "b" * 5)
    assert first.tokens == [START] + [ord("a")] * 75 + [END]
    assert second.tokens == [START] + [ord("b")] * 5 + [END] * 71
    assert len(second.multipliers) == 77 and set(second.multipliers) == {1.0}
    (empty,) = chunks_of("")
    assert empty.tokens == [START] + [END] * 76


def test_chunks_carry_each_tokens_weight_and_1_for_start_end_and_padding():
    (chunk,) = chunks_of("ab(cd:1.5)[e]")
    assert chunk.tokens[:7] == [START, *map(ord, "abcde"), END]
    assert chunk.multipliers[:7] == pytest.approx([1.0, 1.0, 1.0, 1.5, 1.5, 1 / 1.1, 1.0])
    assert set(chunk.multipliers[7:]) == {1.0}


def test_break_starts_a_new_chunk():
    first, second = chunks_of("ab BREAK (cd)")
    assert first.tokens[:4] == [START, ord("a"), ord("b"), END]
    assert second.tokens[:4] == [START, ord("c"), ord("d"), END]
    assert second.multipliers[1:3] == [1.1, 1.1]


def test_a_comma_near_the_end_of_a_full_chunk_moves_the_text_after_it_on():
    text = "a" * 60 + "," + "b" * 20  # the chunk fills at 14 b's, 15 tokens after the comma (<= 20)
    first, second = chunks_of(text)
    assert first.tokens == [START] + [ord("a")] * 60 + [COMMA] + [END] * 15
    assert second.tokens[:22] == [START] + [ord("b")] * 20 + [END]
    far, rest = chunks_of("a" * 40 + "," + "b" * 40)  # comma 34 tokens back: no backtrack
    assert far.tokens[1:76] == [ord("a")] * 40 + [COMMA] + [ord("b")] * 34
    assert rest.tokens[1:8] == [ord("b")] * 6 + [END]
    plain, _ = chunks_of(text, backtrack=0)
    assert plain.tokens[1:76] == [ord("a")] * 60 + [COMMA] + [ord("b")] * 14


def test_a_multi_vector_embedding_is_never_split_between_chunks():
    def with_group(texts):  # "E" stands for a 3-vector embedding's tokens
        return [[(7, 8, 9) if c == "E" else ord(c) for c in text] for text in texts]

    first, second = prompt_chunks(parse_prompt_attention("a" * 73 + "(E)"), with_group, START, END, COMMA)
    assert first.tokens == [START] + [ord("a")] * 73 + [END] * 3
    assert second.tokens[:5] == [START, 7, 8, 9, END] and second.multipliers[1:4] == [1.1] * 3


# --------------------------------------------------------------------------- embeddings: unchanged where nothing changes


@pytest.mark.parametrize("model_id", [SD, SDXL])
def test_a_plain_prompt_that_fits_is_left_to_the_pipeline(engine, model_id):
    pipe = pipeline(engine, model_id)
    assert encode(pipe, "a photo of a cat", None) is None
    assert encode(pipe, "a photo of a cat", "blurry, ugly", 1) is None
    assert encode(pipe, "x" * 75, "y" * 75) is None  # 75 tokens fit (77 with start and end)
    assert encode(pipe, "(a cat)", None) is not None
    assert encode(pipe, "a cat", "(blurry)") is not None
    assert encode(pipe, "x " * 76, None) is not None


@pytest.mark.parametrize("model_id", [SD, SDXL])
@pytest.mark.parametrize("clip_skip", [None, 1, 3])
def test_unit_weights_give_exactly_the_pipelines_own_embeddings(engine, model_id, clip_skip):
    pipe = pipeline(engine, model_id)
    ours = encode(pipe, "(a photo of a cat:1.0)", "[(blurry)]", clip_skip)  # 1.1 / 1.1 = 1.0
    own = own_encoding(engine, model_id, "a photo of a cat", "blurry", clip_skip)
    assert torch.equal(ours["prompt_embeds"], own[0])
    assert torch.equal(ours["negative_prompt_embeds"], own[1])
    if model_id == SDXL:
        assert torch.equal(ours["pooled_prompt_embeds"], own[2])
        assert torch.equal(ours["negative_pooled_prompt_embeds"], own[3])


def test_sdxl_without_a_negative_prompt_gets_the_pipelines_zero_negative(engine):
    ours = encode(pipeline(engine, SDXL), "(a cat:1.0)", None)
    own = own_encoding(engine, SDXL, "a cat", None)
    assert torch.equal(ours["negative_prompt_embeds"], own[1]) and not own[1].any()
    assert torch.equal(ours["negative_pooled_prompt_embeds"], own[3]) and not own[3].any()


def test_a_textual_inversion_token_keeps_working_inside_the_syntax(engine):
    pipe = pipeline(engine, SD)
    pipe.load_textual_inversion(torch.randn(3, 32, generator=torch.Generator().manual_seed(0)), token="<emb>")
    try:
        ours = encode(pipe, "a (<emb>:1.0) cat", None)
        own = own_encoding(engine, SD, "a <emb> cat", None)
        assert torch.equal(ours["prompt_embeds"], own[0])
        # its 3 vectors do not fit after 73 tokens: they open the second chunk, as in A1111
        embeds = encode(pipe, "x" * 73 + " <emb>", None)["prompt_embeds"]
        assert torch.equal(embeds[:, :77], own_encoding(engine, SD, "x" * 73, None)[0])
        assert torch.equal(embeds[:, 77:], own_encoding(engine, SD, "<emb>", None)[0])
    finally:
        pipe.unload_textual_inversion(tokens=["<emb>", "<emb>_1", "<emb>_2"])


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"model_id": SDXL},
        {"clip_skip": 2},
        {"negative_prompt": "blurry, ugly"},
        {"task": "img2img", "strength": 0.7, "inputs": {"init_image": encode_input(scene(64, 64))}},
        {
            "model_id": INPAINT,
            "task": "inpaint",
            "strength": 1.0,
            "inputs": {"init_image": encode_input(scene(64, 64)), "mask_image": encode_input(centre_mask(64, 64))},
        },
        {"panorama": True, "width": 128},
        {"self_attention": True},
        {"highres_fix": HighresFix(width=96, height=96, strength=0.5)},
    ],
    ids=["sd", "sdxl", "clip-skip", "negative", "img2img", "inpaint", "panorama", "self-attention", "highres"],
)
def test_unit_weights_give_the_identical_image_and_weights_change_it(engine, fields):
    plain = image(engine, "a cat on a mat", **fields)
    assert np.array_equal(image(engine, "(a cat on a mat:1.0)", **fields), plain)
    assert np.array_equal(image(engine, "(a cat:1.0) on a ([mat]:1.1)", **fields), plain)
    assert not np.array_equal(image(engine, "a (cat:1.6) on a mat", **fields), plain)


def test_controlnet_pipelines_take_the_embeddings(engine):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    base = pipeline(engine, SD)
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    scheduler = type(base.scheduler).from_config(base.scheduler.config)
    pipe = StableDiffusionControlNetPipeline.from_pipe(base, controlnet=controlnet, scheduler=scheduler)

    def render(prompt):
        call = prompts.text_call(pipe, prompt, {"negative_prompt": "blurry", "clip_skip": None})
        with torch.inference_mode():
            return pipe(
                image=scene(64, 64),
                num_inference_steps=2,
                height=64,
                width=64,
                output_type="np",
                generator=torch.Generator().manual_seed(1),
                **call,
            ).images

    assert "prompt_embeds" in prompts.text_call(pipe, "(a cat:1.0)", {"negative_prompt": None})
    assert np.array_equal(render("(a cat:1.0)"), render("a cat"))
    assert not np.array_equal(render("a (cat:1.6)"), render("a cat"))


def test_video_takes_the_syntax_too(engine):
    plain = engine.video(video_params(prompt="a boat on a lake"))
    same = engine.video(video_params(prompt="a (boat:1.0) on a lake"))
    weighted = engine.video(video_params(prompt="a (boat:1.6) on a lake"))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain, same))
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain, weighted))
    assert len(engine.video(video_params(prompt="a boat on a lake " * 12))) == len(plain)  # long: 2 chunks


# --------------------------------------------------------------------------- weights


def expected_emphasis(base: torch.Tensor, multipliers: list[float]) -> torch.Tensor:
    """A1111's "Original" emphasis, written out: z * w, rescaled to the original mean."""
    weighted = base * torch.tensor(multipliers).reshape(1, -1, 1)
    return weighted * (base.mean() / weighted.mean())


def test_a_weight_scales_its_tokens_as_a1111_does_on_sd(engine):
    pipe = pipeline(engine, SD)
    base = own_encoding(engine, SD, "a cat", None)[0]  # tokens: start, "a", "c", "a", "t", end...
    weighted = encode(pipe, "a (cat:1.5)", None)["prompt_embeds"]
    multipliers = [1.0, 1.0, 1.5, 1.5, 1.5] + [1.0] * 72
    assert torch.allclose(weighted, expected_emphasis(base, multipliers), atol=1e-6)
    assert torch.allclose(
        encode(pipe, "a ((cat))", None)["prompt_embeds"],
        expected_emphasis(base, [1.0, 1.0] + [1.21] * 3 + [1.0] * 72),
        atol=1e-6,
    )
    assert torch.allclose(
        encode(pipe, "a [cat]", None)["prompt_embeds"],
        expected_emphasis(base, [1.0, 1.0] + [1 / 1.1] * 3 + [1.0] * 72),
        atol=1e-6,
    )


def test_a_chunk_with_zero_mean_keeps_its_weighted_vectors_unscaled(engine):
    pipe = pipeline(engine, INPAINT)  # the tiny text encoder as built: a final layer norm without bias
    base = own_encoding(engine, INPAINT, "a cat", None)[0]
    assert abs(float(base.mean())) < 1e-6  # A1111 would divide by (almost) zero here
    weighted = encode(pipe, "a (cat:1.5)", None)["prompt_embeds"]
    assert torch.isfinite(weighted).all()
    assert torch.allclose(weighted, base * torch.tensor([1.0, 1.0, 1.5, 1.5, 1.5] + [1.0] * 72).reshape(1, -1, 1))


@pytest.mark.parametrize("model_id", [SD, SDXL])
def test_a_higher_weight_stands_out_more(engine, model_id):
    """The weighted token's vector grows against the rest of the prompt's as its weight does."""
    pipe = pipeline(engine, model_id)

    def share(weight):
        z = encode(pipe, f"a (cat:{weight}) on a mat", None)["prompt_embeds"][0]
        return float(z[2:5].norm(dim=-1).mean() / z[[1, 5, 6, 7, 8, 9, 10]].norm(dim=-1).mean())

    shares = [share(w) for w in (0.5, 0.9, 1.0, 1.2, 2.0)]
    assert shares == sorted(shares) and shares[0] < shares[-1] / 3


def test_sdxl_weights_act_on_both_encoders_and_the_pooled_embedding_is_the_parsed_texts(engine):
    pipe = pipeline(engine, SDXL)
    base = own_encoding(engine, SDXL, "a cat", "ugly")
    ours = encode(pipe, "a (cat:1.5)", "(ugly:0.5)")
    multipliers = [1.0, 1.0, 1.5, 1.5, 1.5] + [1.0] * 72
    for features in (slice(0, 32), slice(32, 96)):  # CLIP-L, then OpenCLIP-G: each rescaled to its own mean
        assert torch.allclose(
            ours["prompt_embeds"][..., features], expected_emphasis(base[0][..., features], multipliers), atol=1e-5
        )
        assert torch.allclose(
            ours["negative_prompt_embeds"][..., features],
            expected_emphasis(base[1][..., features], [1.0] + [0.5] * 4 + [1.0] * 72),
            atol=1e-5,
        )
    # pooled: the text without the syntax, unweighted (A1111: zs[0].pooled), not the literal brackets
    assert torch.equal(ours["pooled_prompt_embeds"], base[2])
    assert torch.equal(ours["negative_pooled_prompt_embeds"], base[3])
    literal = own_encoding(engine, SDXL, "a (cat:1.5)", "(ugly:0.5)")
    assert not torch.allclose(ours["pooled_prompt_embeds"], literal[2])


@pytest.mark.parametrize("model_id", [SD, SDXL])
def test_a_higher_weight_changes_the_image_more(engine, model_id):
    plain = image(engine, "a cat on a mat", model_id=model_id)
    changes = [change(image(engine, f"a (cat:{w}) on a mat", model_id=model_id), plain) for w in (1.1, 1.5, 3.0)]
    assert 0 < changes[0] < changes[1] < changes[2]


# --------------------------------------------------------------------------- long prompts


WORDS = [f"w{i % 10}" for i in range(45)]  # the tiny tokenizer: "w3" is 2 tokens, so 90 tokens


def long_prompt(**replace) -> str:
    return " ".join(replace.get(str(i), word) for i, word in enumerate(WORDS)) + " the end of it all"


@pytest.mark.parametrize("model_id", [SD, SDXL])
def test_a_long_prompt_is_chunked_and_not_truncated(engine, model_id):
    pipe = pipeline(engine, model_id)
    width = 32 if model_id == SD else 96
    embeds = encode(pipe, long_prompt(), None)
    assert embeds["prompt_embeds"].shape == (1, 154, width)
    assert embeds["negative_prompt_embeds"].shape == (1, 154, width)  # the empty negative, padded
    # the first chunk is the pipeline's own encoding of the first 75 tokens
    own = own_encoding(engine, model_id, " ".join(WORDS[:37]) + " w", None)  # 37 words + "w": 75 tokens
    assert torch.equal(embeds["prompt_embeds"][:, :77], own[0])

    plain = image(engine, long_prompt(), model_id=model_id)
    changed = long_prompt(**{"42": "zebra"})  # word 42: tokens 85-86, and "the end" is past token 90
    assert not np.array_equal(image(engine, changed, model_id=model_id), plain)
    alone = pipe(
        prompt=long_prompt(),
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(7),
    ).images
    alone_changed = pipe(
        prompt=changed,
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(7),
    ).images
    assert np.array_equal(alone, alone_changed)  # the pipeline alone truncated at 77: it never saw word 42


def test_break_chunks_are_encoded_on_their_own(engine):
    pipe = pipeline(engine, SD)
    embeds = encode(pipe, "a cat BREAK on a mat", None)["prompt_embeds"]
    assert embeds.shape == (1, 154, 32)
    assert torch.equal(embeds[:, :77], own_encoding(engine, SD, "a cat", None)[0])
    assert torch.equal(embeds[:, 77:], own_encoding(engine, SD, "on a mat", None)[0])


@pytest.mark.parametrize("model_id", [SD, SDXL])
def test_prompt_and_negative_of_different_lengths_are_padded_alike(engine, model_id):
    pipe = pipeline(engine, model_id)
    empty = own_encoding(engine, model_id, "", "")[1]
    short_negative = encode(pipe, long_prompt(), "blurry")
    assert short_negative["negative_prompt_embeds"].shape[1] == 154
    assert torch.equal(short_negative["negative_prompt_embeds"][:, 77:], empty)  # padded with the empty prompt
    long_negative = encode(pipe, "a (cat)", long_prompt())
    assert long_negative["prompt_embeds"].shape[1] == long_negative["negative_prompt_embeds"].shape[1] == 231 - 77
    three = encode(pipe, "a cat", "ugly BREAK blurry BREAK dark")
    assert three["prompt_embeds"].shape[1] == three["negative_prompt_embeds"].shape[1] == 231

    plain = image(engine, "a cat", negative_prompt=long_prompt(), model_id=model_id)
    changed = image(engine, "a cat", negative_prompt=long_prompt(**{"42": "zebra"}), model_id=model_id)
    assert not np.array_equal(plain, changed)  # the negative's second chunk counts too
    assert image(engine, long_prompt(), negative_prompt="(blurry:1.3)", model_id=model_id).shape == (64, 64, 3)


def test_clip_skip_still_applies_with_the_syntax(engine):
    pipe = pipeline(engine, SD)
    skipped = encode(pipe, "a (cat:1.5)", None, 1)["prompt_embeds"]
    base = own_encoding(engine, SD, "a cat", None, clip_skip=1)[0]
    assert torch.allclose(skipped, expected_emphasis(base, [1.0, 1.0, 1.5, 1.5, 1.5] + [1.0] * 72), atol=1e-6)
    assert not np.array_equal(image(engine, "a (cat:1.5)", clip_skip=2), image(engine, "a (cat:1.5)"))
