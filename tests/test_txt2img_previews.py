"""The txt2img tab's settings as a run's preview settings (ti_host.txt2img): the web UIs' sampler names, seeds,
sizes and prompts mapped to ours, and a few words for whatever could not be taken as it is."""

from __future__ import annotations

import types

import pytest

from ti_core.config import PREVIEW_SAMPLERS, TrainConfig
from ti_host.txt2img import TXT2IMG_ELEM_IDS, Txt2imgCapture, preview_from_txt2img

# The Train tab's preview fields as a user left them.
FIELDS = {
    "preview_prompt": "a photo of zzqq",
    "preview_negative_prompt": "",
    "preview_sampler": "ddim",
    "preview_steps": 20,
    "preview_guidance": 7.0,
    "preview_seed": 1234,
    "preview_width": 0,
    "preview_height": 0,
}
# A1111 1.10's txt2img tab as a user filled it in.
A1111 = {
    "prompt": "a photo of zzqq\nin a park",
    "negative_prompt": "blurry,\n  lowres",
    "sampler": "Euler a",
    "scheduler": "Automatic",
    "steps": 28,
    "cfg_scale": 5.5,
    "seed": 42,
    "width": 640,
    "height": 768,
}


def test_every_value_is_taken_and_makes_a_valid_config(tmp_path):
    settings, notes = preview_from_txt2img(A1111, FIELDS)
    assert settings == {
        "preview_prompt": "a photo of zzqq in a park",  # one prompt, not two
        "preview_negative_prompt": "blurry, lowres",
        "preview_sampler": "euler_a",
        "preview_steps": 28,
        "preview_guidance": 5.5,
        "preview_seed": 42,
        "preview_width": 640,
        "preview_height": 768,
    }
    assert notes == []
    config = TrainConfig.from_dict(
        {"name": "zzqq", "embeddings_dir": str(tmp_path), "data": {"images": str(tmp_path)}, **FIELDS, **settings}
    )
    assert (config.preview_sampler, config.preview_width) == ("euler_a", 640)


@pytest.mark.parametrize(
    ("sampler", "scheduler", "ours"),
    [
        ("DPM++ 2M", "Karras", "dpm++_2m_karras"),
        ("DPM++ 2M", "Automatic", "dpm++_2m_karras"),  # A1111 1.10's and Forge's default for DPM++ 2M
        ("DPM++ 2M", None, "dpm++_2m"),  # SD.Next: no schedule type beside the sampler
        ("DPM++ 2M Karras", None, "dpm++_2m_karras"),  # A1111 before 1.9
        ("Euler a", "Automatic", "euler_a"),
        ("Euler", "Automatic", "euler"),
        ("DDIM", "Automatic", "ddim"),
        ("UniPC", "Automatic", "unipc"),
        ("UniPC", None, "unipc"),
    ],
)
def test_the_web_uis_samplers_map_to_ours(sampler, scheduler, ours):
    txt2img = {"sampler": sampler} if scheduler is None else {"sampler": sampler, "scheduler": scheduler}
    settings, notes = preview_from_txt2img(txt2img, FIELDS)
    assert settings["preview_sampler"] == ours and ours in PREVIEW_SAMPLERS
    assert notes == []


@pytest.mark.parametrize("sampler", ["DPM++ SDE", "Heun", "Default", ""])
def test_an_unmapped_sampler_keeps_the_fields_and_says_so(sampler):
    settings, notes = preview_from_txt2img({"sampler": sampler, "scheduler": "Automatic"}, FIELDS)
    assert settings["preview_sampler"] == "ddim"
    (note,) = notes
    assert f"sampler {sampler or 'none'} has no preview counterpart" in note and "previews use ddim" in note


def test_a_schedule_type_previews_cannot_follow_is_named():
    settings, notes = preview_from_txt2img({"sampler": "Euler", "scheduler": "Exponential"}, FIELDS)
    assert settings["preview_sampler"] == "euler"
    assert notes == ["the txt2img schedule type Exponential has no preview counterpart, so previews use euler's own"]


@pytest.mark.parametrize("seed", [-1, -1.0, "-1", "", None, "random"])
def test_a_random_seed_keeps_the_fields_seed_and_says_so(seed):
    settings, notes = preview_from_txt2img({"seed": seed}, FIELDS)
    assert "preview_seed" not in settings  # the field's 1234 stays: previews compare step to step
    assert notes == ["the txt2img seed is random, so previews keep seed 1234 (comparable step to step)"]


def test_a_seed_typed_in_a_textbox_is_taken():  # A1111 --use-textbox-seed
    assert preview_from_txt2img({"seed": " 987 "}, FIELDS)[0] == {"preview_seed": 987}


@pytest.mark.parametrize(("given", "rounded"), [(512, 512), (515, 512), (517.0, 520), (3, 8), (0, 0)])
def test_sizes_are_rounded_to_multiples_of_8(given, rounded):
    settings, notes = preview_from_txt2img({"width": given, "height": given}, FIELDS)
    assert (settings["preview_width"], settings["preview_height"]) == (rounded, rounded)
    assert (notes == []) == (given == rounded)
    if notes:
        assert notes[0] == f"width {given:g} rounded to {rounded}"


def test_sdnexts_model_default_cfg_keeps_the_fields():
    settings, notes = preview_from_txt2img({"cfg_scale": -1.0, "steps": 12.0}, FIELDS)
    assert settings == {"preview_steps": 12}
    assert notes == ["the txt2img CFG scale is the model's default, so previews keep 7.0"]


def test_an_empty_prompt_means_the_template_line_and_says_so():
    settings, notes = preview_from_txt2img({"prompt": " \n "}, FIELDS)
    assert settings == {"preview_prompt": ""}
    assert notes == ["the txt2img prompt is empty, so previews use a template line with a caption"]


def test_missing_components_leave_the_fields_alone():
    assert preview_from_txt2img({}, FIELDS) == ({}, [])


def test_the_capture_keeps_txt2img_components_by_name():
    capture = Txt2imgCapture()

    def component(elem_id, **extra):
        made = types.SimpleNamespace(elem_id=elem_id, **extra)
        capture.capture(made, elem_id=elem_id)
        return made

    component("img2img_prompt")
    assert capture.components() == {}  # no txt2img prompt: nothing to offer
    made = {name: component(elem_id) for name, elem_id in TXT2IMG_ELEM_IDS.items()}
    assert capture.components() == made
    rebuilt = component("txt2img_prompt")  # a UI reload builds the page again
    assert capture.components()["prompt"] is rebuilt


def test_an_index_dropdown_gives_its_choices_name():  # SD.Next's sampler
    capture = Txt2imgCapture()
    choices = [("Default", "Default"), ("Euler a", "Euler a"), ("UniPC", "UniPC")]
    capture.capture(types.SimpleNamespace(elem_id="txt2img_prompt"))
    capture.capture(types.SimpleNamespace(elem_id="txt2img_sampling", type="index", choices=choices))
    assert capture.named_values({"prompt": "x", "sampler": 2}) == {"prompt": "x", "sampler": "UniPC"}
    assert preview_from_txt2img(capture.named_values({"sampler": 1}), FIELDS)[0] == {"preview_sampler": "euler_a"}
