"""Loading problems: the built-in ``arith`` task, a local json/jsonl/parquet file (or a folder of
them), a folder written by ``datasets``' ``save_to_disk``, a folder of a local ``datasets`` cache, or a
hub dataset where the network allows (or from the cache, offline).

    task, problems = load_problems("data/gsm8k_test.jsonl", limit=100)   # adapter detected
    task, problems = load_problems("data/gsm8k_saved", split="test")       # save_to_disk folder
    task, problems = load_problems("~/.cache/huggingface/datasets/openai___gsm8k")  # datasets cache
    task, problems = load_problems("openai/gsm8k:main", split="test")      # hub name[:config]
    task, problems = load_problems()                                        # arith, test split

Bad input fails early with a message naming what is wrong: a missing path, the file and line number
of a malformed JSON line (checked line by line before ``datasets`` sees the file), a missing field
and the fields that are there.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .adapters import detect_adapter, make_adapter, problem_ids
from .arith import ArithConfig, ArithTask, arith_problems
from .problem import Problem, Task

__all__ = ["LOCAL_SUFFIXES", "load_problems", "load_records", "validate_json_file"]

LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Names ending like a data file are paths, never hub names: a missing or unsupported file is reported
# at once instead of after the hub's network retries.
_FILE_SUFFIXES = {".csv", ".tsv", ".txt", ".arrow", ".gz", ".bz2", ".xz", ".zst", ".zip", ".tar", ".yaml",
                  ".yml", ".xml", ".jsonl.gz", ".ndjson"}


def load_problems(dataset: str | None = None, *, task: str | None = None, split: str | None = None,
                  question_field: str | None = None, answer_field: str | None = None,
                  limit: int | None = None, arith_config: ArithConfig | None = None) -> tuple[Task, list[Problem]]:
    """``(task, problems)`` for ``dataset``.

    ``dataset``: ``None`` or ``"arith"`` for the built-in task; a local ``.json``/``.jsonl``/``.parquet``
    file or a folder of them; a folder written by ``Dataset.save_to_disk``/``DatasetDict.save_to_disk``;
    a folder of a local ``datasets`` cache (one config's ``dataset_info.json`` and ``*.arrow`` files,
    or a folder above exactly one such); else a hub name, ``"owner/name"`` or ``"owner/name:config"``.
    ``task``: an adapter name (``gsm8k``, ``math``, ``choice``, ``generic``, ``arith``); detected from
    the fields when ``None``. ``split``: the split of a hub dataset, a saved ``DatasetDict`` or a
    cache, or the ``arith`` split (default ``"test"``, or the only split there is); a local file is one
    split, so it is ignored there. ``limit``: keep the first ``limit`` problems (ids do
    not depend on it, so a resumed run with another limit lines up).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if dataset is None or dataset == "arith":
        if task not in (None, "arith"):
            raise ValueError(f"task {task!r} needs a --dataset; the built-in dataset is the 'arith' task")
        config = arith_config or ArithConfig()
        split = split or "test"
        n = config.num_test if split == "test" else config.num_train
        return ArithTask(config), arith_problems(split, n if limit is None else min(n, limit), config)
    if task == "arith":
        raise ValueError(f"the arith task generates its own problems; drop --dataset {dataset!r}")

    records, fields, source = load_records(dataset, split=split)
    if not records:
        raise ValueError(f"{source}: the dataset has no records")
    if task is None:
        adapter = detect_adapter(fields, records[0], source, question_field=question_field,
                                 answer_field=answer_field)
    else:
        adapter = make_adapter(task, question_field, answer_field)
    adapter.check_fields(fields, source)
    ids = problem_ids(records, prefix=f"{_stem(dataset)}-")
    if limit is not None:
        records, ids = records[:limit], ids[:limit]
    return adapter, [adapter.from_record(record, pid) for record, pid in zip(records, ids)]


def load_records(dataset: str, *, split: str | None = None) -> tuple[list[dict], list[str], str]:
    """``(records, field names, source description)`` of a local file/folder or a hub dataset."""
    path = Path(dataset).expanduser()
    looks_local = (path.suffix in LOCAL_SUFFIXES or path.suffix.lower() in _FILE_SUFFIXES
                   or dataset.startswith((".", "/", "~", "\\")) or path.exists()
                   or dataset.partition(":")[0].count("/") > 1)  # a hub name is "owner/name[:config]"
    if looks_local:
        return _load_local(path, split)
    return _load_hub(dataset, split or "test")


