"""``usae concepts``' table (usae.analysis.concepts), on an eval folder written by hand: the
ranking, the classes, the fires per model and each top image's path are read back from the
files here, never from the code under test."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import save_file

from usae.analysis.concepts import concept_table, format_table
from usae.errors import UsaeError

MODELS = ["vit", "cnn"]
# concept, class, energy, firing entropy, fires per model
ROWS = [
    (0, "universal", 0.25, 0.9, 40, 38),
    (1, "vit-specific", 0.75, "", 12, 0),
    (2, "universal", 0.5, 0.5, 20, 21),
    (3, "dead", 0.0, "", 0, 0),
]
# top_images' rows.mean: each concept's store rows, best first (-1: fewer than asked)
TOP = [[4, 1, 2], [0, -1, -1], [3, 4, 0], [-1, -1, -1]]
PATHS = ["img/a.jpg", "img/b.jpg", "img/c.jpg", "img/d.jpg", "img/e.jpg"]


@pytest.fixture
def eval_dir(tmp_path):
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps({"models": MODELS, "n_concepts": 4}))
    with open(folder / "concepts.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["concept", "class", "energy", "firing_entropy", "fires_vit",
                         "fires_cnn"])
        writer.writerows(ROWS)
    save_file({"rows.mean": torch.tensor(TOP, dtype=torch.int64)},
              str(folder / "top_images.safetensors"))
    return folder


@pytest.fixture
def store(tmp_path):
    folder = tmp_path / "store"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(
        {"schema_version": 1, "images": [{"path": p} for p in PATHS]}))
    return folder


def test_concepts_rank_by_energy_with_everything_read_from_the_files(eval_dir):
    table = concept_table(eval_dir)
    assert [c["concept"] for c in table] == [1, 2, 0, 3]
    assert table[0] == {"concept": 1, "class": "vit-specific", "energy": 0.75,
                        "firing_entropy": None, "fires": {"vit": 12, "cnn": 0},
                        "top_images": ["row 0"]}
    assert table[1] == {"concept": 2, "class": "universal", "energy": 0.5,
                        "firing_entropy": 0.5, "fires": {"vit": 20, "cnn": 21},
                        "top_images": ["row 3", "row 4", "row 0"]}
    assert table[3]["top_images"] == []  # a dead concept has no top image


def test_top_universal_and_the_number_of_images(eval_dir):
    assert [c["concept"] for c in concept_table(eval_dir, top=2)] == [1, 2]
    universal = concept_table(str(eval_dir), universal_only=True, images=1)
    assert [c["concept"] for c in universal] == [2, 0]
    assert [c["top_images"] for c in universal] == [["row 3"], ["row 4"]]
    assert concept_table(eval_dir, top=0) == []


def test_chosen_concepts_come_in_the_order_asked(eval_dir):
    table = concept_table(eval_dir, concepts=[3, 0])
    assert [c["concept"] for c in table] == [3, 0]
    assert table[1]["top_images"] == ["row 4", "row 1", "row 2"]


def test_a_store_turns_rows_into_image_paths(eval_dir, store):
    table = concept_table(eval_dir, concepts=[0, 1], store=store)
    assert table[0]["top_images"] == [PATHS[4], PATHS[1], PATHS[2]]
    assert table[1]["top_images"] == [PATHS[0]]


@pytest.mark.parametrize("bad", [[4], [-1], [0, 7]])
def test_a_concept_that_does_not_exist_is_refused(eval_dir, bad):
    with pytest.raises(UsaeError) as info:
        concept_table(eval_dir, concepts=bad)
    wrong = [k for k in bad if not 0 <= k < 4]
    assert str(info.value) == f"concept(s) {wrong} do not exist; this run has concepts 0..3"


def test_an_eval_of_other_models_is_refused(eval_dir):
    assert concept_table(eval_dir, models=("vit", "cnn"), top=1)[0]["concept"] == 1
    with pytest.raises(UsaeError) as info:
        concept_table(eval_dir, models=["cnn", "vit"])
    assert str(info.value) == (f"{eval_dir} is an eval of models ['vit', 'cnn'], not of this "
                               "run's ['cnn', 'vit']")


def test_format_table_writes_one_block_per_concept(eval_dir, store):
    text = format_table(concept_table(eval_dir, concepts=[2, 1], store=store, images=2))
    assert text.split("\n") == [
        "concept     2  universal        energy 0.5  FE 0.50  fires: vit 20, cnn 21",
        "    img/d.jpg",
        "    img/e.jpg",
        "concept     1  vit-specific     energy 0.75  FE -  fires: vit 12, cnn 0",
        "    img/a.jpg",
    ]
    assert format_table([]) == ""
    many = format_table([{"concept": 123456, "class": "a-very-long-class-name",
                          "energy": 1 / 3, "firing_entropy": 1.0, "fires": {}, "top_images": []}])
    assert many == "concept 123456  a-very-long-class-name energy 0.3333  FE 1.00  fires: "


def test_the_defaults_are_ten_concepts_and_three_images(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps({"models": ["m"], "n_concepts": 12}))
    with open(folder / "concepts.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["concept", "class", "energy", "firing_entropy", "fires_m"])
        writer.writerows((k, "universal", k / 10, 0.5, k) for k in range(12))
    save_file({"rows.mean": torch.arange(60).reshape(12, 5)},
              str(folder / "top_images.safetensors"))
    table = concept_table(folder)
    assert [c["concept"] for c in table] == list(range(11, 1, -1))
    assert table[0]["top_images"] == ["row 55", "row 56", "row 57"]
