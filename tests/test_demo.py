"""The demo model: built in-process, loadable by its id, and enough for Create -> Train -> preview."""

from __future__ import annotations

import torch
from PIL import Image

from ti_core.cli import main
from ti_core.demo import DEMO_LABEL, DEMO_MODEL_ID, DEMO_MODEL_NAME
from ti_core.formats import load_embedding
from ti_core.models import TIModel, load_model
from ti_core.vocab import VOCAB_SIZE


def test_the_demo_id_loads_a_tiny_sd1_model_with_the_real_vocabulary():
    model = load_model(DEMO_MODEL_ID)
    assert isinstance(model, TIModel) and model.architecture == "sd1"
    assert model.name == DEMO_MODEL_NAME and model.file_path is None and model.shorthash() is None
    (encoder,) = model.encoders
    assert encoder.token_table.shape[0] == VOCAB_SIZE
    assert model.tokenizer("a tree").input_ids == [49406, 320, 2677, 49407]  # CLIP's real ids
    again = load_model(DEMO_MODEL_ID)
    assert torch.equal(encoder.token_table, again.encoders[0].token_table)  # seed 0: the same model each time


def test_the_label_says_it_is_for_trying_and_draws_noise():
    assert "Demo" in DEMO_LABEL and "noise" in DEMO_LABEL


def test_create_train_and_preview_with_the_demo_model(tmp_path, capsys, one_thread):
    images = tmp_path / "images"
    images.mkdir()
    for index in range(2):
        Image.new("RGB", (64, 64), (200, 40 * index, 40)).save(images / f"{index}-a red square.png")
    embeddings = tmp_path / "embeddings"
    model = ["--model", DEMO_MODEL_ID]
    assert (
        main(["create", *model, "--name", "mytoken", "--init-text", "tree", "--embeddings-dir", str(embeddings)]) == 0
    )
    capsys.readouterr()
    args = ["train", *model, "--name", "mytoken", "--embeddings-dir", str(embeddings), "--images", str(images)]
    args += ["--log-dir", str(tmp_path / "logs"), "--resume", "--steps", "2", "--preview-every", "2"]
    args += ["--preview-steps", "1", "--save-every", "0", "--resolution", "64"]
    assert main(args) == 0, capsys.readouterr().err
    embedding = load_embedding(embeddings / "mytoken.safetensors")
    assert embedding.step == 2 and embedding.metadata["base_model"] == DEMO_MODEL_NAME
    previews = list((tmp_path / "logs").rglob("*.png"))
    assert previews and Image.open(previews[0]).size == (64, 64)
