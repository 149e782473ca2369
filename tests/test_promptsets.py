"""Shipped prompt sets (counts, labels, checksums) and load_prompt_file's validation."""

from __future__ import annotations

import collections
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tasks import promptsets as ps
from bench.errors import PromptFileError
from bench.run.prompt_file import load_prompt_file

SHIPPED = {
    "sdv1_500_memorized_labeled.jsonl", "nonmem_laion_500_nemo.jsonl",
    "nonmem_coco2017_val_500.jsonl", "nonmem_lexica_gustavosta_test_500.jsonl",
    "nonmem_sail_sd1_mixed_500.jsonl", "webster_sdv2_memorized_219.jsonl",
}
# Prompts with commas, quotes, a delimiter, non-ASCII text and an embedded newline.
TRICKY = ["a cat, sitting", 'the "No Limits" podcast', "semi;colon", "café ☕ 東京", "two\nlines"]


@pytest.fixture(scope="module")
def task() -> ps.PromptSet:
    return ps.load_task("webster500")


# ----------------------------------------------------------------------------- shipped sets


def test_webster500_counts_and_labels():
    mem = ps.webster500()
    assert len(mem) == 500 and mem.n_pos == 500 and set(mem.groups) == {"webster_mem"}
    assert collections.Counter(mem.types) == {"TM": 388, "VM": 112}
    assert collections.Counter(mem.extra["nemo_type"]) == {"TM": 388, "VM": 112}
    assert collections.Counter(mem.extra["webster_type"]) == {
        "TV": 229, "MV": 86, "RV": 30, "N": 7, "": 148}
    assert set(mem.extra) == {"nemo_type", "webster_type", "laion_index", "url", "nemo_max_sscd"}
    assert all(isinstance(i, int) for i in mem.extra["laion_index"])
    assert mem.prompts[0] == "The No Limits Business Woman Podcast"  # Wen's order
    by_webster = ps.webster500(type_source="webster")
    assert by_webster.types == mem.extra["webster_type"] and by_webster.sha256 != mem.sha256
    with pytest.raises(ValueError, match="type_source"):
        ps.webster500(type_source="sscd")


def test_nonmem_and_task_counts(task):
    assert len(task) == 2500 and task.n_pos == 500
    assert collections.Counter(task.groups) == {
        "webster_mem": 500, "laion": 500, "coco": 500, "lexica": 500, "random_tokens": 500}
    assert task.labels.dtype == np.int8
    assert task.labels[:500].all() and not task.labels[500:].any()  # positives first
    assert all(t == "" for t in task.types[500:])  # negatives carry no memorization type
    assert len(set(task.ids)) == 2500
    assert all(isinstance(p, str) and p.strip() for p in task.prompts)
    assert set(task.sources) == SHIPPED - {"nonmem_sail_sd1_mixed_500.jsonl",
                                           "webster_sdv2_memorized_219.jsonl"}
    assert task.extra["nemo_type"][500:] == [None] * 2000  # concat fills missing extras
    with pytest.raises(ValueError):
        task.labels[0] = 0  # read-only


def test_task_hash_is_stable_and_seed_dependent(task):
    assert ps.load_task("webster500").sha256 == task.sha256
    assert len(task.sha256) == 64
    assert ps.load_task("webster500", seed=1).sha256 != task.sha256


def test_sail_tasks():
    sail = ps.sail500()
    assert len(sail) == 500 and sail.n_pos == 0
    assert collections.Counter(sail.groups) == {
        "sail_coco": 200, "sail_lexica": 100, "sail_tuxemon": 100, "sail_gpt4": 100}
    t = ps.load_task("webster500_sail")
    assert (len(t), t.n_pos) == (1000, 500)
    v2 = ps.load_task("webster_sdv2_219_sail")
    assert (len(v2), v2.n_pos) == (719, 219)
    assert collections.Counter(v2.types[:219]) == {"TV": 215, "MV": 4}
    with pytest.raises(ValueError, match="available"):
        ps.load_task("webster501")


def test_random_token_prompts_deterministic():
    a = ps.random_token_prompts(50, seed=3)
    assert a == ps.random_token_prompts(50, seed=3)
    assert a != ps.random_token_prompts(50, seed=4)
    assert ps.random_token_prompts(10, seed=3) == a[:10]  # a prefix does not depend on n
    assert len(a) == 50 and all(isinstance(p, str) and p == p.strip() and p for p in a)
    assert not any("<start_of_text>" in p or "<end_of_text>" in p for p in a)
    assert ps.random_token_prompts(0, seed=0) == []
    with pytest.raises(ValueError):
        ps.random_token_prompts(-1, seed=0)


