import json

import datasets
import pytest
from datasets import Features, Value

from noisealign.data.shards import ShardStore
from noisealign.errors import DataError

FEATURES = Features(
    {"prompt_id": Value("string"), "seed": Value("int64"), "score": Value("float32")}
)


def rows(keys):
    return [{"prompt_id": p, "seed": s, "score": float(s)} for p, s in keys]


def test_plan_skips_finished_shards_and_merge_orders(tmp_path):
    store = ShardStore(tmp_path, ("prompt_id", "seed"))
    store.prepare({"a": 1}, overwrite=False)
    keys = [(p, s) for p in ("x", "y") for s in range(3)]
    chunks = store.plan(keys, 4)
    assert chunks == [keys[:4], keys[4:]]
    store.write_shard(rows(chunks[1]), FEATURES)  # the second chunk finished first
    assert store.plan(keys, 4) == [keys[:4]]
    store.write_shard(rows(keys[:4]), FEATURES)
    merged = store.merge(keys)
    assert list(zip(merged["prompt_id"], merged["seed"])) == keys
    assert datasets.load_from_disk(str(tmp_path / "dataset")).num_rows == 6


def test_killed_chunk_leaves_no_shard(tmp_path):
    store = ShardStore(tmp_path, ("prompt_id", "seed"))
    store.prepare({"a": 1}, overwrite=False)
    (store.shard_dir / ".tmp-shard-dead-123").mkdir()  # what a SIGKILL mid-write leaves
    assert store.done_keys() == set()
    store.prepare({"a": 1}, overwrite=False)  # restart cleans it
    assert not list(store.shard_dir.glob(".tmp-*"))


def test_merge_reports_missing_and_duplicates(tmp_path):
    store = ShardStore(tmp_path, ("prompt_id", "seed"))
    store.prepare({"a": 1}, overwrite=False)
    store.write_shard(rows([("x", 0)]), FEATURES)
    with pytest.raises(DataError, match="1 keys were not collected"):
        store.merge([("x", 0), ("x", 1)])
    store.write_shard(rows([("x", 0), ("x", 1)]), FEATURES)
    with pytest.raises(DataError, match="duplicate keys"):
        store.merge([("x", 0), ("x", 1)])


def test_other_recipe_is_refused_then_overwritten(tmp_path):
    store = ShardStore(tmp_path, ("prompt_id", "seed"))
    store.prepare({"judge": "a", "steps": 4}, overwrite=False)
    store.write_shard(rows([("x", 0)]), FEATURES)
    with pytest.raises(
        DataError, match=r"different recipe \(differs in: judge\).*--overwrite_output_dir"
    ):
        store.prepare({"judge": "b", "steps": 4}, overwrite=False)
    assert len(store.shards()) == 1  # nothing was touched
    assert json.loads((tmp_path / "recipe.json").read_text())["fingerprint"]["judge"] == "a"
    store.prepare({"judge": "b", "steps": 4}, overwrite=True)
    assert store.shards() == []