def validate_json_file(path: Path) -> None:
    """Raise ``ValueError`` naming ``path`` and the line of the first malformed JSON line or record.

    A file whose whole text is one JSON array is checked as such, one JSON object spread over many
    lines is left to ``datasets``; anything else is read as JSON lines, each non-blank line one JSON
    object.
    """
    with open(path, encoding="utf-8") as f:
        head = f.read(1 << 16).lstrip()
    if not head and not path.read_text(encoding="utf-8").strip():
        raise ValueError(f"{path}: the file is empty; expected JSON lines (one object per line) or a JSON "
                         f"array of objects")
    if head.startswith("["):
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
        bad = next((i for i, r in enumerate(data) if not isinstance(r, dict)), None)
        if bad is not None:
            raise ValueError(f"{path}: element {bad} of the JSON array is not an object")
        return
    first = True
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if first and _is_json_document(path):  # one object over many lines: datasets reads it
                    return
                raise ValueError(f"{path}:{lineno}: malformed JSON line ({e.msg}, column {e.colno})") from None
            first = False
            if not isinstance(record, dict):
                raise ValueError(  # noqa: TRY004 (bad file content, not a bad argument)
                    f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")


def _is_json_document(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except json.JSONDecodeError:
        return False


def _load_local(path: Path, split: str | None = None) -> tuple[list[dict], list[str], str]:
    if not path.exists():
        raise FileNotFoundError(f"dataset file not found: {path}")
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _load_saved(path, split)
        if (path / "dataset_info.json").is_file() and any(path.glob("*.arrow")):
            return _load_cached(path, split)
        files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES)
        if not files:
            cached = _cache_folders(path)
            if len(cached) == 1:
                return _load_cached(cached[0], split)
            if cached:
                names = ", ".join(str(c.relative_to(path)) for c in cached[:6])
                raise ValueError(f"the datasets cache {path} holds {len(cached)} datasets ({names}"
                                 f"{', ...' if len(cached) > 6 else ''}); pass the folder of one")
            raise FileNotFoundError(f"no .json/.jsonl/.parquet files, save_to_disk dataset or datasets cache "
                                    f"(dataset_info.json + *.arrow) in the dataset folder {path}")
    else:
        if path.suffix not in LOCAL_SUFFIXES:
            raise ValueError(f"dataset file {path}: unsupported suffix {path.suffix!r}; expected one of "
                             f"{sorted(LOCAL_SUFFIXES)}")
        files = [path]
    kinds = {LOCAL_SUFFIXES[p.suffix] for p in files}
    if len(kinds) > 1:
        raise ValueError(f"dataset folder {path} mixes json and parquet files")
    kind = kinds.pop()
    if kind == "json":
        for p in files:
            validate_json_file(p)
    import datasets

    try:
        ds = datasets.load_dataset(kind, data_files=[str(p) for p in files], split="train")
    except Exception as e:  # datasets raises many types; say which file it was
        raise ValueError(f"could not read dataset {path} as {kind}: {e}") from e
    return ds.to_list(), list(ds.column_names), str(path)


def _pick_split(splits: list[str], split: str | None, source: Path) -> str:
    """The requested split, else ``test``, else the only one; ``ValueError`` naming the splits there are."""
    if split is not None:
        if split not in splits:
            raise ValueError(f"{source} has no split {split!r}; it has {sorted(splits)}")
        return split
    if "test" in splits:
        return "test"
    if len(splits) == 1:
        return splits[0]
    raise ValueError(f"{source} has the splits {sorted(splits)}; pass --split")


def _load_saved(path: Path, split: str | None) -> tuple[list[dict], list[str], str]:
    """A folder written by ``save_to_disk``: one ``Dataset`` (``state.json``) or a ``DatasetDict``
    (``dataset_dict.json``, one sub-folder per split)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise ValueError(f"could not read the save_to_disk dataset {path}: {e}") from e
    source = str(path)
    if isinstance(ds, datasets.DatasetDict):
        name = _pick_split(list(ds), split, path)
        ds, source = ds[name], f"{path} [{name}]"
    return ds.to_list(), list(ds.column_names), source


# A cache's Arrow files: "<builder>-<split>.arrow" or "<builder>-<split>-00000-of-00004.arrow".
_CACHE_FILE_RE = re.compile(r"(?P<builder>.+?)-(?P<split>[^-]+)(?:-\d{5}-of-\d{5})?\.arrow")


def _cache_folders(root: Path) -> list[Path]:
    """Folders at or under ``root`` laid out as a ``datasets`` cache of one config and version:
    ``dataset_info.json`` beside ``*.arrow`` files (``<cache>/<owner>___<name>/<config>/<version>/<hash>``)."""
    found = [info.parent for info in sorted(root.rglob("dataset_info.json"))
             if any(_CACHE_FILE_RE.fullmatch(p.name) for p in info.parent.glob("*.arrow"))]
    return found


def _load_cached(folder: Path, split: str | None) -> tuple[list[dict], list[str], str]:
    """One split of a ``datasets`` cache folder, read from its Arrow files (no network)."""
    import datasets

    # dataset_info.json lists the splits; other Arrow files there ("cache-<hash>.arrow") are map() results.
    listed = (json.loads((folder / "dataset_info.json").read_text()).get("splits") or {}).keys()
    by_split: dict[str, list[Path]] = {}
    for p in sorted(folder.glob("*.arrow")):
        m = _CACHE_FILE_RE.fullmatch(p.name)
        if m and (not listed or m.group("split") in listed):
            by_split.setdefault(m.group("split"), []).append(p)
    name = _pick_split(list(by_split), split, folder)
    try:
        ds = datasets.concatenate_datasets([datasets.Dataset.from_file(str(p)) for p in by_split[name]])
    except Exception as e:
        raise ValueError(f"could not read the datasets cache {folder} [{name}]: {e}") from e
    return ds.to_list(), list(ds.column_names), f"{folder} [{name}]"


def _load_hub(name: str, split: str) -> tuple[list[dict], list[str], str]:
    import datasets

    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split=split)
    except Exception as e:
        raise ValueError(f"{name!r} is not a local file, and loading it from the Hugging Face hub "
                         f"(split {split!r}) failed: {type(e).__name__}: {e}") from e
    return ds.to_list(), list(ds.column_names), f"{name} [{split}]"


def _stem(dataset: str) -> str:
    name = Path(dataset).name if Path(dataset).suffix in LOCAL_SUFFIXES else dataset.rstrip("/")
    return Path(name).stem.replace(":", "-").split("/")[-1] or "problem"
