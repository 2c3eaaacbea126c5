import json

import datasets
import pytest

from noisealign.data import prompts
from noisealign.data.prompts import load_prompts, parse_seeds
from noisealign.errors import DataError


def test_text_file_ids_are_stable_and_deduplicated(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a red circle\n\na blue square\na red circle\n")
    records = load_prompts(path)
    assert [r.prompt for r in records] == ["a red circle", "a blue square"]
    path.write_text("a blue square\na red circle\n")
    reordered = {r.prompt: r.prompt_id for r in load_prompts(path)}
    assert reordered == {r.prompt: r.prompt_id for r in records}


def test_jsonl_with_concepts_and_ids(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {
            "id": "x1",
            "prompt": "a cat left of a dog",
            "concepts": [{"text": "cat", "kind": "object"}, "dog"],
        },
        {"id": "x2", "prompt": "a bird"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    first, second = load_prompts(path)
    assert first.prompt_id == "x1" and second.concepts is None
    assert [(c.text, c.spans) for c in first.concepts] == [("cat", [(2, 5)]), ("dog", [(16, 19)])]


def test_csv_and_dataset_folder(tmp_path):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("caption,other\na red circle,1\n")
    assert load_prompts(csv_path, column="caption")[0].prompt == "a red circle"
    datasets.Dataset.from_dict({"prompt": ["a", "b"]}).save_to_disk(str(tmp_path / "ds"))
    assert [r.prompt for r in load_prompts(tmp_path / "ds")] == ["a", "b"]


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        (None, ".txt", "does not exist"),
        ("\n\n", ".txt", "holds no prompts"),
        ('{"text": "x"}', ".jsonl", "has no 'prompt' column"),
        ("{not json", ".jsonl", "is not valid JSON"),
        ('{"prompt": "a cat", "concepts": ["dog"]}', ".jsonl", "concept 'dog' does not occur"),
        (
            '{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}',
            ".jsonl",
            "used by two different prompts",
        ),
    ],
)
def test_bad_prompt_files(tmp_path, content, suffix, message):
    path = tmp_path / f"p{suffix}"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_prompts(path)


def test_parse_seeds():
    assert parse_seeds("2:5") == [2, 3, 4]
    assert parse_seeds("7, 1") == [7, 1]
    assert parse_seeds([3, 4]) == [3, 4]
    for bad, message in [
        ("5:2", "selects no seed"),
        ("1,1", "repeats"),
        ("a:b", "start:stop"),
        ("x", "comma-separated"),
    ]:
        with pytest.raises(DataError, match=message):
            parse_seeds(bad)


def test_geneval_metadata_becomes_concepts(tmp_path):
    rows = [
        {
            "tag": "counting",
            "include": [{"class": "cow", "count": 3}],
            "prompt": "a photo of three cows",
        },
        {
            "tag": "position",
            "include": [
                {"class": "bench", "count": 1},
                {"class": "dog", "count": 1, "position": ["left of", 0]},
            ],
            "prompt": "a photo of a dog left of a bench",
        },
        {
            "tag": "color_attr",
            "include": [{"class": "car", "count": 1, "color": "red"}],
            "prompt": "a photo of a red car",
        },
    ]
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    counting, position, color = load_prompts(path)
    assert [(c.text, c.kind, c.spans) for c in counting.concepts] == [
        ("cow", "object", [(17, 21)]),
        ("3 cow", "count", [(11, 16)]),
    ]
    relation = position.concepts[-1]
    assert (relation.text, relation.kind, relation.spans) == (
        "dog left of bench",
        "relation",
        [(17, 24)],
    )
    assert [(c.kind, c.spans) for c in color.concepts] == [
        ("object", [(17, 20)]),
        ("attribute", [(13, 16)]),
    ]


def test_split_filter(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a cat", "split": "train"}\n{"prompt": "a dog", "split": "eval"}\n')
    assert [r.prompt for r in load_prompts(path, split="eval")] == ["a dog"]
    with pytest.raises(DataError, match="no rows with split 'test'"):
        load_prompts(path, split="test")
    plain = tmp_path / "p.txt"
    plain.write_text("a cat\n")
    with pytest.raises(DataError, match="has no 'split' column"):
        load_prompts(plain, split="eval")


def _split_file(path, rows):
    path.write_text(
        "".join(json.dumps(dict(zip(("prompt_id", "prompt", "split"), r))) + "\n" for r in rows)
    )
    return path


def test_training_stages_never_read_heldout_rows_and_evaluate_reads_only_them(tmp_path):
    path = _split_file(
        tmp_path / "p.jsonl",
        [
            ("t0", "a cat", "train"),
            ("e0", "a dog", "eval"),
            ("v0", "a cow", "val"),
            ("e1", "a pig", "eval"),
        ],
    )
    assert [(r.prompt_id, r.split) for r in prompts.load_training_prompts(path)] == [
        ("t0", "train"),
        ("v0", "val"),
    ]
    assert [r.prompt_id for r in prompts.load_heldout_prompts(path)] == ["e0", "e1"]
    assert prompts.heldout_record(path)["heldout_prompt_ids"] == ["e0", "e1"]
    plain = tmp_path / "p.txt"  # no split column (the toy world's separate files): read whole
    plain.write_text("a cat\na dog\n")
    for load in (prompts.load_training_prompts, prompts.load_heldout_prompts):
        assert [r.prompt for r in load(plain)] == ["a cat", "a dog"]
    assert prompts.heldout_record(plain)["heldout_prompt_ids"] == []


def test_heldout_selection_errors_name_the_file_and_the_fix(tmp_path):
    only_eval = _split_file(
        tmp_path / "eval.jsonl", [("e0", "a dog", "eval"), ("e1", "a pig", "eval")]
    )
    with pytest.raises(
        DataError,
        match=(
            r"'.*eval\.jsonl' holds only held-out prompts \(split 'eval'\).*set 'prompts' to a "
            r"file with training rows"
        ),
    ):
        prompts.load_training_prompts(only_eval)
    no_eval = _split_file(tmp_path / "train.jsonl", [("t0", "a cat", "train")])
    with pytest.raises(
        DataError, match=r"'.*train\.jsonl' has a 'split' column but no held-out rows"
    ):
        prompts.load_heldout_prompts(no_eval)
    # a held-out prompt repeated as a training row would leak: under another id or the same one
    for second_id in ("t1", "e0"):
        both = _split_file(
            tmp_path / "both.jsonl", [("e0", "a dog", "eval"), (second_id, "a dog", "train")]
        )
        with pytest.raises(
            DataError, match=r"both\.jsonl: row 2: prompt 'a dog' is both in a held-out row"
        ):
            load_prompts(both, split="train")


def test_datasets_with_rows_of_recorded_heldout_prompts_are_refused(tmp_path, caplog):
    path = _split_file(tmp_path / "p.jsonl", [("t0", "a cat", "train"), ("e0", "a dog", "eval")])
    collected = tmp_path / "collect"
    prompts.save_heldout_record(collected, prompts.heldout_record(path))
    # found from <output_dir>/dataset (distill, image_npd) and from <output_dir> (train_npnet)
    for dataset in (collected / "dataset", collected):
        assert prompts.check_not_heldout(dataset, ["t0"])["heldout_prompt_ids"] == ["e0"]
        with pytest.raises(
            DataError,
            match=(
                r"holds rows of 1 held-out prompt\(s\) \(e\.g\. 'e0', split 'eval' of "
                r".*p\.jsonl\); collect it again"
            ),
        ):
            prompts.check_not_heldout(dataset, ["t0", "e0"])
    with caplog.at_level("WARNING", logger="noisealign.data.prompts"):
        assert prompts.check_not_heldout(tmp_path / "old" / "dataset", ["t0", "e0"]) is None
    assert "records no held-out prompts" in caplog.text
    (collected / "heldout.json").write_text("{")
    with pytest.raises(DataError, match=r"heldout\.json is corrupt; collect the dataset again"):
        prompts.check_not_heldout(collected / "dataset", ["t0"])


def test_drawbench_csv_column(tmp_path):
    path = tmp_path / "drawbench.csv"
    path.write_text('Prompts,Category\n"A red colored car.",Colors\n')
    (record,) = load_prompts(path, column="Prompts")
    assert record.prompt == "A red colored car." and record.concepts is None


def test_jsonl_of_bare_strings_names_the_line_and_the_fix(tmp_path):
    path = tmp_path / "bare.jsonl"
    path.write_text('"a red cube"\n"a blue ball"\n')
    with pytest.raises(DataError, match=r"bare.jsonl:1 is a JSON str, not an object.*\.txt"):
        load_prompts(path)


def test_missing_column_fix_names_only_a_field_the_stage_has(tmp_path):
    from noisealign.policies.training import read_prompts

    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "a red cube"}\n')
    with pytest.raises(DataError, match="set 'prompt_column'"):
        load_prompts(path)
    with pytest.raises(DataError) as info:  # train_projector reads 'prompt' and has no such field
        read_prompts(str(path), None)
    assert "prompt_column" not in str(info.value) and "name the prompt column 'prompt'" in str(
        info.value
    )