def test_promptset_validation():
    with pytest.raises(ValueError, match="types has 1 entries, expected 2"):
        ps.PromptSet("x", ["a", "b"], np.array([0, 1]), ["g", "g"], ["", ], ["1", "2"])
    with pytest.raises(ValueError, match="ids must be unique"):
        ps.PromptSet("x", ["a", "b"], np.array([0, 1]), ["g", "g"], ["", ""], ["1", "1"])
    with pytest.raises(ValueError, match="labels"):
        ps.PromptSet("x", ["a", "b"], np.array([0, 2]), ["g", "g"], ["", ""], ["1", "2"])
    a = ps.PromptSet("a", ["p"], [1], ["g"], ["VM"], ["g:0"])
    assert a.sha256 == ps.PromptSet("b", ["p"], [1], ["g"], ["VM"], ["g:0"]).sha256
    assert a.sha256 != ps.PromptSet("a", ["p"], [0], ["g"], ["VM"], ["g:0"]).sha256


# ----------------------------------------------------------------------------- checksums


def test_verify_checksums_covers_every_shipped_file():
    assert set(ps.verify_checksums()) == SHIPPED
    assert {p.name for p in ps.DATA_DIR.glob("*.jsonl")} == SHIPPED
    assert sum((ps.DATA_DIR / f).stat().st_size for f in SHIPPED) < 3_000_000


