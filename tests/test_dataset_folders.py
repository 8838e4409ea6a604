"""``--dataset`` on folders ``datasets`` writes: ``save_to_disk`` (one Dataset or a DatasetDict) and a
local ``datasets`` cache, each built here from records the test writes."""
from __future__ import annotations

import json

import pytest

from arkfast.tasks import GSM8KTask, MathTask, load_problems

datasets = pytest.importorskip("datasets")

GSM = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(5)]
MATH = [{"problem": f"Simplify {i}/2.", "solution": f"It is $\\boxed{{\\frac{{{i}}}{{2}}}}$."} for i in range(3)]


def test_save_to_disk_dataset(tmp_path):
    datasets.Dataset.from_list(GSM).save_to_disk(str(tmp_path / "gsm"))
    task, problems = load_problems(str(tmp_path / "gsm"))
    assert isinstance(task, GSM8KTask)
    assert [p.gold for p in problems] == ["0", "2", "4", "6", "8"]
    assert problems[3].question == "What is 3 + 3?"


def test_save_to_disk_dataset_dict_splits(tmp_path):
    folder = tmp_path / "math"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(MATH[:2]),
                          "test": datasets.Dataset.from_list(MATH[2:])}).save_to_disk(str(folder))
    task, problems = load_problems(str(folder))  # default split: test
    assert isinstance(task, MathTask) and [p.gold for p in problems] == ["\\frac{2}{2}"]
    _, problems = load_problems(str(folder), split="train")
    assert [p.gold for p in problems] == ["\\frac{0}{2}", "\\frac{1}{2}"]
    with pytest.raises(ValueError, match=r"no split 'validation'.*\['test', 'train'\]"):
        load_problems(str(folder), split="validation")


def test_local_datasets_cache(tmp_path):
    """A cache as ``datasets`` leaves it after loading files (the layout of a hub dataset's cache too):
    ``<cache>/<builder>/<config>/<version>/<hash>/`` with ``dataset_info.json`` and ``<builder>-<split>.arrow``."""
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GSM))
    cache = tmp_path / "cache"
    datasets.load_dataset("json", data_files={"test": str(data)}, cache_dir=str(cache), split="test")
    infos = list(cache.rglob("dataset_info.json"))
    assert len(infos) == 1 and list(infos[0].parent.glob("json-test*.arrow"))
    for folder in (cache, infos[0].parent):  # the cache root (one dataset in it) or the dataset's folder
        task, problems = load_problems(str(folder))
        assert isinstance(task, GSM8KTask) and [p.gold for p in problems] == ["0", "2", "4", "6", "8"]
    # A second dataset in the same cache: the root is ambiguous, and the error names both.
    datasets.load_dataset("json", data_files={"train": str(data)}, cache_dir=str(cache), split="train")
    with pytest.raises(ValueError, match="holds 2 datasets"):
        load_problems(str(cache))


def test_folder_without_data_names_what_it_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(FileNotFoundError, match="save_to_disk dataset or datasets cache"):
        load_problems(str(tmp_path))
