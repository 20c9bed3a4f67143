"""Data loading: the six Concept Depth sets (sizes and label balance from the data README and the
files themselves), the generic table loader, and its errors."""

from __future__ import annotations

import json

import pytest

from interp.concepts.datasets import (
    ConceptDataset,
    DatasetError,
    add_noise,
    load_dataset,
    load_table,
)

# (rows, number of label-1 rows, a text that must be there with its label), counted in the files.
EXPECTED = {
    "cities": (1496, 748, ("The city of Krasnodar is in Russia.", 1)),
    "common_claim": (20000 - 3616, 12063,
                     ("Bedbugs are one of the few animals known to be capable of surviving in space.", 0)),
    "counterfact": (31964, 15982, ("The mother tongue of Danielle Darrieux is English.", 0)),
    "strategyqa": (2290, 1071, None),
    "coinflip": (500, 253, None),
    "sst2": (6920, 3610, None),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_concept_depth_sets_load_with_binary_labels(name):
    ds = load_dataset(name)
    rows, ones, example = EXPECTED[name]
    assert len(ds) == rows and sum(ds.labels) == ones
    assert set(ds.labels) == {0, 1} and all(isinstance(t, str) and t for t in ds.texts)
    if example is not None:
        assert ds.labels[ds.texts.index(example[0])] == example[1]


def test_strategyqa_and_sst2_texts_are_built_like_the_paper():
    qa = load_dataset("strategyqa")
    first = qa.texts[0]
    assert first.startswith("Is it common to see frost during some college commencements? College")
    assert "Yes." not in first.split("?")[1][:5] and qa.labels[0] == 1
    sst = load_dataset("STSA")  # alias
    assert sst.texts[0].startswith("a stirring , funny") and sst.labels[0] == 1
    assert len(load_dataset("sst2", split="test")) == 1821


def test_subsample_is_balanced_and_seeded():
    ds = load_dataset("common_claim")  # unbalanced: 4321 false, 12063 true
    a = ds.subsample(200, seed=3)
    assert a.counts == (100, 100)
    assert a.texts == ds.subsample(200, seed=3).texts
    assert a.texts != ds.subsample(200, seed=4).texts
    assert set(a.texts) <= set(ds.texts)
    for text, label in zip(a.texts[:20], a.labels[:20]):
        assert ds.labels[ds.texts.index(text)] == label
    small = ConceptDataset("x", ["a", "b", "c", "d"], [0, 1, 1, 1])
    assert small.subsample(4).counts == (1, 3)  # the small class caps its share
    assert load_dataset("cities", limit=10, seed=0).counts == (5, 5)


def test_noise_prefix_is_seeded():
    texts = ["one", "two", "three", "four", "five", "six"]
    noisy = add_noise(texts, seed=0)
    assert noisy == add_noise(texts, seed=0)
    assert all(n[:3] in ("aaa", "bbb") and n[3:] == t for n, t in zip(noisy, texts))
    assert {n[:3] for n in add_noise(texts * 10, seed=1)} == {"aaa", "bbb"}


def test_tables_in_every_format(tmp_path):
    rows = [{"sentence": f"text {i}", "y": "yes" if i % 2 else "no", "other": i} for i in range(6)]
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("sentence,y,other\n" + "".join(f"{r['sentence']},{r['y']},{r['other']}\n" for r in rows))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"meta": 1, "examples": rows}))
    for file in ("d.csv", "d.jsonl", "d.json", "wrapped.json"):
        ds = load_table(tmp_path / file, "sentence", "y")
        assert ds.texts == [r["sentence"] for r in rows]
        assert ds.labels == [0, 1, 0, 1, 0, 1] and ds.label_names == ("no", "yes")
    numeric = load_table(tmp_path / "d.json", "sentence", "other", label_map={0: 1, 1: 0},
                         drop_unmapped=True)
    assert numeric.texts == ["text 0", "text 1"] and numeric.labels == [1, 0]
    flipped = load_table(csv_path, "sentence", "y", positive="no")
    assert flipped.labels == [1, 0, 1, 0, 1, 0]


def test_table_errors_are_clear(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label,grade\na,1,x\nb,0,y\nc,1,z\n")
    with pytest.raises(DatasetError, match="not found"):
        load_table(tmp_path / "missing.csv", "text", "label")
    with pytest.raises(DatasetError, match=r"text column 'sentence' is missing.*\['text', 'label', 'grade'\]"):
        load_table(path, "sentence", "label")
    with pytest.raises(DatasetError, match="label column 'y' is missing"):
        load_table(path, "text", "y")
    with pytest.raises(DatasetError, match=r"must be binary.*3: \['x', 'y', 'z'\]"):
        load_table(path, "text", "grade")
    with pytest.raises(DatasetError, match="label_map does not map"):
        load_table(path, "text", "grade", label_map={"x": 0, "y": 1})
    with pytest.raises(DatasetError, match="positive='maybe' is not a label"):
        load_table(path, "text", "label", positive="maybe")
    empty = tmp_path / "e.csv"
    empty.write_text("text,label\na,1\n,0\n")
    with pytest.raises(DatasetError, match="row 1 has an empty"):
        load_table(empty, "text", "label")
    bad = tmp_path / "d.parquet"
    bad.write_text("x")
    with pytest.raises(DatasetError, match="unsupported file type"):
        load_table(bad, "text", "label")
    with pytest.raises(DatasetError, match="unknown data set 'imdb'; known: cities"):
        load_dataset("imdb")


def test_a_missing_data_file_is_reported(tmp_path, monkeypatch):
    (tmp_path / "concept_depth").mkdir()
    monkeypatch.setenv("INTERP_DATA_DIR", str(tmp_path))
    with pytest.raises(DatasetError, match=r"data file for 'cities' not found.*cities.csv"):
        load_dataset("cities")