def test_checksum_detects_modified_copy(tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(ps.DATA_DIR, data)
    target = data / "nonmem_laion_500_nemo.jsonl"
    expected = ps.verify_checksums(["nonmem_laion_500_nemo.jsonl"])["nonmem_laion_500_nemo.jsonl"]
    target.write_bytes(target.read_bytes().replace(b"Kyoto", b"Tokyo", 1))
    monkeypatch.setattr(ps, "DATA_DIR", data)
    with pytest.raises(PromptFileError) as err:
        ps.verify_checksums()
    msg = str(err.value)
    assert "nonmem_laion_500_nemo.jsonl" in msg and expected in msg
    assert ps.hashlib.sha256(target.read_bytes()).hexdigest() in msg
    with pytest.raises(PromptFileError, match="checksum mismatch"):
        ps.nonmem2000()  # loaders check too, before parsing
    ps.webster500()  # untouched files still load
    (data / "sdv1_500_memorized_labeled.jsonl").unlink()
    with pytest.raises(PromptFileError, match="missing"):
        ps.webster500()


def test_package_never_reads_shared():
    src = Path(ps.__file__).read_text(encoding="utf-8")
    assert "shared" not in src and ps.DATA_DIR.parent == Path(ps.__file__).resolve().parent


# ----------------------------------------------------------------------------- user files


def _write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(PromptFileError, match="not found"):
        load_prompt_file(tmp_path / "nope.jsonl")
    with pytest.raises(PromptFileError, match="unknown format"):
        load_prompt_file(_write(tmp_path / "p.json", '{"prompt": "a"}'))


@pytest.mark.parametrize("name", ["e.jsonl", "e.csv", "e.txt", "blank.txt"])
def test_empty_file(tmp_path, name):
    path = _write(tmp_path / name, "\n \n" if name == "blank.txt" else "")
    with pytest.raises(PromptFileError, match="empty"):
        load_prompt_file(path)


def test_missing_column_lists_available(tmp_path):
    path = _write(tmp_path / "p.jsonl", '{"caption": "a", "url": "u"}\n')
    with pytest.raises(PromptFileError, match=r"'prompt' not found.*\['caption', 'url'\]"):
        load_prompt_file(path)
    csv_path = _write(tmp_path / "p.csv", "Caption,URL\na,u\n")
    with pytest.raises(PromptFileError, match=r"\['Caption', 'URL'\]"):
        load_prompt_file(csv_path, column="prompt")
    assert load_prompt_file(csv_path, column=None).prompts == ["a"]  # auto: case-insensitive
    with pytest.raises(PromptFileError, match=r"no prompt column.*\['url'\]"):
        load_prompt_file(_write(tmp_path / "q.jsonl", '{"url": "u"}\n'), column=None)


def test_malformed_json_line(tmp_path):
    lines = ['{"prompt": "one"}', '{"prompt": "two"}', '{"prompt": "three"', '{"prompt": "four"}']
    path = _write(tmp_path / "bad.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(PromptFileError, match=r"bad\.jsonl, line 3: malformed JSON"):
        load_prompt_file(path)
    got = load_prompt_file(path, strict=False)
    assert got.prompts == ["one", "two", "four"] and got.line_numbers == [1, 2, 4]
    assert [n for n, _ in got.errors] == [3] and "malformed JSON" in got.errors[0][1]
    whole = _write(tmp_path / "all_bad.jsonl", "{\n[1]\n")
    with pytest.raises(PromptFileError, match="no valid prompt"):
        load_prompt_file(whole, strict=False)


def test_non_utf8(tmp_path):
    data = '{"prompt": "ok"}\n'.encode() + b'{"prompt": "caf\xe9"}\n'
    path = _write(tmp_path / "latin1.jsonl", data)
    offset = data.index(b"\xe9")
    with pytest.raises(PromptFileError, match=rf"line 2: not valid UTF-8: byte 0xe9 at byte offset {offset}"):
        load_prompt_file(path)
    got = load_prompt_file(path, strict=False)
    assert got.prompts == ["ok"] and got.errors[0][0] == 2
    txt = _write(tmp_path / "latin1.txt", b"fine\ncaf\xe9\n")
    with pytest.raises(PromptFileError, match="line 2: not valid UTF-8: byte 0xe9 at byte offset 8"):
        load_prompt_file(txt)
    csv_path = _write(tmp_path / "latin1.csv", b"prompt\nfine\ncaf\xe9\n")
    with pytest.raises(PromptFileError, match=r"byte 0xe9 at byte offset 15 \(line 3\)"):
        load_prompt_file(csv_path)


def test_empty_or_non_string_prompt(tmp_path):
    path = _write(tmp_path / "p.jsonl", '{"prompt": "a"}\n{"prompt": "  "}\n{"prompt": 7}\n'
                  '{"text": "b"}\n')
    with pytest.raises(PromptFileError, match="p.jsonl, line 2: empty prompt"):
        load_prompt_file(path)
    got = load_prompt_file(path, strict=False)
    assert got.prompts == ["a"]
    assert [(n, m.split()[0]) for n, m in got.errors] == [(2, "empty"), (3, "prompt"), (4, "field")]
    assert "int, not a string" in got.errors[1][1]
    with pytest.raises(PromptFileError, match="line 2: empty prompt"):
        load_prompt_file(_write(tmp_path / "p.txt", "a\n\nb\n"))
    with pytest.raises(PromptFileError, match="line 3: empty prompt"):
        load_prompt_file(_write(tmp_path / "p.csv", "prompt,x\na,1\n,2\n"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a", None]}), tmp_path / "p.parquet")
    with pytest.raises(PromptFileError, match="row 2: prompt is NoneType"):
        load_prompt_file(tmp_path / "p.parquet")


def test_round_trips(tmp_path):
    # CSV written by the csv module (quoting), NeMo-style ';' CSV, TSV, JSONL, parquet
    for name, delimiter in [("c.csv", ","), ("semi.csv", ";"), ("t.tsv", "\t")]:
        with open(tmp_path / name, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter=delimiter)
            writer.writerow(["", "Caption", "URL"])
            writer.writerows([i, p, f"http://x/{i}"] for i, p in enumerate(TRICKY))
        got = load_prompt_file(tmp_path / name, column="Caption")
        assert got.prompts == TRICKY, name
        assert got.records[1]["URL"] == "http://x/1"
    jsonl = "".join(json.dumps({"caption": p, "label": 1}, ensure_ascii=False) + "\n"
                    for p in TRICKY)
    got = load_prompt_file(_write(tmp_path / "p.jsonl", jsonl), column="caption")
    assert got.prompts == TRICKY and got.records[0]["label"] == 1
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": TRICKY, "label": [1, 0, 1, 0, 1]}), tmp_path / "p.parquet")
    got = load_prompt_file(tmp_path / "p.parquet")
    assert got.prompts == TRICKY and [r["label"] for r in got.records] == [1, 0, 1, 0, 1]
    one_line = [p for p in TRICKY if "\n" not in p]  # txt: one prompt per line, by definition
    txt = _write(tmp_path / "p.txt", "\ufeff" + "\r\n".join(one_line))  # BOM, CRLF, no final \n
    got = load_prompt_file(txt)
    assert got.prompts == one_line and got.column is None and got.errors == []
    assert load_prompt_file(txt, fmt="txt").prompts == one_line
    # the shipped files load through the same public reader
    shipped = load_prompt_file(ps.DATA_DIR / "sdv1_500_memorized_labeled.jsonl", column=None)
    assert shipped.prompts == ps.webster500().prompts and shipped.column == "caption"
